"""The commands that make images: `generate` (also `clear-gen PROMPT`), `upscale`, `edit` and `compare`.
Each parses its arguments into GenerateOptions (options.py), calls one library function and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core import launch
from ..errors import ConfigError
from . import options
from .app import app, err


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
    """--dry-run: each (label, RunPlan) as a table and its decision lines, or one JSON object a line. Exits
    1 when a run would be refused (it cannot fit, or a device problem), as the run itself would."""
    if as_json:
        for label, plan in plans:
            print(json.dumps({**({"variant": label} if label else {}), **plan.to_json()}), flush=True)
    else:
        from .display import plan_lines, plan_table

        console = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)
        for label, plan in plans:
            console.print(plan_table(plan, label))
            for line in plan_lines(plan):
                console.print(line, soft_wrap=True)
    if any(plan.problems or not plan.fits_any for _, plan in plans):
        raise typer.Exit(1)


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
    from ..run.upscale import upscale as run_upscale
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
        from ..run.upscale import upscale_plans

        _print_plans(upscale_plans(opts, inputs, target), as_json)
        return
    # 2. Upscale, showing progress and a timing table on stderr, JSON on stdout.
    with GenerateDisplay(err, as_json) as display:
        run_upscale(opts, inputs, target, display.hooks())


@app.command()
@options.with_options(
    options.attention_options,
    options.recipe_options,
    options.output_options,
    shown={"model": "kontext", "guidance": "2.5", "first_steps": "28", "first_guidance": "2.5"},
)
def edit(
    args: list[str] = typer.Argument(
        None,
        help='The picture (PNG, JPEG, WebP) and the instruction, e.g. photo.jpg "make it night".',
        metavar="IMAGE INSTRUCTION",
        show_default=False,
    ),
    res: int = typer.Option(
        None,
        help="Long side of the result in px.",
        show_default="the picture's",
        rich_help_panel=options.SIZE,
    ),
    scale: float = typer.Option(
        None,
        help="Factor of the picture's size, aspect kept.",
        show_default="1",
        rich_help_panel=options.SIZE,
    ),
    width: int = typer.Option(None, help="Width in px (aspect kept if alone).", rich_help_panel=options.SIZE),
    height: int = typer.Option(
        None, help="Height in px (aspect kept if alone).", rich_help_panel=options.SIZE
    ),
    stages: str = typer.Option(
        None,
        help="Long side of each stage, e.g. 1024,4096.",
        show_default="1024,target",
        rich_help_panel=options.SIZE,
    ),
    direct: bool = typer.Option(
        False, "--direct", help="No first pass: one pass at the target.", rich_help_panel=options.SIZE
    ),
    seed: list[int] = typer.Option(
        None,
        help="Seed; repeat for several results.",
        show_default="random",
        metavar="INT",
        rich_help_panel=options.PROMPTS,
    ),
    count: int = typer.Option(None, help="Results, random seeds.", rich_help_panel=options.PROMPTS),
    from_image: Path = typer.Option(
        None,
        "--from",
        help="Re-run what a clear-gen PNG stores, its picture included; options given win.",
        rich_help_panel=options.PROMPTS,
    ),
    **recipe: Any,
) -> None:
    """Edit a picture at 2K-8K with FLUX.1 Kontext: a 1024 px pass, then SDEdit stages with CLEAR."""
    from dataclasses import replace

    from ..files.source import UpscaleTarget, edit_arguments
    from ..run.edit import edit as run_edit
    from ..run.edit import edit_options

    # 1. Parse: the picture and the instruction, the size (the picture's, unless given), the recipe.
    picture, instruction = edit_arguments(args or [], from_image is not None)
    as_json = recipe.pop("as_json")
    if direct and stages:
        raise ConfigError("give only one of --stages and --direct")
    long_sides = options.ints(stages, "--stages")
    sized = any(v is not None for v in (res, scale, width, height))
    target = UpscaleTarget(res, scale, width, height) if sized else None
    if target is None and long_sides:  # no size given: the last stage is the target
        target = UpscaleTarget(res=long_sides[-1])
    elif target is None and (picture is not None or from_image is None):  # the picture's own size
        target = UpscaleTarget(scale=1.0)
    model = recipe["model"] or (None if from_image is not None else "kontext")
    opts = options.generate_options(
        {**recipe, "model": model, "recipe": "kontext"},
        from_image,
        prompts=[instruction] if instruction else None,
        seeds=list(seed or []) or None,
        count=count,
    )
    opts = edit_options(opts, picture, target)
    if direct:
        opts = replace(opts, stages=[max(opts.width, opts.height)])
    elif long_sides:
        opts = replace(opts, stages=long_sides)
    elif from_image is not None and target is not None:  # a new size over --from: the recipe's stages
        opts = replace(opts, stages=None, guide=recipe.get("guide"), guide_level=recipe.get("guide_level"))
    if recipe["dry_run"]:
        from ..plan.memory import plan_run

        _print_plans([("", plan_run(opts))], as_json)
        return
    # 2. Edit, showing progress and a timing table on stderr, JSON on stdout.
    from .display import GenerateDisplay

    with GenerateDisplay(err, as_json) as display:
        display.summary(run_edit(opts, hooks=display.hooks()))


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
