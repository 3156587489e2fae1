"""What CLEAR keeps on a model it was applied to: the settings, and the state its hooks and processors
share (the current forward's layout, the replaced processors, projections and RoPE theta)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import Tensor

from ..core import geometry as G
from ..core.positions import GridCache


@dataclass
class ClearConfig:
    window: int  # r: image keys with dy^2 + dx^2 < r^2
    down_factor: int = 1  # f: pooled key per f x f cell; 1 = none
    proportional_attention: bool = False  # scale sqrt(log_4608(N) / d) instead of 1/sqrt(d)
    ntk_factor: float = 1.0  # RoPE theta multiplier
    backend: str = "auto"  # a name of backends.BACKENDS, or auto: chosen per device and size


@dataclass
class Layout:
    """What one forward pass needs: the geometry and the permutation that tile-orders its tokens."""

    geometry: G.Geometry
    perm: Tensor  # (N,) row-major index of each tile-order position, on the device
    inv: Tensor  # (N,) tile-order position of each row-major token


@dataclass
class ClearState:
    """Shared by a model's CLEAR hooks and all its processors."""

    config: ClearConfig
    family: ModuleType  # the model's adapter (models.of)
    layout: Layout | None = None  # of the latest forward (set by the input hook)
    originals: dict[str, Tensor] = field(default_factory=dict)  # replaced parameters' data (weights.py)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # quantized projections swapped out
    processors: dict[str, object] = field(default_factory=dict)  # the processors we replaced
    theta: float = 10000.0
    hooks: list = field(default_factory=list)
    grids: GridCache = field(default_factory=GridCache)
    parallel: object | None = None  # run.world.SequenceShards in torchrun's sequence mode, else None
    note: Callable[[str], None] | None = None  # hears a line worth telling (a kernel that fell back)
