"""The commands about weights: `download` (the Hub into the Hugging Face cache) and `weights` (the
registry and what of it is cached)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from .app import app

if TYPE_CHECKING:
    from ..weights.hub import Fetched


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
