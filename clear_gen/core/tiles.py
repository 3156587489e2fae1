"""Tiles of a picture for the VAE's exact tiled decode and encode (models/flux1/vae.py): pure geometry.

One grid of tiles is drawn on the latent (h x w latent px, 8 px of the picture each) and scaled to every
level of the VAE (x1, x2, x4, x8 on the way up; x8, x4, x2, x1 on the way down): a resampling by 2 maps
each tile's core onto the next level's core of the same tile, so every level sees the same tiles. Each
side is split into ceil(side / tile) parts of balanced sizes (they differ by at most one latent px), so no
sliver of a last tile is left.

A box is (top, bottom, left, right), half-open, in one level's pixels. A sweep computes some activation on
every tile's core, in raster order, reading a parked activation on a box around the core (the `*_source`
functions below); `releases` says after which tile each parked tile is read for the last time, so a sweep
that parks its own output frees its input as it goes (one tensor's worth, plus about one row of tiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Box = tuple[int, int, int, int]  # (top, bottom, left, right), half-open, in one level's px
Tile = tuple[int, int]  # (row, column) of a tile in its grid

LATENT_PX = 8  # picture pixels per latent pixel: the VAE's three 2x resamplings


def expand(box: Box, by: int) -> Box:
    top, bottom, left, right = box
    return (top - by, bottom + by, left - by, right + by)


def clip(box: Box, bounds: Box) -> Box:
    return (max(box[0], bounds[0]), min(box[1], bounds[1]), max(box[2], bounds[2]), min(box[3], bounds[3]))


def halo_source(box: Box, halo: int, bounds: Box) -> Box:
    """What a stack of `halo` 3 x 3 convolutions reads to make `box`: the box grown by the halo, inside the
    picture (the convolutions' zero padding stands for what lies outside)."""
    return clip(expand(box, halo), bounds)


def up_source(box: Box) -> Box:
    """The low-resolution box that nearest x2 upsampling then a 3 x 3 convolution turn into `box`: rows
    t - 1 .. b of the upsampled picture come from low rows (t - 1) // 2 .. b // 2. It may stick out of the
    picture by one px: zeros there, upsampled, are the convolution's zero padding."""
    top, bottom, left, right = box
    return ((top - 1) // 2, (bottom + 2) // 2, (left - 1) // 2, (right + 2) // 2)


def down_source(box: Box) -> Box:
    """The high-resolution box a 3 x 3 stride-2 convolution without padding reads to make `box`: rows 2t ..
    2b. Beyond the bottom and right edges it reads the one zero row and column diffusers' Downsample2D pads
    there."""
    top, bottom, left, right = box
    return (2 * top, 2 * bottom + 1, 2 * left, 2 * right + 1)


def split(side: int, tile: int) -> tuple[int, ...]:
    """Boundaries of ceil(side / tile) parts of `side`, balanced: (0, ..., side)."""
    n = max(1, math.ceil(side / tile))
    return tuple(k * side // n for k in range(n + 1))


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a latent of rows[-1] x cols[-1] px; at a level of `scale`, every number times it."""

    rows: tuple[int, ...]  # boundaries in latent px: 0 = rows[0] < rows[1] < ... < rows[-1] = height
    cols: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows) - 1, len(self.cols) - 1

    def bounds(self, scale: int = 1) -> Box:
        return (0, self.rows[-1] * scale, 0, self.cols[-1] * scale)

    def tiles(self) -> Iterator[Tile]:
        """Every tile, in raster order: the order of every sweep."""
        n_rows, n_cols = self.shape
        return ((i, j) for i in range(n_rows) for j in range(n_cols))

    def core(self, tile: Tile, scale: int = 1) -> Box:
        i, j = tile
        rows, cols = self.rows, self.cols
        return (rows[i] * scale, rows[i + 1] * scale, cols[j] * scale, cols[j + 1] * scale)

    def touching(self, box: Box, scale: int = 1) -> list[Tile]:
        """The tiles whose cores (at `scale`) overlap `box`, in raster order."""
        rows = _overlapping(self.rows, scale, box[0], box[1])
        return [(i, j) for i in rows for j in _overlapping(self.cols, scale, box[2], box[3])]


def _overlapping(bounds: tuple[int, ...], scale: int, start: int, end: int) -> list[int]:
    """The parts of a split side (its boundaries x scale) that overlap [start, end)."""
    return [k for k in range(len(bounds) - 1) if bounds[k] * scale < end and bounds[k + 1] * scale > start]


def tile_grid(height: int, width: int, tile: int) -> TileGrid:
    """Tiles of at most `tile` latent px a side over an height x width latent."""
    return TileGrid(split(height, tile), split(width, tile))


def releases(
    grid: TileGrid, source: Callable[[Box], Box], scale: int, source_scale: int
) -> dict[Tile, list[Tile]]:
    """For a sweep making every tile's core at `scale` from a parked activation at `source_scale` (`source`:
    the box it reads for a core), the source tiles to free after each tile: those no later tile reads."""
    last: dict[Tile, Tile] = {}
    for tile in grid.tiles():
        for read in grid.touching(source(grid.core(tile, scale)), source_scale):
            last[read] = tile
    after: dict[Tile, list[Tile]] = {tile: [] for tile in grid.tiles()}
    for read, tile in last.items():
        after[tile].append(read)
    return after
