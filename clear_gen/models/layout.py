"""The layout diffusers gives its FLUX transformers, FLUX.1's and FLUX.2's alike: double-stream blocks
(`transformer_blocks`) then single-stream blocks (`single_transformer_blocks`), each with its attention
module as `attn`; RoPE's theta on `pos_embed`; the image tokens' embedder `x_embedder`. The families
re-export what they share (models.flux1, models.flux2). May import `core` and `errors` only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BLOCK_KINDS = ("transformer_blocks", "single_transformer_blocks")  # double-stream, then single-stream


def attention_modules(model) -> dict[str, torch.nn.Module]:
    """'transformer_blocks.{i}.attn' / 'single_transformer_blocks.{i}.attn' -> module, in that order."""
    return {
        f"{kind}.{i}.attn": block.attn for kind in BLOCK_KINDS for i, block in enumerate(getattr(model, kind))
    }


def blocks(model) -> list[torch.nn.Module]:
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def single_blocks(model) -> list[torch.nn.Module]:
    """The single-stream blocks (joint attention over [text ; image]): CLEAR's distillation loss reads
    some of their attention outputs."""
    return list(model.single_transformer_blocks)


def is_clear_key(key: str, clear_projections: Callable[[str], tuple[str, ...]]) -> bool:
    """A key of a CLEAR checkpoint: an attention module's replaced projection (`clear_projections` of
    its name, the family's) or its processor's spatial weight."""
    kind, _, rest = key.partition(".")
    if kind not in BLOCK_KINDS or not rest.split(".", 1)[0].isdigit():
        return False
    attention, _, tail = key.partition(".attn.")
    projection, _, param = tail.rpartition(".")
    return tail == "processor.spatial_weight" or (
        projection in clear_projections(attention) and param in ("weight", "bias")
    )


def rope_theta(model) -> float:
    return model.pos_embed.theta


def set_rope_theta(model, theta: float) -> None:
    model.pos_embed.theta = theta


def rope_axes(model) -> tuple[int, ...]:
    """Dims of each RoPE axis (FLUX.1: 16 text/index, 56 rows, 56 columns)."""
    return tuple(model.pos_embed.axes_dim)


def set_rope(model, rotary: Callable | None) -> None:
    """From now on RoPE's cos and sin of positions (S, axes) are `rotary(ids)`'s; None: the stock
    embedder's again (DyPE, run/dype.py)."""
    if rotary is None:
        vars(model.pos_embed).pop("forward", None)
    else:
        model.pos_embed.forward = rotary


def compute_device(model) -> torch.device:
    """Where the model computes: its weights' device, or under accelerate's sequential offload (the
    weights on 'meta' between calls) its hook's execution device."""
    hook = getattr(model.x_embedder, "_hf_hook", None)
    if getattr(hook, "offload", False):
        return torch.device(hook.execution_device)
    return model.x_embedder.weight.device


def image_ids(kwargs: dict, name: str = "img_ids"):
    """The image tokens' positions as (N, axes) from a call's arguments by name (3-d ids are deprecated
    in diffusers: their batch's first)."""
    ids = kwargs[name]
    return ids[0] if ids.ndim == 3 else ids
