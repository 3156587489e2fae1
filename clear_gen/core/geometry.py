"""CLEAR's attention pattern as a pure function of the geometry: token order, mask, block mask.

Sequence layout (what every layer sees once the transformer's input is tile-ordered):
    queries: [text T ; image N]              (N = h * w, image tokens in tile order)
    keys:    [text T ; image N ; down M]     (M = (h / f) * (w / f) pooled tokens, any order; 0 if f = 1)
An image query at (y, x) sees all text, the image keys with (y - y')^2 + (x - x')^2 < r^2 and all
down-sampled keys; a text query sees all text and image keys but no down-sampled ones.

With a reference picture (FLUX.1 Kontext) its h_r x w_r tokens follow the image's, tile-ordered on their own
grid, and its pooled keys follow the image's: N counts both grids' tokens, M both grids' cells. Its pattern
is reference.py's (an image query also sees the reference keys in the same circle; a reference query sees
the text, its own grid's circle and the pooled keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import reference as R

BLOCK = 128  # FlexAttention's sparse block size (queries and keys)
DEFAULT_TILE = (8, 16)  # image tokens per tile: rows x cols = 128 = one block
PROPORTIONAL_BASE = 64 * 64 + 512  # 4608 tokens: FLUX's 1024 px training length


@dataclass(frozen=True)
class Geometry:
    text_len: int  # T: text tokens, first in the sequence
    height: int  # h: image token rows (pixels / 16)
    width: int  # w: image token columns
    window: int  # r: image keys strictly inside the circle of radius r
    down_factor: int = 1  # f: one pooled key per f x f cell; 1 = none
    tile: tuple[int, int] = DEFAULT_TILE
    ref_height: int = 0  # h_r: a reference picture's token rows after the image's (FLUX.1 Kontext); 0 = none
    ref_width: int = 0  # w_r
    ref_tile: tuple[int, int] = DEFAULT_TILE

    def __post_init__(self) -> None:
        assert self.text_len >= 0 and self.height > 0 and self.width > 0 and self.window > 0
        assert self.height % self.down_factor == 0 and self.width % self.down_factor == 0
        assert (self.ref_height > 0) == (self.ref_width > 0)
        assert self.ref_height % self.down_factor == 0 and self.ref_width % self.down_factor == 0
        if self.ref_height:
            assert self.frame.fits(self.height, self.width, self.ref_height, self.ref_width, self.window)

    @property
    def grid_len(self) -> int:
        """The image's own tokens, h * w."""
        return self.height * self.width

    @property
    def ref_len(self) -> int:
        """The reference's tokens, h_r * w_r (0 without one)."""
        return self.ref_height * self.ref_width

    @property
    def image_len(self) -> int:
        """Every image token: the image's, then the reference's."""
        return self.grid_len + self.ref_len

    @property
    def down_len(self) -> int:
        f = self.down_factor
        return 0 if f == 1 else self.image_len // (f * f)

    @property
    def frame(self) -> R.Frame:
        """How the reference's grid maps onto the image's (reference.py); only with a reference."""
        return R.Frame.of(self.height, self.width, self.ref_height, self.ref_width)

    def grids(self) -> tuple[tuple[int, Geometry], ...]:
        """(offset among the image tokens, the grid alone as a text-free Geometry): the image's, then the
        reference's if any. What pools keys per grid."""
        own = Geometry(0, self.height, self.width, self.window, self.down_factor, self.tile)
        if not self.ref_len:
            return ((0, own),)
        ref = Geometry(0, self.ref_height, self.ref_width, self.window, self.down_factor, self.ref_tile)
        return (0, own), (self.grid_len, ref)

    @property
    def q_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def kv_len(self) -> int:
        return self.q_len + self.down_len


def choose_tile(height: int, width: int) -> tuple[int, int]:
    """8 x 16 tiles, or 16 x 8 when that divides the width and 8 x 16 does not (blocks stay whole tiles)."""
    if width % 16 and not width % 8:
        return (16, 8)
    return DEFAULT_TILE


