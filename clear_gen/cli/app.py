"""The `clear-gen` command line: parse, call one library function, print.

User errors (ClearGenError) become one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core import launch
from ..errors import ClearGenError, ConfigError, OutputError, ParallelError
from ..files.record import describe, record_from_image
from ..version import __version__
from . import options

if TYPE_CHECKING:
    from ..weights.hub import Fetched

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="FLUX.1 at 2K-8K with CLEAR local attention. `clear-gen PROMPT` is `clear-gen generate PROMPT`.",
)
err = Console(  # emoji=False: a user's ":abc:" (e.g. a --lora scale) is text, not an emoji code
    stderr=True, highlight=False, emoji=False, width=None if sys.stderr.isatty() else 160
)  # tables unclipped in logs


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _app_options(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    pass  # the app's help is Typer(help=...) above; this callback only carries --version


@app.command()
def version() -> None:
    """Print the clear-gen version."""
    print(__version__)


@app.command()
def info(
    image: Path = typer.Argument(..., help="A PNG made by clear-gen."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as one JSON object."),
) -> None:
    """Show the prompt, seed and settings stored in a clear-gen PNG."""
    record = record_from_image(image)
    if as_json:
        print(json.dumps(record.to_dict(), ensure_ascii=False, default=str))
        return
    from ..files.record import RunTiming
    from .display import timing_table

    table = Table(title=escape(str(image)), show_header=False, title_justify="left")
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in describe(record):
        table.add_row(name, escape(value))
    try:
        timing = RunTiming.from_json(record.timings)
    except (TypeError, KeyError, AttributeError):  # not a RunTiming (an older clear-gen): shown as is
        timing = None
        if record.timings:
            table.add_row("timings", escape(json.dumps(record.timings)))
    console = Console(highlight=False, emoji=False)
    console.print(table)
    if timing is not None:
        console.print(timing_table(timing, "timings"))


@app.command()
@options.with_options(
    options.size_options,
    options.attention_options,
    options.recipe_options,
    options.control_options,
    options.output_options,
)
def generate(
    prompt: str = typer.Argument(None, help="What to draw.", show_default=False),
    seed: list[int] = typer.Option(
        None,
        help="Seed; repeat for several images.",
        show_default="random",
        metavar="INT",
        rich_help_panel=options.PROMPTS,
    ),
    count: int = typer.Option(
        None,
        help="Images per prompt, random seeds.",
        show_default=str(options.DEFAULTS.count),
        rich_help_panel=options.PROMPTS,
    ),
    prompts_file: Path = typer.Option(
        None, help="One prompt a line; lines starting with # are comments.", rich_help_panel=options.PROMPTS
    ),
    from_image: Path = typer.Option(
        None,
        "--from",
        help="Re-run what a clear-gen PNG stores; options given win.",
        rich_help_panel=options.PROMPTS,
    ),
    **recipe: Any,
) -> None:
    """Generate 2K-8K images: a full-attention first pass, then SDEdit stages with CLEAR."""
    from ..run.generate import generate

    # 1. Parse: explicit flags win over --from, which wins over the defaults.
    as_json = recipe.pop("as_json")
    opts = options.generate_options(
        recipe,
        from_image,
        prompts=options.prompt_list(prompt, prompts_file) or None,
        seeds=list(seed or []) or None,
        count=count,
    )
    if recipe["dry_run"]:
        from ..plan.memory import plan_run

        _print_plans([("", plan_run(opts))], as_json)
        return
    # 2. Generate, showing progress and a timing table on stderr, JSON on stdout (under torchrun: rank 0).
    from .display import GenerateDisplay

    with GenerateDisplay(err, as_json) as display:
        display.summary(generate(opts, display.hooks()))


def _print_plans(plans: list, as_json: bool) -> None:
    """--dry-run: each (label, RunPlan) as a table and its decision lines, or one JSON object a line."""
    if as_json:
        for label, plan in plans:
            print(json.dumps({**({"variant": label} if label else {}), **plan.to_json()}), flush=True)
        return
    from .display import plan_lines, plan_table

    console = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)
    for label, plan in plans:
        console.print(plan_table(plan, label))
        for line in plan_lines(plan):
            console.print(line, soft_wrap=True)


@app.command()
@options.with_options(
    options.attention_options, options.recipe_options, options.control_options, options.output_options
)
def upscale(
    args: list[str] = typer.Argument(
        ...,
        help="Image files or folders (PNG, JPEG, WebP), and the prompt if you give one.",
        metavar="IMAGE... [PROMPT]",
    ),
    prompt: str = typer.Option(
        None,
        help="The prompt.",
        show_default="the picture's metadata, else none",
        rich_help_panel=options.PROMPTS,
    ),
    res: int = typer.Option(None, help="Long side of the result in px.", rich_help_panel=options.SIZE),
    scale: float = typer.Option(
        None, help="Factor, aspect ratio kept.", show_default="2", rich_help_panel=options.SIZE
    ),
    width: int = typer.Option(None, help="Width in px (aspect kept if alone).", rich_help_panel=options.SIZE),
    height: int = typer.Option(
        None, help="Height in px (aspect kept if alone).", rich_help_panel=options.SIZE
    ),
    stages: str = typer.Option(
        None,
        help="Long sides after the picture, e.g. 2048,4096.",
        show_default="target",
        rich_help_panel=options.SIZE,
    ),
    seed: list[int] = typer.Option(
        None,
        help="Seed; repeat for several results.",
        show_default="random",
        metavar="INT",
        rich_help_panel=options.PROMPTS,
    ),
    count: int = typer.Option(
        None, help="Results per picture, random seeds.", rich_help_panel=options.PROMPTS
    ),
    **recipe: Any,
) -> None:
    """Upscale existing pictures to 2K-8K: SDEdit stages with CLEAR, as generate's after its first pass."""
    from ..files.source import UpscaleTarget, split_arguments
    from ..run.generate import upscale as run_upscale
    from .display import GenerateDisplay

    # 1. Parse: which arguments are pictures, the prompt, the size, the recipe.
    inputs, text = split_arguments(args, prompt)
    as_json = recipe.pop("as_json")
    opts = options.generate_options(
        {**recipe, "stages": stages},
        prompts=[text] if text else [],
        seeds=list(seed or []) or None,
        count=count,
    )
    target = UpscaleTarget(res=res, scale=scale, width=width, height=height)
    if recipe["dry_run"]:
        from ..run.generate import upscale_plans

        _print_plans(upscale_plans(opts, inputs, target), as_json)
        return
    # 2. Upscale, showing progress and a timing table on stderr, JSON on stdout.
    with GenerateDisplay(err, as_json) as display:
        run_upscale(opts, inputs, target, display.hooks())


