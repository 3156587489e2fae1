"""Exact RoPE positions for the image tokens, whatever dtype the pipeline built `img_ids` in.

diffusers' Flux pipelines build `img_ids` = [0, row, col] in the prompt's dtype (a family with more
position axes puts zeros after the column: models/ says how many). bf16 holds integers
exactly only up to 256, so above 4096 px (256 tokens a side) rows and columns are rounded: at 8192 px
column 511 reads 512, and 2-4 neighbouring tokens share a position. The model means integer positions,
so clear-gen recovers the grid from the rounded ids (row 0's length: rows 0 and 1 are exact in any
dtype) and feeds RoPE the exact integers in float32, with CLEAR and with stock attention alike
(models.flux1.use_exact_positions), so that a CLEAR-versus-full comparison changes only the attention.

FLUX.1 Kontext appends a reference picture's tokens after the image's, ids [1, row, col] of the
reference's own grid (diffusers' FluxKontextPipeline): a `Grid` holds that second grid as `reference`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class Grid:
    """The row-major image grid that img_ids describe: h x w tokens starting at (y0, x0), first id axis
    `index`; and the grid of a reference picture whose tokens follow (FLUX.1 Kontext's: index 1), if any."""

    height: int
    width: int
    y0: int = 0
    x0: int = 0
    index: int = 0  # the ids' first axis: 0 for the image, 1 for Kontext's reference
    reference: Grid | None = None  # a second grid after this one (its own ids), or None


def exact_ids(grid: Grid, device: torch.device | str = "cpu", axes: int = 3) -> Tensor:
    """(h * w, axes) float32 [index, row, col, 0, ...] of a row-major grid (then its reference's, if any),
    exact for any size below 2^24: row and column on axes 1 and 2, zeros on the others (FLUX.1 has 3)."""
    return _exact_ids(grid, str(device), axes)


@lru_cache(maxsize=8)
def _exact_ids(grid: Grid, device: str, axes: int) -> Tensor:
    ys = torch.arange(grid.height, device=device).view(-1, 1).expand(-1, grid.width) + grid.y0  # (h, w)
    xs = torch.arange(grid.width, device=device).view(1, -1).expand(grid.height, -1) + grid.x0
    zero = torch.zeros_like(ys)
    ids = torch.stack([zero + grid.index, ys, xs] + [zero] * (axes - 3), dim=-1).view(-1, axes).float()
    if grid.reference is None:
        return ids  # (N, axes)
    return torch.cat([ids, _exact_ids(grid.reference, device, axes)])  # (N + N_ref, axes)


def find_grid(img_ids: Tensor) -> Grid:
    """The grid whose ids, rounded to img_ids' dtype, are img_ids; refuse anything else.

    The width is the length of row 0 (rows 0 and 1 are exact in every dtype), the height N / width. Ids
    whose first axis changes part-way are the image's grid, then a reference's (FLUX.1 Kontext's).
    One copy to the CPU: callers cache the answer per ids tensor (`GridCache`).
    """
    ids = img_ids.detach().to("cpu")
    index = ids[:, 0]
    changes = (index != index[0]).nonzero()
    split = int(changes[0, 0]) if changes.numel() else ids.shape[0]
    grid = _one_grid(ids[:split])
    if split < ids.shape[0]:
        grid = replace(grid, reference=_one_grid(ids[split:]))
    if not torch.equal(exact_ids(grid, axes=ids.shape[1]).to(ids.dtype), ids):
        raise ConfigError(
            "CLEAR needs img_ids of one row-major image grid, and at most one reference grid after it "
            "(as FluxPipeline and FluxKontextPipeline make)"
        )
    return grid


def _one_grid(ids: Tensor) -> Grid:
    """The grid that row 0 of these ids starts (checked as a whole by find_grid)."""
    n, rows = ids.shape[0], ids[:, 1]
    width = int((rows != rows[0]).nonzero()[0, 0]) if bool((rows != rows[0]).any()) else n
    return Grid(max(n // width, 1), width, int(ids[0, 1]), int(ids[0, 2]), int(ids[0, 0]))


class GridCache:
    """find_grid, once per ids tensor: a pipeline passes the same img_ids at every step, and reading
    them back from the GPU would synchronise it each time."""

    def __init__(self):
        self._ref, self._version, self._grid = None, -1, None

    def __call__(self, img_ids: Tensor) -> Grid:
        version = None if img_ids.is_inference() else img_ids._version  # inference tensors keep none
        if self._ref is None or self._ref() is not img_ids or self._version != version:
            self._grid = find_grid(img_ids)
            self._ref, self._version = weakref.ref(img_ids), version
        return self._grid