def full_window(height: int, width: int) -> int:
    """The smallest window whose circle holds every pair of an h x w grid: full attention over the image."""
    return math.isqrt((height - 1) ** 2 + (width - 1) ** 2) + 1


def image_geometry(
    text_len: int,
    height: int,
    width: int,
    window: int,
    down_factor: int = 1,
    reference: tuple[int, int] | None = None,
) -> Geometry:
    """The geometry a CLEAR transformer runs for this grid (and a reference grid, (h_r, w_r) tokens): the
    tiles come from `choose_tile`; a window wider than every grid is the same mask as the widest
    `full_window`'s, and is made that (one geometry, one kernel). An image-to-reference distance is under
    the image's diagonal plus 2 (centres mapped), hence its + 2."""
    if reference is None:
        window = min(window, full_window(height, width))
        return Geometry(text_len, height, width, window, down_factor, choose_tile(height, width))
    rh, rw = reference
    window = min(window, max(full_window(height, width) + 2, full_window(rh, rw)))
    tile, ref_tile = choose_tile(height, width), choose_tile(rh, rw)
    return Geometry(text_len, height, width, window, down_factor, tile, rh, rw, ref_tile)


def attention_scale(geo: Geometry, head_dim: int, proportional: bool) -> float:
    """Softmax scale: 1/sqrt(d), or CLEAR's proportional sqrt(log_4608(N) / d) (log_4608(10 N) if f > 1)."""
    if not proportional:
        return 1.0 / math.sqrt(head_dim)
    n = geo.q_len * (10 if geo.down_factor > 1 else 1)
    return math.sqrt(math.log(n, PROPORTIONAL_BASE) / head_dim)


# ---------------------------------------------------------------- token order


@lru_cache(maxsize=32)
def tile_order(height: int, width: int, tile: tuple[int, int] = DEFAULT_TILE) -> torch.Tensor:
    """perm[i] = row-major index of the i-th token in tile order (tiles row-major, row-major inside).

    Edge tiles are cut to the grid, so any h x w works; `x[:, perm]` tile-orders a row-major sequence.
    """
    th, tw = tile
    y = torch.arange(height).view(-1, 1)  # (h, 1)
    x = torch.arange(width).view(1, -1)  # (1, w)
    ty, tx = y // th, x // tw
    tile_h = torch.clamp(height - ty * th, max=th)  # rows of the tile holding (y, x)
    tile_w = torch.clamp(width - tx * tw, max=tw)
    # Tokens before this tile's row of tiles, before this tile in its row, then inside the tile.
    key = ty * th * width + tx * tw * tile_h + (y % th) * tile_w + (x % tw)  # (h, w): position in tile order
    return torch.argsort(key.flatten())


@lru_cache(maxsize=32)
def inverse_order(height: int, width: int, tile: tuple[int, int] = DEFAULT_TILE) -> torch.Tensor:
    """inv[j] = tile-order position of row-major token j; `x[:, inv]` undoes `x[:, perm]`."""
    return _inverse(tile_order(height, width, tile))


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


@lru_cache(maxsize=32)
def image_order(geo: Geometry) -> torch.Tensor:
    """perm over every image token (N): the image's grid in tile order, then the reference's (its own
    tiles) after it; `x[:, perm]` orders a row-major [image ; reference] sequence."""
    perm = tile_order(geo.height, geo.width, geo.tile)
    if not geo.ref_len:
        return perm
    return torch.cat([perm, geo.grid_len + tile_order(geo.ref_height, geo.ref_width, geo.ref_tile)])


@lru_cache(maxsize=32)
def image_inverse(geo: Geometry) -> torch.Tensor:
    """inv of image_order: `x[:, inv]` undoes `x[:, perm]`."""
    return inverse_order(geo.height, geo.width, geo.tile) if not geo.ref_len else _inverse(image_order(geo))


