"""The shapes of --model (its family's ModelShapes: transformer config and parameter counts) without its
weights: from a local folder, the shapes shipped for a registry base, or a cached Hub snapshot; else
FLUX.1-dev's, with a note. Never reads weights, never calls the network."""

from __future__ import annotations

from .. import models
from .hub import base_for, cached_base, local_model
from .registry import load_registry, named


def model_shapes(model: str):
    """The shapes (models.<family>.shapes.ModelShapes) of --model: a local folder, a registry base or its
    repo, a cached Hub snapshot, else FLUX.1-dev's (with a note)."""
    local = local_model(model)
    shapes = models.family().shapes  # FLUX.1 for folders and repos outside the registry
    if local is not None:
        return shapes.folder_shapes(local)
    registry = load_registry()
    base = named(registry.bases, model)
    if base is not None:
        return models.family(base.family).shapes.shipped_shapes(base.name, f"{base.repo} (shipped shapes)")
    cached = cached_base(base_for(model, registry))
    if cached is not None:
        return shapes.folder_shapes(cached)
    note = f"{model} is not cached: planned with FLUX.1-dev's shapes"
    return shapes.shipped_shapes("dev", f"{model} (FLUX.1-dev's shapes)", note)
