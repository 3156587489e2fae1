"""What `clear-gen generate` shows on stderr: progress while it runs, then where each image's time went.

On a terminal, rich bars for every phase (loading, encoding, compiling, each stage's steps, timing full
attention, decoding); anywhere else (a log file, CI, nohup) plain lines: each phase as it begins,
each stage's first and last step and about one step every 5 s between, each PNG saved. The library
prints nothing: this renders `run.render.Hooks`. Torch-free (`clear-gen info` prints a timing table
without loading torch): the library's types are imported where a run needs them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..files.record import RunTiming, StageTiming

if TYPE_CHECKING:
    from ..plan.footprint import RunPlan
    from ..plan.spec import Stage
    from ..run.render import Hooks, ImageResult

PHASES = {
    "load": "loading {}",
    "encode": "encoding {}",
    "compile": "compiling attention kernels for {} (first run at this size)",
    "compare": "timing full attention at {} (--no-compare-full skips this)",
    "decode": "decoding {} with the VAE",
}
LINE_EVERY_S = 5.0  # plain lines: at most one step line per this many seconds, besides the first and last


def duration(seconds: float) -> str:
    """'8.2 s', '3 min 05 s', '1 h 02 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class StageProgress:
    """The running stage's steps: s/step over the warm steps (after the first) and the time left."""

    def __init__(self, i: int, n: int, stage: Stage):
        self.label, self.stage = f"stage {i + 1}/{n}", stage
        self.done, self.total, self.first_s, self.warm_s = 0, stage.denoising_steps, 0.0, 0.0
        self.compiling = False  # the first step compiles attention kernels

    def describe(self) -> str:
        s = self.stage
        attention = "CLEAR" if s.clear else "full attention"
        attention += f", {s.guide} guidance" if s.guide != "none" else ""
        attention += ", DyPE" if s.dype else ""
        return f"{self.label}: {s.width}x{s.height}, {attention}, {self.total} step{'s' * (self.total > 1)}"

    def add(self, done: int, total: int, seconds: float) -> None:
        self.done, self.total = done, total
        if done == 1:
            self.first_s = seconds
        else:
            self.warm_s += seconds

    def status(self) -> str:
        """'step 3/14: 0.80 s/step, 8.8 s left', or the first step's seconds when it compiled."""
        head = f"step {self.done}/{self.total}"
        if self.done == 1 and self.compiling:
            return f"{head}: {duration(self.first_s)}, compilation included"
        rate = self.warm_s / (self.done - 1) if self.done > 1 else self.first_s
        left = "done" if self.done >= self.total else f"{duration(rate * (self.total - self.done))} left"
        return f"{head}: {rate:.2f} s/step, {left}"


class Lines:
    """Plain progress lines, for a stderr that is not a terminal."""

    def __init__(self, console: Console):
        self.console, self.stage, self.last_line = console, None, 0.0

    def print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def phase(self, name: str, detail: str) -> None:
        if name == "compile" and self.stage is not None:
            self.stage.compiling = True
        self.print(PHASES[name].format(detail))

    def phase_done(self, name: str, seconds: float) -> None:
        if name == "load":
            self.print(f"loaded in {duration(seconds)}")

    def stage_start(self, i: int, n: int, stage: Stage) -> None:
        self.stage = StageProgress(i, n, stage)
        self.print(self.stage.describe())

    def step(self, done: int, total: int, seconds: float) -> None:
        self.stage.add(done, total, seconds)
        now = time.monotonic()
        if done in (1, total) or now - self.last_line >= LINE_EVERY_S:
            self.print(f"{self.stage.label} {self.stage.status()}")
            self.last_line = now

    def close(self) -> None:
        pass