def kv_coordinates(geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, xs): grid row and column of every key position (text and down entries are 0), int32; with a
    reference, every image token's fine coordinates (reference.py), int64.

    Padded to whole blocks so that a mask_mod may index any position of a partial block.
    """
    padded = math.ceil(geo.kv_len / BLOCK) * BLOCK
    if geo.ref_len:
        return _fine_coordinates(geo, padded)
    ys = torch.zeros(padded, dtype=torch.int32)
    xs = torch.zeros(padded, dtype=torch.int32)
    perm = tile_order(geo.height, geo.width, geo.tile)
    image = slice(geo.text_len, geo.q_len)
    ys[image] = (perm // geo.width).to(torch.int32)
    xs[image] = (perm % geo.width).to(torch.int32)
    return ys, xs


def _fine_coordinates(geo: Geometry, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_coordinates with a reference: the image's tokens at (2y + 1) b, the reference's at (2y' + 1) a."""
    ys = torch.zeros(padded, dtype=torch.int64)
    xs = torch.zeros(padded, dtype=torch.int64)
    frame, start = geo.frame, geo.text_len
    units = ((frame.b_y, frame.b_x), (frame.a_y, frame.a_x))
    for (offset, grid), (unit_y, unit_x) in zip(geo.grids(), units, strict=True):
        perm = tile_order(grid.height, grid.width, grid.tile)
        part = slice(start + offset, start + offset + grid.grid_len)
        ys[part], xs[part] = R.fine(perm // grid.width, perm % grid.width, unit_y, unit_x)
    return ys, xs


# ---------------------------------------------------------------- the mask


def make_mask_mod(geo: Geometry, device: torch.device | str = "cpu"):
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) of CLEAR over the tile-ordered sequence."""
    ys, xs = (t.to(device) for t in kv_coordinates(geo))
    if geo.ref_len:
        image_end = geo.text_len + geo.grid_len
        return R.mask_mod(ys, xs, geo.text_len, image_end, geo.q_len, geo.frame, geo.window)
    text_len, q_len, r2 = geo.text_len, geo.q_len, geo.window**2

    def clear_mask(b, h, q_idx, kv_idx):
        dy = ys[q_idx] - ys[kv_idx]
        dx = xs[q_idx] - xs[kv_idx]
        kv_down = kv_idx >= q_len
        image_row = (kv_idx < text_len) | kv_down | (dy * dy + dx * dx < r2)
        return torch.where(q_idx < text_len, ~kv_down, image_row)

    return clear_mask


def dense_mask(geo: Geometry, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (q_len, kv_len) boolean mask, True = attend. Memory O(q_len * kv_len): small sizes only."""
    q = torch.arange(geo.q_len, device=device).view(-1, 1)
    kv = torch.arange(geo.kv_len, device=device).view(1, -1)
    return make_mask_mod(geo, device)(0, 0, q, kv)


def needed_pairs(geo: Geometry) -> int:
    """Exact count of True entries of the mask, in O(min(r, h)): the work an ideal kernel would do (with a
    reference, its grid's circles too, and the image-to-reference pairs counted by reference.py)."""
    T, N, M = geo.text_len, geo.image_len, geo.down_len
    pairs = T * (T + N) + N * (T + M) + _window_pairs(geo.height, geo.width, geo.window)
    if geo.ref_len:
        h, w, rh, rw, r = geo.height, geo.width, geo.ref_height, geo.ref_width, geo.window
        pairs += _window_pairs(rh, rw, r) + R.image_reference_pairs(h, w, rh, rw, r)
    return pairs


def _window_pairs(h: int, w: int, r: int) -> int:
    """Pairs of an h x w grid within the circle. Per row offset dy, the columns |dx| <= k with
    dx^2 < r^2 - dy^2 pair (h - |dy|) (w - |dx|) tokens: summed over dx, (h - |dy|) (w (2k + 1) - k (k + 1)).
    """
    pairs = 0
    for dy in range(-min(r, h) + 1, min(r, h)):
        k = min(math.isqrt(r * r - dy * dy - 1), w - 1)  # the largest |dx| inside the circle
        pairs += (h - abs(dy)) * (w * (2 * k + 1) - k * (k + 1))
    return pairs


