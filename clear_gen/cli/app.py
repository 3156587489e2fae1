"""The `clear-gen` command line: parse, call one library function, print.

User errors (ClearGenError) become one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core import launch
from ..errors import ClearGenError, ConfigError, ParallelError
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
    image: Path = typer.Argument(None, help="A PNG made by clear-gen.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the record as one JSON object."),
    backends: bool = typer.Option(
        False, "--backends", help="List CLEAR's attention backends this machine can use, and why not others."
    ),
) -> None:
    """Show the prompt, seed and settings stored in a clear-gen PNG (or, with --backends, the kernels)."""
    if backends:
        _print_backends()
        return
    if image is None:
        raise ConfigError("info needs a PNG made by clear-gen (or --backends)")
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


def _print_backends() -> None:
    """One line per attention backend: what it does on each device here, or why it cannot run here."""
    from ..attention.backends import available
    from ..core.device import devices_here

    here = devices_here()
    print(
        f"CLEAR attention backends on this machine ({', '.join(d.type for d in here)}); auto takes the first"
    )
    print("that serves a run's device, size and use (--backend NAME asks for one):")
    for name, line in available(here):
        print(f"  {name:<7} {line}")


def _register_commands() -> None:
    """The other commands, in --help's order: their modules register them on `app` when imported."""
    # isort: off
    from . import generating, weights, bench  # noqa: F401

    # isort: on
    from .distill import app as distill

    app.add_typer(distill, name="distill")


_register_commands()


def _with_default_command(argv: list[str]) -> list[str]:
    """`clear-gen "a castle" --res 2048` means `clear-gen generate "a castle" --res 2048`, and
    `clear-gen -- weight` a one-word prompt. A first word a typo away from a command (`weight`, `upscal`) is
    refused rather than generated from: the run would load FLUX.1 for a mistyped command."""
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    commands |= {g.name for g in app.registered_groups}
    if (
        not argv
        or argv[0] in commands
        or argv[0] in ("--help", "-h", "--version")
        or "generate" not in commands
    ):
        return argv
    if argv[0] == "--":
        return ["generate", *argv[1:]]
    first = argv[0]
    near = sorted((_typos(first, c), c) for c in commands if not first.startswith("-") and " " not in first)
    if near and near[0][0] <= TYPOS:
        raise ConfigError(
            f"no such command {first!r}; did you mean {near[0][1]!r}? "
            f"(quote a one-word prompt: clear-gen -- {first})"
        )
    return ["generate", *argv]


TYPOS = 2  # a first word this many edits from a command is taken for a mistyped command


def _typos(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) from a to b, case-insensitive."""
    a, b = a.lower(), b.lower()
    d = [[i + j if not i * j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


@contextmanager
def _silenced() -> Iterator[None]:
    """Nothing printed on stdout or stderr (torchrun's ranks other than 0: rank 0 speaks for the job)."""
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        yield


def _tidy_help(command):
    """Help that reads the same on every Typer: a flag shows no `<bool>` type, and a default described in
    words shows as `[default: random]`, not Typer's `[default: (random)]`. (Typer vendors click: its
    classes are recognised by what they have.)"""
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        if hasattr(cmd, "commands") and cmd is not command:
            _tidy_help(cmd)
        for param in [*cmd.params, cmd.get_help_option(cmd.context_class(cmd))]:
            if not hasattr(param, "is_flag"):  # an argument, or no help option
                continue
            if param.is_flag:
                param.metavar = ""
            if isinstance(param.show_default, str):
                param.help = f"{param.help or ''} \\[default: {param.show_default}]".strip()
                param.show_default = False
    return command


def main(argv: list[str] | None = None) -> None:
    # Library chatter (import-time notes, retried-request warnings) is not for our users: errors only.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree"):  # torchao's import: CUDA extensions, torch deprecations
        logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers' own deprecations (its ControlNet imports FluxPosEmbed from the old place): not the user's
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = bool(launch.rank())  # torchrun's ranks 1..: they print only a failure of their own
    try:
        argv = _with_default_command(argv)
        # Standalone: Typer prints help and usage errors itself (exit 2); our errors come through.
        with _silenced() if quiet else nullcontext():
            _tidy_help(typer.main.get_command(app))(args=argv, prog_name="clear-gen", standalone_mode=True)
    except ParallelError as e:  # one rank's own failure, or lost contact: the rank that saw it says so
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no process-group teardown: with a rank gone it can hang or abort
    except ClearGenError as e:
        # escape: a path like a[1].png is not markup; soft_wrap: one line even when longer than the terminal
        if not quiet:
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        _remove_empty_created()
        sys.exit(1)
    except KeyboardInterrupt:  # outside Typer (it turns one inside a command into _interrupted's exit)
        _say_interrupted(quiet)
        sys.exit(130)
    except SystemExit as e:
        if _interrupted(e):
            _say_interrupted(quiet)
        raise


def _interrupted(e: SystemExit) -> bool:
    """Typer turns Ctrl-C in a command into a silent exit 130: an Exit caused by the KeyboardInterrupt."""
    cause = e.__context__.__cause__ if e.__context__ is not None else None
    return e.code == 130 and isinstance(cause, KeyboardInterrupt)


def _say_interrupted(quiet: bool) -> None:
    """Ctrl-C: one line (what was saved stays saved), and no empty --out folder left behind."""
    if not quiet:
        err.print("[yellow]interrupted[/yellow]: the images saved so far are kept")
    _remove_empty_created()


def _remove_empty_created() -> None:
    """The --out folders this run created and left empty, removed (output.py; loaded only if it ran)."""
    output = sys.modules.get("clear_gen.files.output")
    if output is not None:
        output.remove_empty_created()
