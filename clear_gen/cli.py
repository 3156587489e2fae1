"""The `clear-gen` command line: parse, call one library function, print.

User errors (ClearGenError) become one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from . import __version__
from .errors import ClearGenError, ConfigError, OutputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="FLUX.1 at 2K-8K with CLEAR local attention. `clear-gen PROMPT` is `clear-gen generate PROMPT`.",
)
err = Console(stderr=True, highlight=False)


@app.command()
def version() -> None:
    """Print the clear-gen version."""
    print(__version__)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--res wants comma-separated integers, got {text!r}") from None


@app.command()
def bench(
    what: str = typer.Option("plan", help="plan (FLOPs, densities; no compute) | attention | step"),
    res: str = typer.Option("1024,2048,4096,8192", help="Image sides in pixels, comma-separated."),
    variant: str | None = typer.Option(None, help="r8 | r16 | r32 | r8-down4 | r16-down4 (sets both)."),
    window: int = typer.Option(8, help="CLEAR window radius r in tokens."),
    down_factor: int = typer.Option(1, help="CLEAR down-sampling factor f (1 = none)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    dtype: str | None = typer.Option(None, help="float32 | bfloat16 | float16 (bf16 on CUDA, fp32 on CPU)."),
    repeats: int = typer.Option(3, help="Timed calls after one warm-up; the median is reported."),
    heads: int = typer.Option(24, help="Attention heads (FLUX: 24; use 2 on a CPU)."),
    head_dim: int = typer.Option(128, help="Head dimension (FLUX: 128; use 64 or 32 on a CPU)."),
    layers: int = typer.Option(57, help="Step: blocks, split 1:2 double:single (57 = FLUX.1-dev's 19 + 38)."),
    text_len: int = typer.Option(512, help="Text tokens (FLUX.1-dev: 512)."),
    compare_full: bool = typer.Option(True, help="Also time full attention / the stock model."),
    max_full_seconds: float | None = typer.Option(
        None, help="Skip full-attention calls the FLOP model estimates slower than this; report the estimate."
    ),
    time_budget: float | None = typer.Option(
        None, help="Seconds: skip (and estimate) full-attention runs that would end after this budget."
    ),
    json_file: Path | None = typer.Option(None, "--json", help="Write the rows as JSON, as they land."),
    markdown: Path | None = typer.Option(None, help="Also write the table as Markdown (for BENCHMARKS.md)."),
) -> None:
    """CLEAR versus full attention on random FLUX.1-dev-shaped weights: no download needed."""
    from . import bench as B

    # 1. Parse.
    if variant is not None:
        window, down_factor = B.variant(variant)
    sizes = _ints(res)
    # 2. Run, saving the rows as they land (a killed run keeps what it measured).
    write = (lambda rows: _write_json(json_file, rows)) if json_file else (lambda rows: None)
    done: list[dict] = []
    rows = B.run(
        what, sizes, window=window, down_factor=down_factor, device=device, dtype=dtype, repeats=repeats,
        heads=heads, head_dim=head_dim, layers=layers, text_len=text_len, compare_full=compare_full,
        max_full_seconds=max_full_seconds, time_budget=time_budget,
        progress=lambda msg: err.print(f"[dim]{msg}[/dim]"),
        on_row=lambda row: (done.append(row), write(done)),
    )  # fmt: skip
    write(rows)
    # 3. Print (wide enough not to truncate when piped into a file).
    Console(width=None if sys.stdout.isatty() else 200).print(B.table(rows))
    if markdown:
        _write(markdown, B.markdown(rows))


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


def _write_json(path: Path, rows: list[dict]) -> None:
    _write(path, json.dumps(rows, indent=1) + "\n")


def _with_default_command(argv: list[str]) -> list[str]:
    """`clear-gen "a castle" --res 2048` means `clear-gen generate "a castle" --res 2048`."""
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    if argv and argv[0] not in commands and argv[0] not in ("--help", "-h") and "generate" in commands:
        return ["generate", *argv]
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=argv, prog_name="clear-gen", standalone_mode=False)
    except ClearGenError as e:
        err.print(f"[red]error:[/red] {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