# ---------------------------------------------------------------- block mask, analytically


@dataclass(frozen=True)
class BlockLists:
    """Per query block, the key blocks to compute: `partial` (mask_mod applied) and `full` (no mask).

    Each is (count (nq,), indices (nq, width)) in FlexAttention's kv_num_blocks / kv_indices layout.
    """

    partial_num: torch.Tensor
    partial_idx: torch.Tensor
    full_num: torch.Tensor
    full_idx: torch.Tensor

    def computed_pairs(self) -> int:
        return int(self.partial_num.sum() + self.full_num.sum()) * BLOCK * BLOCK


@dataclass(frozen=True)
class _Blocks:
    """What each block of 128 sequence positions holds: token kinds and the image tokens' bounding box
    (grid units; with a reference, fine units: reference.py)."""

    text: torch.Tensor  # (n,) bool: holds a text token
    image: torch.Tensor  # (n,) bool: holds an image token (the image's or the reference's)
    own: torch.Tensor  # (n,) bool: holds a token of the image's own grid
    ref: torch.Tensor  # (n,) bool: holds a reference token
    down: torch.Tensor  # (n,) bool: holds a down-sampled token
    y0: torch.Tensor  # (n,) image bbox rows [y0, y1] and columns [x0, x1], int64
    y1: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    ragged: torch.Tensor  # (n,) bool: its image tokens do not fill their bbox (block straddles tiles)