class Bars(Lines):
    """Rich progress bars for every phase and stage, on a terminal; they vanish when done."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__(console)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            redirect_stdout=False,  # stdout is for --json alone, even while the bars run
        )
        self.tasks: dict[str, int] = {}  # phase or "stage" -> task id
        self.live = False

    def print(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def _add(self, key: str, description: str, total: int | None) -> None:
        if not self.live:
            self.progress.start()  # not before: an early error stays one line
            self.live = True
        self._remove(key)
        self.tasks[key] = self.progress.add_task(description, total=total, status="")

    def _remove(self, key: str) -> None:
        if key in self.tasks:
            self.progress.remove_task(self.tasks.pop(key))

    def phase(self, name: str, detail: str) -> None:
        if name == "compile" and self.stage is not None:
            self.stage.compiling = True
        self._add(name, PHASES[name].format(detail), None)

    def phase_done(self, name: str, seconds: float) -> None:
        self._remove(name)

    def stage_start(self, i: int, n: int, stage: Stage) -> None:
        self.stage = StageProgress(i, n, stage)
        self._add("stage", self.stage.describe(), self.stage.total)

    def step(self, done: int, total: int, seconds: float) -> None:
        self.stage.add(done, total, seconds)
        self.progress.update(self.tasks["stage"], completed=done, total=total, status=self.stage.status())

    def close(self) -> None:
        if self.live:
            self.progress.stop()


class GenerateDisplay:
    """Progress on stderr (bars on a terminal, lines otherwise), a timing table per image; JSON on stdout."""

    def __init__(self, console: Console, as_json: bool):
        self.as_json = as_json
        self.view = Bars(console) if console.is_terminal else Lines(console)
        self.started = time.perf_counter()

    def __enter__(self) -> GenerateDisplay:
        return self

    def __exit__(self, *exc) -> None:
        self.view.close()

    def hooks(self) -> Hooks:
        from ..run.render import Hooks

        v = self.view
        return Hooks(
            note=lambda text: v.print(f"note: {text}"),
            phase=v.phase,
            phase_done=v.phase_done,
            stage_start=v.stage_start,
            step=v.step,
            saved=self._saved,
            image_done=self._done,
        )

    def _saved(self, path: Path, seconds: float) -> None:
        self.view.print(f"saved {path} ({duration(seconds)})")

    def _done(self, result: ImageResult) -> None:
        if self.as_json:
            print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
        t = result.timing
        ranks = f"; {t.parallel} mode, {t.gpus} GPUs" if t.gpus > 1 else ""
        title = f"{result.path}  (seed {result.record.seed}{ranks})"
        self.view.console.print(timing_table(t, title))

    def summary(self, results: list[ImageResult]) -> None:
        """Under torchrun's data mode, one line for the whole batch once every image's table is out."""
        if len(results) < 2 or results[0].timing.parallel != "data":
            return
        seconds = time.perf_counter() - self.started
        n, gpus = len(results), results[0].timing.gpus
        self.view.print(
            f"{n} images on {gpus} GPUs (data mode) in {duration(seconds)}: {n / seconds * 60:.1f} a minute"
        )


COLUMNS = ("part", "attention", "steps", "warm-up", "s/step", "full", "speedup", "density", "seconds")
LEGEND = (
    "warm-up: the first step's seconds beyond a warm step's (compiling); s/step, full (full attention's "
    "s/step) and speedup: warm steps; ~: composed from timed attention ops (the CLEAR step less its CLEAR "
    "attention plus stock attention); *: estimated from FLOPs"
)
PEAK_COLUMN, PEAK_LEGEND = (
    "peak GB",
    "; peak GB: GPU memory allocated at most (reserved), denoising and decoding",
)
CACHE_LEGEND = "; skipped: block evaluations the step cache (--cache) skipped / all, s/step their mean"


SEQUENCE_LEGEND = (
    "; sequence mode: a CLEAR stage's s/step is the {gpus} GPUs' step, its full and speedup against one GPU "
    "(measured, or ~ or * from the step's GPU-seconds); stock stages run whole on each GPU"
)


def seconds(value: float | None) -> str:
    """Three significant digits or so: '0.0123', '0.81', '25.3', '140'; n/a for None."""
    if value is None:
        return "n/a"
    digits = 3 if abs(value) < 0.1 else 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f}"


def _stage_cells(t: StageTiming) -> list[str]:
    """attention, steps, warm-up, s/step, full, speedup, density."""
    est = "*" if t.full_estimated else "~" if t.full_composed else ""
    if t.attention == "full":
        full = speed = density = "-"
    else:
        full = "-" if t.full_step_s is None else f"{seconds(t.full_step_s)}{est}"
        if t.full_step_s is None:
            speed = "-"
        else:  # n/a: one step, so no warm step to compare
            speed = "n/a" if t.speedup is None else f"{t.speedup:.2f}x{est}"
        density = f"{t.density:.1%}"
    attention = f"{t.attention} on {t.gpus} GPUs" if t.gpus > 1 else t.attention
    return [attention, str(t.steps), seconds(t.warmup_s), seconds(t.step_s), full, speed, density]


def _peak(t: StageTiming) -> str:
    """'12.3 (14.0)': allocated (reserved); '(14.0)' on MPS, which keeps only its driver's pool."""
    if t.peak_reserved_gb is None:
        return "-"
    allocated = "" if t.peak_allocated_gb is None else f"{t.peak_allocated_gb:.1f} "
    return f"{allocated}({t.peak_reserved_gb:.1f})"


