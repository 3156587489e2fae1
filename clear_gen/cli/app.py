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
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core import launch
from ..errors import ClearGenError, ParallelError
from ..files.record import describe, record_from_image
from ..version import __version__

if TYPE_CHECKING:
    pass

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


def _register_commands() -> None:
    """The other commands, in --help's order: their modules register them on `app` when imported."""
    # isort: off
    from . import generating, weights, bench  # noqa: F401

    # isort: on
    from .distill import app as distill

    app.add_typer(distill, name="distill")


_register_commands()


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