def _summarise(geo: Geometry, length: int) -> _Blocks:
    n = math.ceil(length / BLOCK)
    ys, xs = (t[: n * BLOCK].long().view(n, BLOCK) for t in kv_coordinates(geo))  # (n, 128) each
    pos = torch.arange(n * BLOCK).view(n, BLOCK)
    is_image = (pos >= geo.text_len) & (pos < geo.q_len)
    is_ref = is_image & (pos >= geo.text_len + geo.grid_len)
    big = int(max(ys.max(), xs.max())) + 1
    y0, y1 = torch.where(is_image, ys, big).amin(1), torch.where(is_image, ys, -big).amax(1)
    x0, x1 = torch.where(is_image, xs, big).amin(1), torch.where(is_image, xs, -big).amax(1)
    ref, own = is_ref.any(1), (is_image & ~is_ref).any(1)
    unit_y, unit_x = _units(geo, ref)  # grid rows and columns per coordinate step
    area = ((y1 - y0) // unit_y + 1).clamp(min=0) * ((x1 - x0) // unit_x + 1).clamp(min=0)
    return _Blocks(
        text=(pos < geo.text_len).any(1),
        image=is_image.any(1),
        own=own,
        ref=ref,
        down=((pos >= geo.q_len) & (pos < length)).any(1),
        y0=y0,
        y1=y1,
        x0=x0,
        x1=x1,
        ragged=(is_image.sum(1) < area) | (ref & own),  # a block holding both grids: never a rectangle
    )


def _units(geo: Geometry, ref: torch.Tensor) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """Coordinate steps between neighbouring tokens of a block's grid: 1 without a reference, else the
    fine units' 2b (the image's grid) or 2a (the reference's)."""
    if not geo.ref_len:
        return 1, 1
    f = geo.frame
    return torch.where(ref, 2 * f.a_y, 2 * f.b_y), torch.where(ref, 2 * f.a_x, 2 * f.b_x)


def _sides(geo: Geometry) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((c_y, c_x, bound) of the image side, of the reference side): a pair D_y, D_x (in kv_coordinates'
    units) is within the circle when D_y^2 c_y + D_x^2 c_x < bound."""
    r = geo.window
    if not geo.ref_len:
        return (1, 1, r * r), (1, 1, r * r)
    return geo.frame.image_side(r), geo.frame.reference_side(r)


def _classify(q: _Blocks, qi: torch.Tensor, kv: _Blocks, ki: torch.Tensor, sides):
    """(any, full) for query blocks qi (nq, 1) against key blocks ki (nq, K); ki < 0 = no candidate.
    `sides`: _sides(geo). Image queries of the image's grid see both grids' keys in the image-side circle;
    reference queries see the reference's keys in the reference-side circle, and no key of the image's."""
    valid = ki >= 0
    k = ki.clamp(min=0)
    qt, qm, kt, km, kd = q.text[qi], q.image[qi], kv.text[k], kv.image[k], kv.down[k]
    q_own, q_ref, k_own, k_ref = q.own[qi], q.ref[qi], kv.own[k], kv.ref[k]
    gap_y = torch.clamp(torch.maximum(q.y0[qi] - kv.y1[k], kv.y0[k] - q.y1[qi]), min=0)
    gap_x = torch.clamp(torch.maximum(q.x0[qi] - kv.x1[k], kv.x0[k] - q.x1[qi]), min=0)
    span_y = torch.maximum(q.y1[qi] - kv.y0[k], kv.y1[k] - q.y0[qi])
    span_x = torch.maximum(q.x1[qi] - kv.x0[k], kv.x1[k] - q.x0[qi])
    (iy, ix, image_bound), (ry, rx, ref_bound) = sides
    near = q_own & km & (gap_y**2 * iy + gap_x**2 * ix < image_bound)  # some pair may be in the circle
    near_ref = q_ref & k_ref & (gap_y**2 * ry + gap_x**2 * rx < ref_bound)
    inside = span_y**2 * iy + span_x**2 * ix < image_bound  # every pair of the two bboxes is in it
    inside_ref = span_y**2 * ry + span_x**2 * rx < ref_bound
    any_ = valid & ((qt & (kt | km)) | (qm & (kt | kd)) | near | near_ref)
    full = any_ & ~(qt & kd) & ~(q_ref & k_own) & (~(q_own & km) | inside) & (~(q_ref & k_ref) | inside_ref)
    return any_, full


REFINE_BUDGET = 1 << 25  # mask evaluations allowed to sharpen bbox guesses on ragged blocks


def _refine(geo: Geometry, q: _Blocks, qi: torch.Tensor, kv: _Blocks, ki: torch.Tensor, any_, full):
    """Exact (any, full) for candidate pairs touching a ragged block, by evaluating their 128 x 128 masks.

    Bounding boxes are exact for blocks that are whole tiles (the usual case: T a multiple of 128 and
    the grid's width a multiple of the tile's), and a conservative guess otherwise; within
    REFINE_BUDGET evaluations the guesses are replaced by the truth, beyond it they stay (still exact
    attention: a guessed-partial block only costs work).
    """
    k = ki.clamp(min=0)
    todo = any_ & (q.ragged[qi] | kv.ragged[k])
    pairs = torch.nonzero(todo)  # (P, 2): row in qi, column in ki
    if pairs.shape[0] == 0 or pairs.shape[0] * BLOCK * BLOCK > REFINE_BUDGET:
        return any_, full
    offs = torch.arange(BLOCK)
    q_idx = (qi.view(-1)[pairs[:, 0]] * BLOCK).view(-1, 1, 1) + offs.view(1, -1, 1)  # (P, 128, 1)
    kv_idx = (k[pairs[:, 0], pairs[:, 1]] * BLOCK).view(-1, 1, 1) + offs.view(1, 1, -1)  # (P, 1, 128)
    real = (q_idx < geo.q_len) & (kv_idx < geo.kv_len)
    sub = make_mask_mod(geo)(0, 0, q_idx, kv_idx) & real  # (P, 128, 128)
    any_, full = any_.clone(), full.clone()
    any_[pairs[:, 0], pairs[:, 1]] = sub.flatten(1).any(1)
    full[pairs[:, 0], pairs[:, 1]] = (sub | ~real).flatten(1).all(1)
    return any_, full


def _compact(keep: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of idx (nq, K) reduced to their kept entries, left-aligned: (count (nq,), indices (nq, K'))."""
    num = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept entries first, in order
    width = max(int(num.max()) if num.numel() else 0, 1)
    out = torch.gather(idx.clamp(min=0), 1, order[:, :width])
    out = torch.where(torch.arange(width) < num.view(-1, 1), out, 0)
    return num.to(torch.int32), out.to(torch.int32)


def _image_candidates(geo: Geometry, q: _Blocks, rows: torch.Tensor) -> torch.Tensor:
    """Key blocks that may hold image tokens within r of query blocks `rows`: (len(rows), K), -1 padded.
    With a reference: the image grid's near an image query's bbox, and the reference grid's near any
    image query's (image-side reach) or reference query's (reference-side reach)."""
    if rows.numel() == 0:
        return torch.zeros(0, 0, dtype=torch.long)
    box = q.y0[rows], q.y1[rows], q.x0[rows], q.x1[rows]
    own = (0, geo.height, geo.width, geo.tile)
    if not geo.ref_len:
        reach = geo.window - 1
        near = (box[0] - reach, box[1] + reach, box[2] - reach, box[3] + reach)
        return _grid_candidates(geo.text_len, own, near, torch.ones_like(rows, dtype=torch.bool))
    frame, r = geo.frame, geo.window
    (iy, ix), (ry, rx) = frame.reach(r, False), frame.reach(r, True)
    y0, y1, x0, x1 = box
    image_rows = R.grid_rows(y0 - iy, y1 + iy, frame.b_y)
    image_cols = R.grid_rows(x0 - ix, x1 + ix, frame.b_x)
    near_image = _grid_candidates(geo.text_len, own, (*image_rows, *image_cols), q.own[rows])
    ref_y = torch.maximum(torch.where(q.own[rows], iy, 0), torch.where(q.ref[rows], ry, 0))
    ref_x = torch.maximum(torch.where(q.own[rows], ix, 0), torch.where(q.ref[rows], rx, 0))
    ref_rows = R.grid_rows(y0 - ref_y, y1 + ref_y, frame.a_y)
    ref_cols = R.grid_rows(x0 - ref_x, x1 + ref_x, frame.a_x)
    grid = (geo.grid_len, geo.ref_height, geo.ref_width, geo.ref_tile)
    near_ref = _grid_candidates(geo.text_len, grid, (*ref_rows, *ref_cols), torch.ones_like(q.own[rows]))
    return torch.cat([near_image, near_ref], dim=1)


def _grid_candidates(text_len: int, grid, near, use: torch.Tensor) -> torch.Tensor:
    """Key blocks holding a grid's tokens in rows near[0]..near[1] and columns near[2]..near[3] (each (nq,),
    unclamped; nothing where the range is empty or `use` is False): (nq, K), -1 padded. `grid`: (its first
    image position, h, w, tile).

    With tiles row-major, the tiles a range touches in one tile row are contiguous in the sequence, so
    each tile row contributes one contiguous range of key blocks: O(blocks * r^2 / tile).
    """
    offset, h, w, (th, tw) = grid
    nty, ntx = math.ceil(h / th), math.ceil(w / tw)
    sizes = torch.clamp(h - torch.arange(nty) * th, max=th).view(-1, 1) * torch.clamp(
        w - torch.arange(ntx) * tw, max=tw
    ).view(1, -1)  # (nty, ntx) tokens per tile
    start = text_len + offset + torch.cumsum(sizes.flatten(), 0).view(nty, ntx) - sizes  # first position
    end = start + sizes - 1  # last position
    y_lo, y_hi, x_lo, x_hi = near
    use = (
        use & (y_lo <= h - 1) & (y_hi >= 0) & (x_lo <= w - 1) & (x_hi >= 0) & (y_lo <= y_hi) & (x_lo <= x_hi)
    )
    ty0, ty1 = y_lo.clamp(min=0, max=h - 1) // th, y_hi.clamp(min=0, max=h - 1) // th
    tx0, tx1 = x_lo.clamp(min=0, max=w - 1) // tw, x_hi.clamp(min=0, max=w - 1) // tw
    if not bool(use.any()):
        return torch.full((len(use), 0), -1, dtype=torch.long)
    n_rows = int((ty1 - ty0)[use].max()) + 1
    ty = ty0.view(-1, 1) + torch.arange(n_rows)  # (nq, n_rows)
    row_ok = (ty <= ty1.view(-1, 1)) & use.view(-1, 1)
    ty = ty.clamp(max=nty - 1)
    first = start[ty, tx0.view(-1, 1).expand_as(ty)] // BLOCK  # (nq, n_rows) first key block
    last = end[ty, tx1.view(-1, 1).expand_as(ty)] // BLOCK
    n_cols = int((last - first)[row_ok].max()) + 1
    cand = first.unsqueeze(-1) + torch.arange(n_cols)  # (nq, n_rows, n_cols)
    ok = row_ok.unsqueeze(-1) & (cand <= last.unsqueeze(-1))
    return torch.where(ok, cand, -1).flatten(1)


def build_block_lists(geo: Geometry) -> BlockLists:
    """Full and partial key blocks per query block, from the tile geometry alone (no N^2 mask).

    Query blocks holding text see every key block; the others see the text blocks, the down-sampled
    blocks and the image blocks near their bounding box. A block pair is full when every image pair
    in the two bounding boxes lies inside the circle, empty when none can, partial otherwise.
    """
    sides = _sides(geo)
    q, kv = _summarise(geo, geo.q_len), _summarise(geo, geo.kv_len)
    nq, nk = q.text.numel(), kv.text.numel()
    text_blocks = torch.arange(math.ceil(geo.text_len / BLOCK))
    down_blocks = torch.arange(geo.q_len // BLOCK, nk) if geo.down_len else torch.arange(0)
    # 1. Query blocks with text tokens: their rows are (almost) full, every key block is a candidate.
    text_rows = torch.nonzero(q.text).flatten()
    cand_text = torch.arange(nk).expand(len(text_rows), nk)
    # 2. Image-only query blocks: text blocks, down blocks and nearby image blocks, deduplicated.
    img_rows = torch.nonzero(~q.text).flatten()
    cand_img = (
        torch.cat(
            [
                text_blocks.expand(len(img_rows), -1),
                down_blocks.expand(len(img_rows), -1),
                _image_candidates(geo, q, img_rows),
            ],
            dim=1,
        )
        .sort(dim=1)
        .values
    )
    repeated = torch.zeros_like(cand_img, dtype=torch.bool)
    repeated[:, 1:] = cand_img[:, 1:] == cand_img[:, :-1]
    cand_img = torch.where(repeated, -1, cand_img)
    # 3. Classify each candidate and pack both groups into FlexAttention's layout.
    parts = []
    for rows, cand in ((text_rows, cand_text), (img_rows, cand_img)):
        any_, full = _classify(q, rows.view(-1, 1), kv, cand, sides)
        any_, full = _refine(geo, q, rows.view(-1, 1), kv, cand, any_, full)
        parts.append((rows, *_compact(any_ & ~full, cand), *_compact(full, cand)))
    return _merge(nq, nk, parts)


def _merge(nq: int, nk: int, parts) -> BlockLists:
    """Scatter the row groups back into one (nq,) / (nq, nk) set of tensors (FlexAttention wants nk wide)."""
    out = []
    for col in (1, 3):  # partial, full
        width = nk
        num = torch.zeros(nq, dtype=torch.int32)
        idx = torch.zeros(nq, width, dtype=torch.int32)
        for p in parts:
            rows, n, i = p[0], p[col], p[col + 1]
            num[rows] = n
            idx[rows, : i.shape[1]] = i
        out += [num, idx]
    return BlockLists(*out)


@lru_cache(maxsize=16)
def block_mask(geo: Geometry, device: str, q_blocks: bool = False, rows: int = BLOCK):
    """FlexAttention BlockMask of CLEAR for this geometry, cached: shared by all layers and steps.

    q_blocks: also the key blocks' query-block lists (the kv lists transposed), which FlexAttention's
    backward pass needs; inference leaves them out. rows: query rows per block, a multiple of 128 (key
    blocks stay 128): FlashAttention-4 on Blackwell takes 256 (coarser_rows).
    """
    lists, mask_mod = build_block_lists(geo), make_mask_mod(geo, device)
    lists = lists if rows == BLOCK else coarser_rows(lists, rows // BLOCK)
    return _block_mask(lists, 0, mask_mod, (geo.q_len, geo.kv_len), device, q_blocks, rows)


def coarser_rows(lists: BlockLists, factor: int) -> BlockLists:
    """The block lists with query blocks of `factor` x 128 rows: a key block is listed for a coarse block
    when one of its 128-row blocks lists it, and full when each of them has it full (a block past the
    sequence's end counts as full: its rows do not exist). Key blocks stay 128 wide; computed_pairs()
    counts 128-row blocks, so it does not hold for these."""
    nq, nk = lists.partial_idx.shape

    def dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # (nq, nk) bool: the listed blocks
        listed = (torch.arange(nk) < num.view(-1, 1)).int()  # (nq, nk): entries before each row's count
        return torch.zeros(nq, nk, dtype=torch.int32).scatter_add_(1, idx.long(), listed) > 0

    full = dense(lists.full_num, lists.full_idx)
    listed = full | dense(lists.partial_num, lists.partial_idx)
    pad = -nq % factor  # (nq + pad, nk) -> (nq / factor, factor, nk): the 128-row blocks of each coarse one
    listed = F.pad(listed, (0, 0, 0, pad), value=False).view(-1, factor, nk).any(1)
    full = F.pad(full, (0, 0, 0, pad), value=True).view(-1, factor, nk).all(1) & listed
    return BlockLists(*_from_dense(listed & ~full), *_from_dense(full))


def _from_dense(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, nk) bool -> (count (n,), indices (n, nk)), kept blocks first in order: FlexAttention's layout."""
    num = keep.sum(1)
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    idx = torch.where(torch.arange(keep.shape[1]) < num.view(-1, 1), idx, 0)
    return num.to(torch.int32), idx.to(torch.int32)


def image_rows_block_mask(geo: Geometry, device: str):
    """CLEAR's BlockMask for the image queries alone (rows T.. of the full mask; T a multiple of 128).

    For measuring what the text query rows cost (they visit every key block): the kernel with these rows
    and SDPA for the text rows, against the one kernel over all rows.
    """
    assert geo.text_len % BLOCK == 0, "image query rows start on a block boundary"
    full_mod, text_len = make_mask_mod(geo, device), geo.text_len

    def image_rows(b, h, q_idx, kv_idx):
        return full_mod(b, h, q_idx + text_len, kv_idx)

    lists = build_block_lists(geo)
    return _block_mask(lists, text_len // BLOCK, image_rows, (geo.image_len, geo.kv_len), device)


def _block_mask(
    lists: BlockLists,
    first_row: int,
    mask_mod,
    seq_lengths: tuple[int, int],
    device: str,
    q_blocks: bool = False,
    rows: int = BLOCK,
):
    """A BlockMask from our block lists' query-block rows first_row.. (no mask evaluated to build it);
    query blocks of `rows` rows, key blocks of 128."""
    from torch.nn.attention.flex_attention import BlockMask

    as4d = lambda t: t[first_row:].to(device)[None, None]  # noqa: E731  (1, 1, nq[, width]): all batches, heads
    return BlockMask.from_kv_blocks(
        as4d(lists.partial_num),
        as4d(lists.partial_idx),
        as4d(lists.full_num),
        as4d(lists.full_idx),
        BLOCK_SIZE=(rows, BLOCK),
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
        compute_q_blocks=q_blocks,
    )