@app.command()
@options.with_options(options.size_options, options.recipe_options, options.control_options)
def compare(
    prompt: str = typer.Argument(..., help="What to draw."),
    variants: str = typer.Option(
        None,
        help="Comma-separated: registry names, none (full attention), published CLEAR files "
        "(default none,r8-down4). The reference is none, else the first.",
    ),
    seed: int = typer.Option(None, help="Seed of every variant (default: random, printed)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory (default: here)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per variant on stdout."),
    **recipe: Any,
) -> None:
    """Same prompt, seed and recipe with each variant: PNGs, a grid, PSNR and SSIM to the reference."""
    from dataclasses import replace

    from ..run import compare as C

    # 1. Parse and check every variant before anything loads (--dry-run: plan each, load nothing).
    if launch.rank() is not None:
        raise ConfigError("compare runs in one process: launch it without torchrun")
    seeds = [seed] if seed is not None else None
    opts = options.generate_options(recipe, prompts=[prompt], seeds=seeds, out=out, compare_full=False)
    names = variants.split(",") if variants is not None else None
    if recipe["dry_run"]:
        _print_plans(C.memory_plans(opts, names), as_json)
        return
    plan = C.prepare(opts, names)
    # 2. Say what will run: the seed when it was picked, and what full attention costs.
    if seed is None:
        err.print(f"seed {plan.seed} (picked at random; --seed {plan.seed} repeats this comparison)")
    cost = C.full_attention_cost(plan)
    if cost is not None:
        err.print(_full_cost_line(cost), soft_wrap=True)
    # 3. Generate each variant, then score and draw the grid.
    from .display import GenerateDisplay

    with GenerateDisplay(err, as_json=False) as display:
        hooks = replace(display.hooks(), image_done=lambda r: None)  # saved lines, then one table at the end
        n = len(plan.variants)
        result = C.run(
            plan, hooks, lambda i, v: err.print(f"[bold]variant {i + 1}/{n}: {escape(v.name)}[/bold]")
        )
    # 4. Print: a table and the LPIPS note on stderr, JSON lines on stdout.
    err.print(_compare_table(result))
    err.print(f"[dim]{escape(result.lpips_note)}[/dim]", soft_wrap=True)
    if as_json:
        for row in result.to_json():
            print(json.dumps(row, ensure_ascii=False, allow_nan=False), flush=True)


