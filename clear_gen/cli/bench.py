"""`clear-gen bench`: CLEAR against full attention on random FLUX.1-dev-sized weights (bench/), its rows
printed as a table as wide as the terminal (turned when wider) and written as JSON, JSON lines or
Markdown as they land."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core import launch
from ..errors import OutputError
from . import options
from .app import app, err


def _what_options(
    what: str = typer.Option(
        "plan",
        help="plan (FLOPs, no compute), attention, check (vs dense), step, image (a whole one) or env.",
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
) -> None:
    """What to measure, at which sizes and with which attention (only its signature is used)."""


def _shape_options(
    heads: int | None = typer.Option(
        None, help="Attention heads.", show_default="24; 2 measuring on a CPU", rich_help_panel=options.SHAPE
    ),
    head_dim: int | None = typer.Option(
        None, help="Head dimension.", show_default="128; 64 measuring on a CPU", rich_help_panel=options.SHAPE
    ),
    layers: int = typer.Option(
        57, help="Blocks (step, image), 1:2 double:single.", rich_help_panel=options.SHAPE
    ),
    text_len: int = typer.Option(512, help="Text tokens.", rich_help_panel=options.SHAPE),
    vae_channels: int | None = typer.Option(
        None,
        help="image: VAE width.",
        show_default="128, FLUX.1's; 8 on a CPU",
        rich_help_panel=options.SHAPE,
    ),
) -> None:
    """The random model's shape (only its signature is used)."""


def _image_options(
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
        help="image, step: compile the transformer blocks.",
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
        help="image, step: transformer weights, none, fp8, fp8dq or int8.",
        show_default="none",
        rich_help_panel=options.SPEED,
    ),
    vae_tiling: str | None = typer.Option(
        None,
        help="image: VAE tiles, auto (exact above 2048 px), exact, fast or off.",
        show_default="auto",
        rich_help_panel=options.WHAT,
    ),
) -> None:
    """--what image's recipe and VAE options, its and a step's speed options (only its signature is used)."""


def _run_options(
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=options.RUN),
    dtype: str | None = typer.Option(
        None, help="bf16, fp16 or fp32.", show_default="bf16 CUDA/MPS, fp32 CPU", rich_help_panel=options.RUN
    ),
    backend: str = typer.Option(
        "auto", help="CLEAR kernel; attention: several, e.g. flex,gather,dense.", rich_help_panel=options.RUN
    ),
    repeats: int = typer.Option(3, help="Timed calls after a warm-up (median).", rich_help_panel=options.RUN),
    no_compare_full: bool = typer.Option(
        False, "--no-compare-full", help="Skip full attention / the stock model.", rich_help_panel=options.RUN
    ),
    measure: str = typer.Option(
        "both",
        help="step: both, clear or full alone, or composed (full from timed attention ops).",
        rich_help_panel=options.RUN,
    ),
    max_full_seconds: float | None = typer.Option(
        None, help="Estimate, not run, full-attention calls slower than this.", rich_help_panel=options.RUN
    ),
    time_budget: float | None = typer.Option(
        None, help="Seconds: estimate full attention that would end later.", rich_help_panel=options.RUN
    ),
) -> None:
    """Where it runs and how full attention is measured (only its signature is used)."""


def _output_options(
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
    """Where the rows go (only its signature is used)."""


@app.command()
@options.with_options(_what_options, _shape_options, _image_options, _run_options, _output_options)
def bench(**given: Any) -> None:
    """CLEAR versus full attention on random FLUX.1-dev-shaped weights: no download needed."""
    from .. import bench as B
    from ..bench import report as R

    # 1. Parse what the library parses (bench.spec) from the flags' texts.
    out = {name: given.pop(name) for name in ("json_file", "markdown", "jsonl", "label")}
    given["res"] = options.ints(given["res"], "--res")
    given["stages"] = options.ints(given["stages"], "--stages")
    given["gpus"] = options.ints(given["gpus"], "--gpus", "GPU counts, e.g. 2,4,8")
    given["compare_full"] = not given.pop("no_compare_full")
    writes = not launch.rank()  # under torchrun (step: sequence-parallel), rank 0 writes the files
    # 2. Run, saving the rows as they land (a killed run keeps what it measured).
    progress = lambda msg: err.print(f"[dim]{escape(msg)}[/dim]")  # noqa: E731
    rows = B.run(progress=progress, on_row=_RowWriter(writes, **out), **given)
    # 3. Print a table per kind of row: as wide as the terminal (or COLUMNS); piped, wide enough not to wrap.
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
    kinds = [[r for r in rows if r["what"] == what] for what in dict.fromkeys(r["what"] for r in rows)]
    for part in kinds:
        console.print(_fit(_with_legend(R.table(part)), console.width))
    if out["markdown"] and not out["jsonl"] and writes:
        _write(out["markdown"], "\n".join(R.table_markdown(part) for part in kinds))


class _RowWriter:
    """Each row as it lands into --json (the whole list, rewritten), --jsonl (appended, with the part's
    --label) and, with --jsonl, --markdown (the whole file's report); nothing on torchrun's ranks 1..."""

    def __init__(self, writes: bool, json_file, markdown, jsonl, label) -> None:
        self.writes, self.json_file, self.markdown, self.jsonl, self.label = (
            writes,
            json_file,
            markdown,
            jsonl,
            label,
        )
        self.done: dict[int, dict] = {}

    def __call__(self, row: dict) -> None:
        from ..bench import report as R

        if not self.writes:
            return
        self.done[id(row)] = row
        if self.json_file:
            _write_json(self.json_file, list(self.done.values()))
        if self.jsonl:
            R.append(self.jsonl, {**row, "part": self.label})
            if self.markdown:
                R.write(self.jsonl, self.markdown, f"clear-gen bench on {row['device']}")


# Terse bench headers, explained under the table; BENCHMARKS.md has the long form.
BENCH_LEGEND = {
    "dens.": "dens.: share of (query, key) pairs CLEAR needs / its block mask computes",
    "row-major": "row-major: computed/needed with row-major tokens",
    "PF": "PF: PFLOP (1e15 FLOP) per step",
    "bound": "bound: step speedup if every FLOP ran at one rate",
    "compile s": "compile s: first call's extra time (compilation)",
    "check": "check: CLEAR against the dense reference, max error @ px",
    "(est.)": "~ (est.): from the FLOP model, not run",
    "(composed)": "(composed): full attention from timed attention ops (the CLEAR step less its CLEAR ops "
    "plus stock ones), not run",
    "(plain ": "plain: the same step before --quantize/--compile",
    "full s/step": "full s/step: full attention's warm step at the stage's size",
    "skipped": "skipped: block evaluations the step cache skipped / all",
    "VAE tiles": "VAE tiles: the stage decoded in exact (or fast) tiles of N px, or whole (off)",
    "a2a GB": "a2a GB: what each GPU sends per step in sequence mode (it receives as much), s: at that link",
    "n/a": "n/a: the heads do not split over that many GPUs",
    "halo GB": "halo: bands of image rows trading r - 1 rows with their neighbours (on paper)",
}


def _with_legend(table: Table) -> Table:
    texts = [str(text) for c in table.columns for text in (c.header, *c.cells)]
    notes = [note for key, note in BENCH_LEGEND.items() if any(key in text for text in texts)]
    legend = "; ".join([*notes, "see BENCHMARKS.md."]) if notes else "See BENCHMARKS.md."
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
