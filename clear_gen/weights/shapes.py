"""The family and the shapes of --model (its family's ModelShapes: transformer config and parameter counts)
without its weights: from a local folder, the shapes shipped for a registry base, or a cached Hub snapshot;
else FLUX.1-dev's, with a note. Never reads weights, never calls the network."""

from __future__ import annotations

from pathlib import Path

from .. import models
from ..errors import WeightsError
from .hub import base_for, cached_base, local_model
from .registry import Base, load_registry, named


def model_family(model: str) -> str:
    """The family (models/) of --model: a registry base's `family` field; a local folder's or a cached
    Hub snapshot's by its transformer's class; else the default (FLUX.1; a --model that names nothing is
    model_shapes' to refuse)."""
    try:
        return _family(*_where(model))
    except WeightsError:
        return models.DEFAULT


def model_edits(model: str) -> bool:
    """Whether --model edits a picture given as a reference (FLUX.1 Kontext): a registry base's `edit`; a
    local folder's or a cached Hub snapshot's model_index.json names a pipeline its family lists in
    EDIT_PIPELINES. A Hub repo that is not cached cannot tell: False."""
    import json

    try:
        base, folder = _where(model)
    except WeightsError:
        return False
    if base is not None:
        return base.edit
    try:
        kind = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):  # no folder, or not a diffusers pipeline's
        return False
    return kind in models.family(_family(None, folder)).EDIT_PIPELINES


def model_shapes(model: str):
    """The shapes (models.<family>.shapes.ModelShapes) of --model: a local folder, a registry base or its
    repo, a cached Hub snapshot, else FLUX.1-dev's (with a note)."""
    base, folder = _where(model)
    shapes = models.family(_family(base, folder)).shapes
    if base is not None:
        return shapes.shipped_shapes(base.name, f"{base.repo} (shipped shapes)")
    if folder is not None:
        return shapes.folder_shapes(folder)
    note = f"{model} is not cached: planned with FLUX.1-dev's shapes"
    return shapes.shipped_shapes("dev", f"{model} (FLUX.1-dev's shapes)", note)


def _where(model: str) -> tuple[Base | None, Path | None]:
    """(the registry base --model names, the folder its shapes are in: local, or a cached Hub snapshot)."""
    local = local_model(model)
    if local is not None:
        return None, local
    registry = load_registry()
    base = named(registry.bases, model)
    if base is not None:
        return base, None
    return None, cached_base(base_for(model, registry))


def _family(base: Base | None, folder: Path | None) -> str:
    if base is not None:
        return base.family
    return (models.folder_family(folder) if folder is not None else None) or models.DEFAULT
