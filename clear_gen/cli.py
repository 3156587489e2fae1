"""The `clear-gen` command line: parse, call one library function, print.

User errors (ClearGenError) become one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import ClearGenError

if TYPE_CHECKING:
    from rich.table import Table

    from .hub import Fetched

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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _weights_table(rows: list[Fetched], title: str) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("name", "kind", "source", "size", "path"):
        table.add_column(column, overflow="fold")
    for r in rows:
        size = _size(r.size) if r.path else "-"
        table.add_row(r.name, r.kind, r.source, size, str(r.path) if r.path else "[dim]not cached[/dim]")
    return table


@app.command()
def download(
    variants: list[str] = typer.Argument(None, help="Variant names (default: the default variant)."),
    all_variants: bool = typer.Option(False, "--all", help="Every variant in weights.toml."),
    base: str = typer.Option(None, "--base", help="Base name (dev, schnell) or Hub repo id."),
    no_base: bool = typer.Option(False, "--no-base", help="Only the CLEAR checkpoints."),
    token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
) -> None:
    """Download CLEAR weights and their FLUX.1 base into the Hugging Face cache; re-runs transfer nothing."""
    from .hub import download as fetch
    from .hub import plan_download
    from .registry import load_registry

    names, bases = plan_download(variants or [], all_variants, base, no_base, load_registry())
    rows = fetch(names, bases, token=token)
    Console().print(_weights_table(rows, "Downloaded"))


@app.command()
def weights() -> None:
    """The weights registry (weights.toml) and what of it is already cached."""
    from rich.table import Table

    from .hub import status
    from .registry import load_registry

    registry = load_registry()
    cached = {(r.kind, r.name): r for r in status(registry)}
    table = Table(title="CLEAR variants", title_justify="left")
    for column in ("name", "r", "f", "base", "file", "cached", "description"):
        table.add_column(column, overflow="fold")
    for v in registry.variants.values():
        row = cached[("variant", v.name)]
        name = f"{v.name} (default)" if v.name == registry.default_variant else v.name
        where = _size(row.size) if row.path else "[dim]no[/dim]"
        file = f"{v.repo}/{v.filename}"
        table.add_row(name, str(v.window), str(v.down_factor), v.base, file, where, v.description)
    bases = Table(title="Bases", title_justify="left")
    for column in ("name", "repo", "gated", "cached", "description"):
        bases.add_column(column, overflow="fold")
    for b in registry.bases.values():
        row = cached[("base", b.name)]
        where = _size(row.size) if row.path else "[dim]no[/dim]"
        bases.add_row(b.name, b.repo, "yes" if b.gated else "no", where, b.description)
    console = Console()
    console.print(table)
    console.print(bases)


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
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)  # messages may hold [brackets]
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