def _full_cost_line(cost) -> str:
    """What the full-attention reference costs per step; a warning with the way out when it is much more."""
    flops = (
        f"{cost.full_flops / 1e15:.1f} PFLOP"
        if cost.full_flops >= 1e15
        else f"{cost.full_flops / 1e12:.1f} TFLOP"
    )
    line = (
        f"full attention (none) at {cost.width}x{cost.height}: {flops} a step, {cost.ratio:.1f}x a "
        f"{escape(cost.against)} step (FLUX.1 FLOP model)"
    )
    if cost.ratio < 2:
        return f"[dim]{line}[/dim]"
    return (
        f"[yellow]{line}; leave none out of --variants to skip it (the first is then the reference)[/yellow]"
    )


def _compare_table(result) -> Table:
    title = f"{result.grid}  (seed {result.plan.seed})"
    table = Table(title=escape(title), title_justify="left")
    for col in ("variant", "s/step", "total s", "PSNR dB", "SSIM", "LPIPS", "file"):
        table.add_column(col, justify="left" if col in ("variant", "file") else "right", overflow="fold")
    for row in result.rows:
        psnr = "ref" if row.reference else ("same" if row.identical else f"{row.psnr:.2f}")
        lpips = "-" if row.lpips is None else f"{row.lpips:.4f}"
        cells = (row.variant.short, row.step_text(), f"{row.seconds:.1f}", psnr, f"{row.ssim:.4f}", lpips)
        table.add_row(*map(escape, cells), escape(row.image.path.name))
    return table


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _weights_table(rows: list[Fetched], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("name", "kind", "source", "size", "path"):
        table.add_column(column, overflow="fold")
    for r in rows:
        size = _human_size(r.size) if r.path else "-"
        table.add_row(r.name, r.kind, r.source, size, str(r.path) if r.path else "[dim]not cached[/dim]")
    return table


@app.command()
def download(
    variants: list[str] = typer.Argument(None, help="Variant names (default: the default variant)."),
    all_variants: bool = typer.Option(False, "--all", help="Every variant in weights.toml."),
    base: str = typer.Option(None, "--base", help="Base name (dev, schnell) or Hub repo id."),
    no_base: bool = typer.Option(False, "--no-base", help="Only the CLEAR checkpoints."),
    controlnet: list[str] = typer.Option(
        None, "--controlnet", help="A ControlNet (registry name or Hub repo); repeatable. Alone: only it."
    ),
    token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
) -> None:
    """Download CLEAR weights and their FLUX.1 base (and ControlNets) into the Hugging Face cache; re-runs
    transfer nothing."""
    from ..weights.hub import download as fetch
    from ..weights.hub import plan_download
    from ..weights.registry import load_registry

    nets = list(controlnet or [])
    names, bases = plan_download(variants or [], all_variants, base, no_base, load_registry(), nets)
    rows = fetch(names, bases, token=token, controlnets=nets)
    Console().print(_weights_table(rows, "Downloaded"))


@app.command()
def weights() -> None:
    """The weights registry (weights.toml) and what of it is already cached."""
    from ..weights.hub import status
    from ..weights.registry import load_registry

    registry = load_registry()
    cached = {(r.kind, r.name): r for r in status(registry)}
    repos = {v.repo for v in registry.variants.values()}
    one_repo = repos.pop() if len(repos) == 1 else None  # then named once, in the title
    table = Table(
        title=f"CLEAR variants ({one_repo})" if one_repo else "CLEAR variants", title_justify="left"
    )
    for column in ("name", "r", "f", "base", "file", "cached", "description"):
        table.add_column(column, overflow="fold")
    for v in registry.variants.values():
        row = cached[("variant", v.name)]
        name = f"{v.name} (default)" if v.name == registry.default_variant else v.name
        where = _human_size(row.size) if row.path else "[dim]no[/dim]"
        file = v.filename if one_repo else f"{v.repo}/{v.filename}"
        table.add_row(name, str(v.window), str(v.down_factor), v.base, file, where, v.description)
    bases = Table(title="Bases", title_justify="left")
    for column in ("name", "repo", "gated", "cached", "description"):
        bases.add_column(column, overflow="fold")
    for b in registry.bases.values():
        row = cached[("base", b.name)]
        where = _human_size(row.size) if row.path else "[dim]no[/dim]"
        bases.add_row(b.name, b.repo, "yes" if b.gated else "no", where, b.description)
    console = Console()
    console.print(table)
    console.print(bases)
    if registry.controlnets:
        console.print(_controlnets_table(registry, cached))


def _controlnets_table(registry, cached: dict) -> Table:
    table = Table(title="ControlNets (--controlnet NAME)", title_justify="left")
    for column in ("name", "repo", "modes", "scale", "base", "cached", "description"):
        table.add_column(column, overflow="fold")
    for c in registry.controlnets.values():
        row = cached[("controlnet", c.name)]
        where = _human_size(row.size) if row.path else "[dim]no[/dim]"
        modes = ", ".join(c.modes) or "-"
        table.add_row(c.name, c.repo, modes, f"{c.scale:g}", c.base, where, c.description)
    return table


@app.command()
def bench(
    what: str = typer.Option(
        "plan",
        help="plan (FLOPs, no compute), attention, step or image (a whole one).",
        rich_help_panel=options.WHAT,
    ),
    res: str | None = typer.Option(
        None,
        help="Image sides in px, comma-separated.",
        show_default="1K-8K; 1K on a CPU",
        rich_help_panel=options.WHAT,
    ),
    variant: str | None = typer.Option(
        None,
        help="A variant (clear-gen weights): sets r and f.",
        show_default="r8-down4",
        rich_help_panel=options.WHAT,
    ),
    window: int | None = typer.Option(None, help="CLEAR window r, in tokens.", rich_help_panel=options.WHAT),
    down_factor: int | None = typer.Option(
        None,
        help="CLEAR down factor f (1 = none).",
        show_default="1 with --window",
        rich_help_panel=options.WHAT,
    ),
    gpus: str | None = typer.Option(
        None,
        help="plan: head-parallel traffic at these GPU counts, e.g. 2,4,8.",
        rich_help_panel=options.WHAT,
    ),
    heads: int = typer.Option(24, help="Attention heads (2 on a CPU).", rich_help_panel=options.SHAPE),
    head_dim: int = typer.Option(
        128, help="Head dimension (64 or 32 on a CPU).", rich_help_panel=options.SHAPE
    ),
    layers: int = typer.Option(
        57, help="Blocks (step, image), 1:2 double:single.", rich_help_panel=options.SHAPE
    ),
    text_len: int = typer.Option(512, help="Text tokens.", rich_help_panel=options.SHAPE),
    vae_channels: int | None = typer.Option(
        None,
        help="image: VAE width (8 on a CPU).",
        show_default="128, FLUX.1's",
        rich_help_panel=options.SHAPE,
    ),
    stages: str | None = typer.Option(
        None,
        help="image: long side of each stage, as generate's.",
        show_default="1024,res",
        rich_help_panel=options.WHAT,
    ),
    steps: int | None = typer.Option(
        None, help="image: steps of every stage.", show_default="20", rich_help_panel=options.WHAT
    ),
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="image: compile the transformer blocks.",
        show_default="off",
        rich_help_panel=options.SPEED,
    ),
    cache: str | None = typer.Option(
        None,
        help="image: step caching, none, fbc[:T] or taylorseer[:N].",
        show_default="none",
        rich_help_panel=options.SPEED,
    ),
    quantize: str | None = typer.Option(
        None,
        help="image: transformer weights, none, fp8, fp8dq or int8.",
        show_default="none",
        rich_help_panel=options.SPEED,
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N.", rich_help_panel=options.RUN),
    dtype: str | None = typer.Option(
        None, help="bf16, fp16 or fp32.", show_default="bf16 CUDA, fp32 CPU", rich_help_panel=options.RUN
    ),
    repeats: int = typer.Option(3, help="Timed calls after a warm-up (median).", rich_help_panel=options.RUN),
    no_compare_full: bool = typer.Option(
        False, "--no-compare-full", help="Skip full attention / the stock model.", rich_help_panel=options.RUN
    ),
    measure: str = typer.Option("both", help="step: both, clear or full alone.", rich_help_panel=options.RUN),
    max_full_seconds: float | None = typer.Option(
        None, help="Estimate, not run, full-attention calls slower than this.", rich_help_panel=options.RUN
    ),
    time_budget: float | None = typer.Option(
        None, help="Seconds: estimate full attention that would end later.", rich_help_panel=options.RUN
    ),
    json_file: Path | None = typer.Option(
        None, "--json", help="Write the rows as JSON, as they land.", rich_help_panel=options.OUTPUT
    ),
    markdown: Path | None = typer.Option(
        None,
        help="Also write the table (with --jsonl: the file's report) as Markdown.",
        rich_help_panel=options.OUTPUT,
    ),
    jsonl: Path | None = typer.Option(
        None, help="Append the rows to this JSON-lines file.", rich_help_panel=options.OUTPUT
    ),
    label: str | None = typer.Option(
        None, help="Part name for --jsonl rows.", rich_help_panel=options.OUTPUT
    ),
) -> None:
    """CLEAR versus full attention on random FLUX.1-dev-shaped weights: no download needed."""
    from ..bench import report as R
    from ..bench import suite as B

    # 1. Parse: a variant, or a window (and down factor), or the registry's default variant.
    if variant is not None:
        if window is not None or down_factor is not None:
            given = f"--window {window}" if window is not None else f"--down-factor {down_factor}"
            raise ConfigError(
                f"--variant {variant} and {given} conflict: give a variant or --window/--down-factor"
            )
        window, down_factor = B.variant(variant)
    sizes = options.ints(res, "--res")
    writes = not launch.rank()  # under torchrun (step: sequence-parallel), rank 0 writes the files
    # 2. Run, saving the rows as they land (a killed run keeps what it measured).
    done: dict[int, dict] = {}

    def on_row(row: dict) -> None:
        if not writes:
            return
        done[id(row)] = row
        if json_file:
            _write_json(json_file, list(done.values()))
        if jsonl:
            R.append(jsonl, {**row, "part": label})
            if markdown:
                R.write(jsonl, markdown, f"clear-gen bench on {row['device']}")

    rows = B.run(
        what, sizes, window=window, down_factor=down_factor, device=device, dtype=dtype, repeats=repeats,
        heads=heads, head_dim=head_dim, layers=layers, text_len=text_len, compare_full=not no_compare_full,
        max_full_seconds=max_full_seconds, time_budget=time_budget, measure=measure,
        progress=lambda msg: err.print(f"[dim]{escape(msg)}[/dim]"), on_row=on_row,
        stages=options.ints(stages, "--stages"), steps=steps, vae_channels=vae_channels, compile=compile,
        cache=cache, quantize=quantize, gpus=options.ints(gpus, "--gpus", "GPU counts, e.g. 2,4,8"),
    )  # fmt: skip
    # 3. Print a table per kind of row: as wide as the terminal (or COLUMNS); piped, wide enough not to wrap.
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
    kinds = [[r for r in rows if r["what"] == what] for what in dict.fromkeys(r["what"] for r in rows)]
    for part in kinds:
        console.print(_fit(_with_legend(R.table(part)), console.width))
    if markdown and not jsonl and writes:
        _write(markdown, "\n".join(R.table_markdown(part) for part in kinds))


# Terse bench headers, explained under the table; BENCHMARKS.md has the long form.
BENCH_LEGEND = {
    "dens.": "dens.: share of (query, key) pairs CLEAR needs / its block mask computes",
    "row-major": "row-major: computed/needed with row-major tokens",
    "PF": "PF: PFLOP (1e15 FLOP) per step",
    "bound": "bound: step speedup if every FLOP ran at one rate",
    "compile s": "compile s: first call's extra time (compilation)",
    "check": "check: CLEAR against the dense reference, max error @ px",
    "(est.)": "~ (est.): from the FLOP model, not run",
    "full s/step": "full s/step: full attention's warm step at the stage's size",
    "skipped": "skipped: block evaluations the step cache skipped / all",
    "a2a GB": "a2a GB: what each GPU sends per step in sequence mode (it receives as much), s: at that link",
    "n/a": "n/a: the heads do not split over that many GPUs",
    "halo GB": "halo: bands of image rows trading r - 1 rows with their neighbours (on paper)",
}


def _with_legend(table: Table) -> Table:
    texts = [str(text) for c in table.columns for text in (c.header, *c.cells)]
    notes = [note for key, note in BENCH_LEGEND.items() if any(key in text for text in texts)]
    legend = "; ".join(notes) + ". See BENCHMARKS.md."
    table.caption = f"{table.caption}\n{legend}" if table.caption else legend  # image: its summary first
    table.caption_justify = "left"
    return table


def _fit(table: Table, width: int) -> Table:
    """`table` itself when it fits in `width` columns, else turned: one row per column, one column per row."""
    if _natural_width(table) <= width:
        return table
    columns = [[str(c.header), *map(str, c.cells)] for c in table.columns]  # columns[0]: the key (res)
    turned = Table(title=table.title, caption=table.caption, caption_justify="left", title_justify="left")
    turned.add_column(columns[0][0], style="bold")
    for key in columns[0][1:]:
        turned.add_column(key, justify="right", overflow="fold")
    for column in columns[1:]:
        turned.add_row(*column)
    if _natural_width(turned) > width:  # the names wrap between words, the figures get the room
        turned.columns[0].width = max(len(word) for column in columns for word in column[0].split())
    return turned


def _natural_width(table: Table) -> int:
    return Console(width=10_000).measure(table).maximum


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


def _write_json(path: Path, rows: list[dict]) -> None:
    _write(path, json.dumps(rows, indent=1) + "\n")


def _register_distill() -> None:
    from .distill import app as distill

    app.add_typer(distill, name="distill")


_register_distill()


def _with_default_command(argv: list[str]) -> list[str]:
    """`clear-gen "a castle" --res 2048` means `clear-gen generate "a castle" --res 2048`."""
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    commands |= {g.name for g in app.registered_groups}
    if (
        argv
        and argv[0] not in commands
        and argv[0] not in ("--help", "-h", "--version")
        and "generate" in commands
    ):
        return ["generate", *argv]
    return argv


@contextmanager
def _silenced() -> Iterator[None]:
    """Nothing printed on stdout or stderr (torchrun's ranks other than 0: rank 0 speaks for the job)."""
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        yield


def main(argv: list[str] | None = None) -> None:
    # Library chatter (import-time notes, retried-request warnings) is not for our users: errors only.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree"):  # torchao's import: CUDA extensions, torch deprecations
        logging.getLogger(name).setLevel(logging.ERROR)
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    quiet = bool(launch.rank())  # torchrun's ranks 1..: they print only a failure of their own
    try:
        # Standalone: Typer prints help and usage errors itself (exit 2); our errors come through.
        with _silenced() if quiet else nullcontext():
            app(args=argv, prog_name="clear-gen", standalone_mode=True)
    except ParallelError as e:  # one rank's own failure, or lost contact: the rank that saw it says so
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no process-group teardown: with a rank gone it can hang or abort
    except ClearGenError as e:
        # escape: a path like a[1].png is not markup; soft_wrap: one line even when longer than the terminal
        if not quiet:
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if not quiet:
            err.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
