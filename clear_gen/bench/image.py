"""`clear-gen bench --what image`: one whole image, generate's own code path, on random weights.

A FluxPipeline is built in memory from random parts (random_flux.build_pipeline): FLUX.1-dev's
transformer and VAE at full size unless shrunk (--layers, --heads, --head-dim, --vae-channels), tiny
random text encoders (their cost is negligible next to an 8K step, and real tokenizers cannot be fetched
offline) and FLUX.1-dev's scheduler. `pipeline.generate` then runs on it as on the real weights: the
first pass, the SDEdit stages with CLEAR, VAE decode with tiling, the PNG save (into a temporary
folder), timing full attention at each CLEAR size (measured when cheap, else composed from timed
attention ops: `composed`, else the FLOP model: `est.`).

One row per stage as it lands, then one for the whole image (`stage: "all"`) whose parts (build, load,
encode, each stage's steps and decode, full-attention timing, save, other) add up to its wall time. With
fewer steps a stage than the recipe's 20 (`--steps 5` fits a GPU session), the whole image at the recipe's
steps is extrapolated at the measured s/step and labelled (`recipe_image_s`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from ..core.clock import now
from ..core.device import device_name, peak_memory, reset_peak_memory, resolve_device, resolve_dtype
from ..errors import ConfigError
from ..files.record import RunTiming, StageTiming
from ..models.flux1.random import VAE_TILE, build_pipeline, check_vae_channels, flux_shape
from ..plan.parse import parse
from ..plan.spec import GenerateOptions, OutputSpec, RunSpec
from ..run.generate import Hooks, generate
from .spec import BenchSpec

IMAGE_KEYS = (
    "what", "stage", "res", "steps", "step_s", "compile_s", "decode_s", "total_s", "full_step_s",
    "peak_mem_mb", "device",
)  # fmt: skip
PROMPT = "a lighthouse on a cliff at dawn"  # what the tiny random text encoders make of it does not matter
GPU_RES, CPU_RES = 8192, 1024  # the target without --res
RECIPE_STEPS = 20  # generate's steps a stage: a run with fewer is extrapolated to it (`recipe_image_s`)


def run(spec: BenchSpec, progress: Callable[[str], None] | None = None, on_row=None) -> list[dict]:
    """Rows of one image at `res` (one size: the target) made by generate on random weights; see the
    module docstring. `steps`: every stage's (default 20, as generate); `stages`: long sides, as
    generate's --stages. CLEAR (the spec's window) at every size: generate's SDEdit stages use it; its
    first pass, full attention, stays."""
    say, emit, o = progress or (lambda _msg: None), on_row or (lambda _row: None), spec.asked
    started = time.perf_counter()
    # 1. Everything generate would refuse, refused now, before gigabytes of weights are made (a
    #    --quantize this device cannot run: by parse_bench).
    dev = resolve_device(o.device)
    dt = resolve_dtype(o.dtype, dev)
    run_spec = parse(_options(spec, dev, dt))
    recipe_steps = [replace(s, steps=RECIPE_STEPS).denoising_steps for s in run_spec.stages]
    shape = flux_shape(spec.heads, spec.head_dim, o.layers)
    channels = spec.vae_channels
    check_vae_channels(channels)
    # 2. The random pipeline, then generate on it.
    say(f"building FLUX.1-dev-shaped random weights on {device_name(dev)}: {shape.layers} layers, "
        f"{shape.heads} x {shape.head_dim} heads, VAE {channels} channels, tiny text encoders")  # fmt: skip
    pipe = build_pipeline(shape, dev, dt, channels)
    build_s = now(dev) - started
    base = _base(run_spec, shape, dev, dt, channels)
    rows = _Rows(base, dev, emit, say)
    with tempfile.TemporaryDirectory(prefix="clear-gen-bench-") as out:
        (result,) = generate(replace(run_spec, output=OutputSpec(out)), rows.hooks(), pipe=pipe)
    wall = time.perf_counter() - started
    total = _total_row(base, result.timing, build_s, wall, rows.peaks)
    recipe = _recipe(total["image_s"], rows.rows, recipe_steps)
    rows.add({**total, **recipe, "steps_per_stage": run_spec.asked.steps})
    return rows.rows


def _options(spec: BenchSpec, dev: torch.device, dtype: torch.dtype) -> GenerateOptions:
    """GenerateOptions of the benchmarked image: a custom CLEAR window (no checkpoint to fetch)."""
    o = spec.asked
    if o.res is not None and len(o.res) != 1:
        raise ConfigError("--what image makes one image: give one --res (the target; --stages for the rest)")
    target = o.res[0] if o.res else (CPU_RES if dev.type == "cpu" else GPU_RES)
    steps = 20 if o.steps is None else o.steps
    return GenerateOptions(
        prompts=[PROMPT],
        width=target,
        height=target,
        model="random",
        window=spec.window,
        down_factor=spec.down_factor,
        stages=list(o.stages) if o.stages else None,
        steps=steps,
        first_steps=steps,
        seeds=[0],
        max_sequence_length=o.text_len,
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        backend=spec.backends[0],
        compare_full=o.compare_full,
        compile=spec.compile,
        cache=o.cache or "none",
        quantize=spec.quantize,
        vae_tiling=o.vae_tiling or "auto",
        vae_tile=VAE_TILE,  # the random VAE's sample size (there are no shapes of "random" to read it from)
    )  # fmt: skip  (quantize: applied to the built pipeline by loading.prepared_pipeline)


def _base(spec: RunSpec, shape, dev, dt, vae_channels: int) -> dict:
    import diffusers

    opts = spec.asked
    return {
        "what": "image", "window": opts.window, "down_factor": opts.down_factor,
        "layers": shape.layers, "heads": shape.heads, "head_dim": shape.head_dim,
        "dtype": str(dt).removeprefix("torch."), "device": device_name(dev), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "compile": opts.compile, "cache": str(spec.settings.cache),
        "quantize": opts.quantize,
        "vae_channels": vae_channels, "text_encoders": "tiny random", "text_len": opts.max_sequence_length,
    }  # fmt: skip


class _Rows:
    """The rows as they land: one per stage once decoded, with the stage's peak GPU memory (its steps
    and decode; not the full-attention timing, which is another model's memory)."""

    def __init__(self, base: dict, dev: torch.device, emit: Callable[[dict], None], say):
        self.base, self.dev, self.emit, self.say = base, dev, emit, say
        self.rows: list[dict] = []
        self.peaks: list[float | None] = []
        self._peak = None
        self._vae = "off"  # the running stage's VAE tiling: "exact 1024" (tiles of 1024 px) or "off"

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.emit(row)

    def _reset(self) -> None:
        reset_peak_memory(self.dev)

    def _read(self) -> float | None:
        """MB: CUDA's peak allocated, MPS's driver pool; None on the CPU."""
        allocated, reserved = (None, None) if self.dev.type == "cpu" else peak_memory(self.dev)
        peak = allocated if allocated is not None else reserved
        return None if peak is None else max(self._peak or 0.0, peak * 1e9 / 2**20)

    def hooks(self) -> Hooks:
        def phase(name: str, detail: str) -> None:
            if name == "compare":
                self._peak = self._read()
            self.say(f"{name} {detail}")

        def phase_done(name: str, seconds: float) -> None:
            if name == "compare":
                self._reset()

        def stage_start(i: int, n: int, stage) -> None:
            self._peak = None
            self._vae = stage.vae_tiles if stage.vae_tiles == "off" else f"{stage.vae_tiles} {stage.vae_tile}"
            self._reset()
            self.say(f"stage {i + 1}/{n}: {stage.width}x{stage.height}, {stage.denoising_steps} steps")

        def stage_done(i: int, timing: StageTiming) -> None:
            self.peaks.append(self._read())
            self.add(_stage_row(self.base, i, timing, self.peaks[-1], self._vae))

        return Hooks(phase=phase, phase_done=phase_done, stage_start=stage_start, stage_done=stage_done)


