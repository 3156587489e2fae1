"""The commands about weights: `download` (the Hub into the Hugging Face cache) and `weights` (the
registry and what of it is cached)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .app import app

if TYPE_CHECKING:
    from ..weights.hub import Fetched


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


DESCRIPTION_MIN = 24  # the description column's narrowest useful width


def _print_listing(console: Console, title: str, names: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A registry listing whose last column is a description: a table when every other column fits on one
    line beside it, else (a narrow terminal) two lines an entry. Either way a name, file or repo id is never
    cut in two."""
    widths = [
        max(len(Text.from_markup(v).plain) for v in (name, *(r[i] for r in rows)))
        for i, name in enumerate(names)
    ]
    if sum(widths[:-1]) + DESCRIPTION_MIN + 3 * len(names) + 1 <= console.width:
        table = Table(title=title, title_justify="left")
        for name in names[:-1]:
            table.add_column(name, no_wrap=True)
        table.add_column(names[-1], overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    console.print(Text(title, style="italic"))
    for first, *fields, description in rows:
        pairs = "  ".join(f"{name} {value}" for name, value in zip(names[1:-1], fields, strict=True))
        console.print(Padding(f"[bold]{first}[/bold]  {pairs}", (0, 0, 0, 2)))
        console.print(Padding(description, (0, 0, 0, 6)))


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
    variants: list[str] = typer.Argument(
        None, help="Variant names (default: the default variant).", metavar="VARIANT..."
    ),
    all_variants: bool = typer.Option(False, "--all", help="Every variant in weights.toml."),
    base: str = typer.Option(None, "--base", help="Base name (dev, schnell) or Hub repo id."),
    no_base: bool = typer.Option(False, "--no-base", help="Only the CLEAR checkpoints."),
    controlnet: list[str] = typer.Option(
        None, "--controlnet", help="A ControlNet (registry name or Hub repo); repeatable. Alone: only it."
    ),
    token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
) -> None:
    """Download CLEAR weights and their FLUX.1 base (and ControlNets) into the Hugging Face cache.

    Re-runs transfer nothing."""
    from ..weights.download import download as fetch
    from ..weights.download import plan_download
    from ..weights.registry import load_registry

    nets = list(controlnet or [])
    names, bases = plan_download(variants or [], all_variants, base, no_base, load_registry(), nets)
    rows = fetch(names, bases, token=token, controlnets=nets)
    Console().print(_weights_table(rows, "Downloaded"))


@app.command()
def weights() -> None:
    """The weights registry (weights.toml) and what of it is already cached."""
    from ..weights.download import status
    from ..weights.registry import load_registry

    registry = load_registry()
    cached = {(r.kind, r.name): r for r in status(registry)}
    repos = {v.repo for v in registry.variants.values()}
    one_repo = repos.pop() if len(repos) == 1 else None  # then named once, in the title
    rows = []
    for v in registry.variants.values():
        row = cached[("variant", v.name)]
        name = f"{v.name} (default)" if v.name == registry.default_variant else v.name
        where = _human_size(row.size) if row.path else "[dim]no[/dim]"
        file = v.filename if one_repo else f"{v.repo}/{v.filename}"
        rows.append((name, str(v.window), str(v.down_factor), v.base, file, where, v.description))
    console = Console()
    title = f"CLEAR variants ({one_repo})" if one_repo else "CLEAR variants"
    _print_listing(console, title, ("name", "r", "f", "base", "file", "cached", "description"), rows)
    rows = []
    for b in registry.bases.values():
        row = cached[("base", b.name)]
        where = _human_size(row.size) if row.path else "[dim]no[/dim]"
        rows.append((b.name, b.repo, "yes" if b.gated else "no", where, b.description))
    _print_listing(console, "Bases", ("name", "repo", "gated", "cached", "description"), rows)
    if registry.controlnets:
        _controlnets(console, registry, cached)


def _controlnets(console: Console, registry, cached: dict) -> None:
    rows = []
    for c in registry.controlnets.values():
        row = cached[("controlnet", c.name)]
        where = _human_size(row.size) if row.path else "[dim]no[/dim]"
        modes = ", ".join(c.modes) or "-"
        rows.append((c.name, c.repo, modes, f"{c.scale:g}", c.base, where, c.description))
    columns = ("name", "repo", "modes", "scale", "base", "cached", "description")
    _print_listing(console, "ControlNets (--controlnet NAME)", columns, rows)