def timing_table(timing: RunTiming, title: str) -> Table:
    """Every part of an image's wall time, one row each; its stages (by size) with per-step figures, their
    GPU memory peaks when they ran on a GPU, and the blocks a step cache skipped."""
    peaks = any(t.peak_reserved_gb is not None for t in timing.stages)
    cached = any(t.block_evals for t in timing.stages)  # --cache: a column of skipped block evaluations
    extra = (*([PEAK_COLUMN] if peaks else []), *(["skipped"] if cached else []))
    columns = (*COLUMNS[:-1], *extra, COLUMNS[-1])
    sequence = timing.gpus > 1 and timing.parallel == "sequence"
    caption = LEGEND + (PEAK_LEGEND if peaks else "") + (CACHE_LEGEND if cached else "")
    caption += SEQUENCE_LEGEND.format(gpus=timing.gpus) if sequence else ""
    table = Table(
        title=escape(title),
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("part", "attention") else "right")
    blank = [""] * (len(columns) - 2)
    parts = [("load", timing.load_s), ("encode", timing.encode_s)] if timing.load_s or timing.encode_s else []
    for name, value in parts:
        table.add_row(name, *blank, seconds(value))
    for t in timing.stages:
        skipped = [f"{t.blocks_skipped}/{t.blocks_skipped + t.block_evals}"] if cached else []
        peak = [_peak(t)] if peaks else []
        table.add_row(f"{t.width}x{t.height}", *_stage_cells(t), *peak, *skipped, seconds(t.seconds))
    parts = [("full attn", timing.compare_s)] if timing.compare_s else []
    parts += [("decode", timing.decode_s)] if timing.decode_s else []  # 0: a record from before decode_s
    parts += [("save", timing.save_s)]
    other = timing.other_s
    parts += [("other", other)] if other is not None and abs(other) >= 0.05 else []
    for name, value in parts:
        if value is not None:
            table.add_row(name, *blank, seconds(value))
    if timing.total_s is not None:
        table.add_row("total", *blank, seconds(timing.total_s), style="bold")
    return table


# ---------------------------------------------------------------- --dry-run


PLAN_COLUMNS = (
    "stage",
    "tokens",
    "attention",
    "density",
    "steps",
    "weights",
    "activations",
    "VAE",
    "peak GB",
    "time",
)


def plan_table(plan: RunPlan, label: str = "") -> Table:
    """A run's memory plan, one row per stage (memory.py); every figure an estimate."""
    gpu, on_gpu = ("GPU ", "on the GPU ") if plan.gpu and not plan.unified else ("", "")
    where = f"{plan.device if plan.gpu else 'the CPU'}, {plan.free_gb:.1f} GB free"
    quantized = f", --quantize {plan.quantize}" if plan.quantize != "none" else ""
    quantized += f", --quantize-text {plan.quantize_text}" if plan.quantize_text != "none" else ""
    title = (
        f"{label + ': ' if label else ''}plan for {where}: {plan.dtype}{quantized}, --offload {plan.offload}"
    )
    table = Table(
        title=escape(title),
        title_justify="left",
        caption=f"GB: estimated {gpu}memory (weights {on_gpu}while denoising, one step's activations, the "
        "VAE's, in exact or fast tiles when so); time: estimated denoising",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    for col in PLAN_COLUMNS:
        table.add_column(col, justify="left" if col in ("stage", "attention") else "right")
    for s in plan.stages:
        weights, acts, vae, peak = (f"{v:.1f}" for v in (s.weights_gb, s.activations_gb, s.vae_gb, s.peak_gb))
        vae += "" if s.vae_tiles == "off" else f" {s.vae_tiles}"
        size, time_s = f"{s.width}x{s.height}", f"~{duration(s.time_s)}"
        table.add_row(size, f"{s.tokens:,}", s.attention, f"{s.density:.1%}", str(s.steps), weights, acts,
                      vae, peak, time_s)  # fmt: skip
    return table


def plan_lines(plan: RunPlan) -> list[str]:
    """The decision, the peak (before and after feed-forward chunking), the time, whether it fits, and
    any device problem or assumption, one line each (rich markup)."""
    lines = [escape(plan.offload_line())]
    rate = f"{plan.rate_tflops:.3g} TFLOP/s, {plan.rate_source}"
    time_line = f"time: ~{duration(plan.time_s)} of denoising (estimate: FLOP model at {escape(rate)})"
    unchunked = plan.ff_chunk and plan.unchunked_peak_gb > plan.peak_gb
    chunking = f" ({plan.unchunked_peak_gb:.1f} GB without feed-forward chunking)" if unchunked else ""
    lines += [
        f"peak: {plan.peak_gb:.1f} GB{chunking}; encoding the prompts: {plan.encode_gb:.1f} GB",
        time_line,
    ]
    if plan.lora_gb:
        lines.append(f"LoRAs: {plan.lora_gb:.2f} GB of weights, beside the transformer's")
    if plan.controlnet_gb:
        lines.append(
            f"ControlNet: {plan.controlnet_gb:.1f} GB of weights; its residuals count in the activations"
        )
    if plan.fits:
        lines.append(f"[green]fits[/green] (peak + {plan.headroom:.0%} within {plan.free_gb:.1f} GB free)")
    elif plan.fits_any:
        lines.append("[yellow]does not fit as asked[/yellow]: --offload auto or sequential fits")
    else:
        lines.append(f"[red]does not fit[/red]: {escape(plan.cannot_fit_line())}")
    lines += [f"[yellow]problem:[/yellow] {escape(p)}" for p in plan.problems]
    lines += [f"[dim]note: {escape(n)}[/dim]" for n in plan.notes]
    return lines
