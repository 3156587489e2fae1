"""The `clear-gen` command line: parse, call one library function, print.

User errors (ClearGenError) become one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import ClearGenError
from .output import describe, record_from_image

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
    table = Table(title=escape(str(image)), show_header=False, title_justify="left")
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in describe(record):
        table.add_row(name, escape(value))
    Console(highlight=False).print(table)


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
        # escape: a path like a[1].png is not markup; soft_wrap: one line even when longer than the terminal
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
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