def _stage_row(base: dict, i: int, t: StageTiming, peak: float | None, vae: str) -> dict:
    """A stage's row; `vae`: the tiling it decoded with ("exact 1024": exact tiles of 1024 px, or "off")."""
    return {
        **base, "stage": i + 1, "res": max(t.width, t.height), "width": t.width, "height": t.height,
        "tokens": base["text_len"] + (t.width // 16) * (t.height // 16), "attention": t.attention,
        "vae_tiling": vae,
        "steps": t.steps, "step_s": t.step_s, "compile_s": t.warmup_s, "seconds": t.seconds,
        "decode_s": t.decode_s, "compare_s": t.compare_s, "total_s": t.seconds + t.decode_s,
        "full_step_s": t.full_step_s, "full_estimated": t.full_estimated, "full_composed": t.full_composed,
        "speedup": t.speedup, "peak_mem_mb": peak, "block_evals": t.block_evals,
        "blocks_skipped": t.blocks_skipped,
    }  # fmt: skip


def _recipe(image_s: float, stage_rows: list[dict], recipe_steps: list[int]) -> dict:
    """The image as generate makes it by default (RECIPE_STEPS a stage: 20 at the first pass, 14 in an SDEdit
    stage), extrapolated from this one at each stage's measured warm s/step: `recipe_image_s` is `image_s`
    plus the steps this run left out (None when a stage had no warm step)."""
    if any(row["step_s"] is None for row in stage_rows):
        return {"recipe_steps": RECIPE_STEPS, "recipe_image_s": None}
    extra = sum((n - row["steps"]) * row["step_s"] for row, n in zip(stage_rows, recipe_steps, strict=True))
    return {"recipe_steps": RECIPE_STEPS, "recipe_image_s": image_s + extra}


def _total_row(base: dict, timing: RunTiming, build_s: float, wall: float, peaks: list) -> dict:
    """The whole image: its parts, `other_s` what none of them timed; `image_s` what generate took for it
    with the weights in place and without timing full attention, and `full_image_s` the same stages with
    full attention (each CLEAR stage's steps at the full-attention rate), when that was timed."""
    stages = timing.stages
    parts = build_s + timing.load_s + timing.encode_s + timing.compare_s + (timing.save_s or 0.0)
    parts += sum(t.seconds + t.decode_s for t in stages)
    image_s = wall - build_s - timing.compare_s
    full_image_s = None
    if all(t.full_step_s is not None and t.step_s is not None for t in stages):
        full_image_s = image_s + sum((t.full_step_s - t.step_s) * t.steps for t in stages)
    known_peaks = [p for p in peaks if p is not None]
    last = stages[-1]
    return {
        **base, "stage": "all", "res": max(last.width, last.height), "width": last.width,
        "height": last.height, "tokens": base["text_len"] + (last.width // 16) * (last.height // 16),
        "attention": " + ".join(dict.fromkeys(t.attention for t in stages)),
        "steps": sum(t.steps for t in stages), "step_s": None,
        "compile_s": sum(t.warmup_s or 0.0 for t in stages), "seconds": sum(t.seconds for t in stages),
        "decode_s": timing.decode_s, "compare_s": timing.compare_s, "total_s": wall, "build_s": build_s,
        "load_s": timing.load_s, "encode_s": timing.encode_s, "save_s": timing.save_s,
        "other_s": wall - parts, "image_s": image_s, "full_step_s": None, "full_image_s": full_image_s,
        "full_estimated": any(t.full_estimated for t in stages),
        "full_composed": any(t.full_composed for t in stages),
        "speedup": full_image_s / image_s if full_image_s else None,
        "peak_mem_mb": max(known_peaks) if known_peaks else None,
        "vae_tiling": None, "block_evals": sum(t.block_evals for t in stages),
        "blocks_skipped": sum(t.blocks_skipped for t in stages),
    }  # fmt: skip
