"""`gather`: CLEAR's exact block-sparse attention in plain torch, on any device that runs SDPA.

For each query tile (a 128-token block of the tile order: whole tiles of the image grid), the key blocks
its row of CLEAR's block lists names (geometry.build_block_lists: full blocks, then partial ones) are
gathered side by side, and SDPA runs the tile's queries against them with an additive mask: 0 where
CLEAR attends, -inf elsewhere (the padding of a tile's list shorter than its chunk's widest included).
Tiles run in chunks of consecutive tiles whose working memory (gathered keys and values, scores counted
in float32, the mask) stays within a budget: nothing of size N x N is made, and autograd's backward
runs through the gathers and SDPA.

The mask of a (query block, key block) pair depends only on what the two blocks hold (token kinds and
grid positions relative to each block's corner) and on the offset between their corners, so a
geometry has few distinct 128 x 128 patterns (tens, at any size, when blocks are whole tiles): they are
evaluated once per geometry and each chunk's mask is one lookup. A geometry with more than
MAX_PATTERNS (blocks straddling tiles in many ways) evaluates CLEAR's mask per chunk instead.

Rows holding text have no block structure to exploit: the text queries see every text and image key, so
they run SDPA over those keys directly (no mask, no gather), in row chunks within the budget; the image
queries of a block that also holds text (T not a multiple of 128) run against every key with CLEAR's mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import geometry as G

BUDGET_BYTES = 1 << 30  # working memory of one chunk of tiles (or rows), on the attention's device
MASK_BYTES_PER_PAIR = 32  # an evaluated mask: its int32 temporaries, the bool and the additive mask
MAX_PATTERNS = 1024  # 128 x 128 mask patterns kept per geometry (64 MiB in float32), else evaluated
MASK_PIECE = 64  # block pairs whose mask is evaluated at once (1M entries)
BLOCK = G.BLOCK


@dataclass(frozen=True)
class Work:
    """What one attention call holds per (query, key) pair and per key: batch x heads, head dim, dtype."""

    batch_heads: int
    head_dim: int
    dtype: torch.dtype  # of q, k and v

    @classmethod
    def of(cls, query: Tensor) -> Work:
        """The work of a (B, H, L, D) query."""
        b, h, _, d = query.shape
        return cls(b * h, d, query.dtype)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def pair_bytes(self, masked: bool) -> int:
        """Bytes per (query, key) pair: scores in float32 for every head, and an evaluated mask."""
        return self.batch_heads * 4 + (MASK_BYTES_PER_PAIR if masked else 0)

    def key_bytes(self) -> int:
        """Bytes per gathered key: its key and value for every head."""
        return 2 * self.batch_heads * self.head_dim * self.itemsize


# ---------------------------------------------------------------- a geometry's tiles, once


@dataclass(frozen=True)
class Tiles:
    """The image-only query tiles (query blocks `first`..), each with its key blocks, full ones first."""

    first: int  # the first query block holding no text
    count: Tensor  # (n,) int64: key blocks of each tile
    blocks: Tensor  # (n, K) int64: their indices, padded with 0


@lru_cache(maxsize=16)
def tiles(geo: G.Geometry) -> Tiles:
    """Cached by geometry, as the block mask is: shared by all layers and steps."""
    lists = G.build_block_lists(geo)
    first = math.ceil(geo.text_len / BLOCK)
    fn, pn = lists.full_num[first:].long(), lists.partial_num[first:].long()
    count = fn + pn
    slots = torch.arange(int(count.max()) if count.numel() else 0)
    full = lists.full_idx[first:, : slots.numel()].long()
    after = torch.gather(lists.partial_idx[first:].long(), 1, (slots - fn.view(-1, 1)).clamp(min=0))
    blocks = torch.where(slots < fn.view(-1, 1), full, after)
    return Tiles(first, count, torch.where(slots < count.view(-1, 1), blocks, 0))


@lru_cache(maxsize=16)
def patterns(geo: G.Geometry) -> tuple[Tensor, Tensor] | None:
    """(each tile's pair patterns (n, K), 0 for padding; the patterns (P, 128, 128) bool, row 0 all false),
    or None past MAX_PATTERNS. A pair's pattern is keyed by both blocks' shapes and the offset of their
    image corners (0 when either holds no image token)."""
    t = tiles(geo)
    listed = torch.arange(t.blocks.shape[1]) < t.count.view(-1, 1)
    coordinates = G.kv_coordinates(geo)
    q_shape, q_corner = _block_shapes(geo, geo.q_len, coordinates)
    k_shape, k_corner = _block_shapes(geo, geo.kv_len, coordinates)
    q = torch.arange(t.first, t.first + t.blocks.shape[0]).view(-1, 1).expand_as(t.blocks)[listed]  # (E,)
    k = t.blocks[listed]
    both = (q_corner[q, :1] >= 0) & (k_corner[k, :1] >= 0)
    dy, dx = torch.where(both, k_corner[k] - q_corner[q], 0).unbind(1)
    extent = int(max(coordinates[0].max(), coordinates[1].max()))  # the largest coordinate
    span = 2 * extent + 3  # offsets in (-span / 2, span / 2)
    key = ((q_shape[q] * (int(k_shape.max()) + 1) + k_shape[k]) * span + dy) * span + dx  # one int64 a pair
    unique, inverse = torch.unique(key, return_inverse=True)
    if unique.numel() >= MAX_PATTERNS:
        return None
    firsts = torch.full((unique.numel(),), key.numel()).scatter_reduce_(
        0, inverse, torch.arange(key.numel()), "amin"
    )  # one pair of each pattern
    table = pair_masks(geo, G.make_mask_mod(geo), q[firsts], k[firsts])  # (P - 1, 128, 128)
    ids = torch.zeros_like(t.blocks)
    ids[listed] = inverse + 1
    return ids, torch.cat([torch.zeros(1, BLOCK, BLOCK, dtype=torch.bool), table])


def _block_shapes(geo: G.Geometry, length: int, coordinates) -> tuple[Tensor, Tensor]:
    """(shape id (nb,), image corner (nb, 2), -1 without image tokens) of the blocks of positions 0..length:
    a shape is the blocks' token kinds (text, image, reference, down-sampled, padding) and positions
    relative to the corner (kv_coordinates': grid units, or fine units with a reference), so that two blocks
    of one shape see the same mask from any block at the same offset."""
    n = math.ceil(length / BLOCK)
    ys, xs = (t[: n * BLOCK].long().view(n, BLOCK) for t in coordinates)
    pos = torch.arange(n * BLOCK).view(n, BLOCK)
    kind = (pos >= geo.text_len).long() + (pos >= geo.q_len).long() + (pos >= length).long() * 3
    kind += 4 * ((pos >= geo.text_len + geo.grid_len) & (pos < geo.q_len)).long()  # the reference's: 5
    image = (kind == 1) | (kind == 5)
    big = int(max(ys.max(), xs.max())) + 1
    corner = torch.stack([torch.where(image, c, big).amin(1) for c in (ys, xs)], 1)  # (n, 2)
    rel = [torch.where(image, c - corner[:, i : i + 1], 0) for i, c in enumerate((ys, xs))]
    shape = torch.unique(torch.cat([kind, *rel], 1), dim=0, return_inverse=True)[1]
    return shape, torch.where(image.any(1, keepdim=True), corner, -1)


def pair_masks(geo: G.Geometry, mask_mod, q_blocks: Tensor, k_blocks: Tensor) -> Tensor:
    """CLEAR's mask of (query block, key block) pairs: (E, 128, 128) bool. Keys past kv_len are masked;
    query rows past q_len (the last tile's padding) see every real key, so that they stay finite and
    their zero gradient stays zero. Evaluated MASK_PIECE pairs at a time: a mask_mod's temporaries (int64
    with a reference picture's grid) stay small beside the bool it returns."""
    out = torch.empty(len(q_blocks), BLOCK, BLOCK, dtype=torch.bool, device=q_blocks.device)
    offsets = torch.arange(BLOCK, device=q_blocks.device)
    for s in range(0, len(q_blocks), MASK_PIECE):
        q = (q_blocks[s : s + MASK_PIECE] * BLOCK).view(-1, 1, 1) + offsets.view(1, -1, 1)  # (e, 128, 1)
        k = (k_blocks[s : s + MASK_PIECE] * BLOCK).view(-1, 1, 1) + offsets.view(1, 1, -1)  # (e, 1, 128)
        out[s : s + MASK_PIECE] = (mask_mod(0, 0, q, k) | (q >= geo.q_len)) & (k < geo.kv_len)
    return out


# ---------------------------------------------------------------- sizes and chunks


def tile_bytes(keys: int, work: Work) -> int:
    """Working memory of one query tile against `keys` gathered keys (plus its queries and output)."""
    return keys * (BLOCK * work.pair_bytes(True) + work.key_bytes()) + BLOCK * work.key_bytes()


def widest_tile(geo: G.Geometry) -> int:
    """Key blocks of the widest image-only query tile: what one chunk must hold at least."""
    return tiles(geo).blocks.shape[1]


def unit_problem(geo: G.Geometry, work: Work, budget: int | None = None) -> str | None:
    """Why one query tile alone does not fit in the budget (default BUDGET_BYTES: its keys, the scores of
    every head); None if it does. Text rows are split down to single rows, so only image tiles can fail."""
    budget = BUDGET_BYTES if budget is None else budget
    need = tile_bytes(widest_tile(geo) * BLOCK, work)
    if need <= budget:
        return None
    return (
        f"the gather backend needs {need / 2**30:.1f} GiB for one query tile's {widest_tile(geo)} key blocks "
        f"at this size (its budget is {budget / 2**30:.1f} GiB): use --backend auto or a smaller --window"
    )


def _row_chunks(start: int, stop: int, row_bytes: int, budget: int) -> list[tuple[int, int]]:
    """[start, stop) in pieces of as many rows as the budget holds (at least one)."""
    step = max(budget // max(row_bytes, 1), 1)
    return [(r, min(r + step, stop)) for r in range(start, stop, step)]


@lru_cache(maxsize=64)
def tile_chunks(geo: G.Geometry, work: Work, budget: int) -> tuple[tuple[int, int, int], ...]:
    """(first tile, end tile, key blocks) per chunk: consecutive image-only tiles (rows of Tiles), as many
    as fit in the budget at the chunk's widest list."""
    count = tiles(geo).count.tolist()
    chunks, a = [], 0
    while a < len(count):
        width, e = count[a], a + 1
        while e < len(count) and (e + 1 - a) * tile_bytes(max(width, count[e]) * BLOCK, work) <= budget:
            width, e = max(width, count[e]), e + 1
        chunks.append((a, e, width))
        a = e
    return tuple(chunks)


@dataclass(frozen=True)
class _OnDevice:
    """A geometry's tiles on the attention's device: the table additive, in the attention's dtype."""

    blocks: Tensor
    count: Tensor
    patterns: Tensor | None
    table: Tensor | None  # (P, 128, 128): 0 where CLEAR attends, -inf elsewhere
    mask_mod: object  # CLEAR's: the image rows of a block holding text, and patterns past MAX_PATTERNS


@lru_cache(maxsize=8)
def _on_device(geo: G.Geometry, device: str, dtype: torch.dtype) -> _OnDevice:
    t, found = tiles(geo), patterns(geo)
    ids, table = (
        (None, None) if found is None else (found[0].to(device), _additive(found[1].to(device), dtype))
    )
    return _OnDevice(t.blocks.to(device), t.count.to(device), ids, table, G.make_mask_mod(geo, device))


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as SDPA's additive one: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


# ---------------------------------------------------------------- the attention


def attention(
    query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float, budget: int | None = None
) -> Tensor:
    """CLEAR attention, exact, by gathered key blocks. query (B, H, q_len, D), key/value (B, H, kv_len, D)
    -> (B, H, q_len, D), laid out as (B, q_len, H, D) in memory (what the processor flattens). `budget`:
    bytes of one chunk's working memory (BUDGET_BYTES)."""
    budget = BUDGET_BYTES if budget is None else budget
    b, h, q_len, d = query.shape
    work, dev = Work.of(query), query.device
    on = _on_device(geo, str(dev), query.dtype)
    out = query.new_empty(b, q_len, h, d).transpose(1, 2)  # (B, H, q_len, D) view
    # 1. Text rows: every text and image key, none of the down-sampled ones; no mask.
    keys, values = key[:, :, : geo.q_len], value[:, :, : geo.q_len]
    for r0, r1 in _row_chunks(0, geo.text_len, geo.q_len * work.pair_bytes(False), budget):
        out[:, :, r0:r1] = F.scaled_dot_product_attention(query[:, :, r0:r1], keys, values, scale=scale)
    # 2. Image rows of the block holding the last text tokens: every key, CLEAR's mask evaluated.
    first = tiles(geo).first
    every_key = torch.arange(geo.kv_len, device=dev).view(1, -1)
    for r0, r1 in _row_chunks(
        geo.text_len, min(first * BLOCK, q_len), geo.kv_len * work.pair_bytes(True), budget
    ):
        mask = on.mask_mod(0, 0, torch.arange(r0, r1, device=dev).view(-1, 1), every_key)  # (rows, kv_len)
        out[:, :, r0:r1] = F.scaled_dot_product_attention(query[:, :, r0:r1], key, value, mask, scale=scale)
    # 3. Image-only tiles, in chunks of consecutive tiles: their key blocks gathered.
    for a, e, width in tile_chunks(geo, work, budget):
        r0, r1 = (first + a) * BLOCK, min((first + e) * BLOCK, q_len)
        out[:, :, r0:r1] = _tiles(query, key, value, geo, on, (first + a, a, e, width), scale)
    return out


def _tiles(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, on: _OnDevice, chunk, scale: float):
    """One chunk: query blocks q0.. = tiles a..e, `width` key blocks each -> (B, H, rows, D), the rows of
    its tiles that exist."""
    q0, a, e, width = chunk
    b, h, q_len, d = query.shape
    n, dev = e - a, query.device
    # 1. Keys and values of each tile's blocks, side by side: (B * H, n, width * 128, D).
    ids = on.blocks[a:e, :width]  # (n, width)
    tok = (ids.unsqueeze(-1) * BLOCK + torch.arange(BLOCK, device=dev)).flatten().clamp(max=geo.kv_len - 1)
    k = key.index_select(2, tok).view(b * h, n, -1, d)
    v = value.index_select(2, tok).view(b * h, n, -1, d)
    # 2. Queries: the tiles' rows, the last tile padded to a whole one. (B * H, n, 128, D)
    r0, r1 = q0 * BLOCK, (q0 + n) * BLOCK
    q = query[:, :, r0:r1]
    if r1 > q_len:
        q = F.pad(q, (0, 0, 0, r1 - q_len))
    q = q.reshape(b * h, n, BLOCK, d)
    # 3. The additive mask (1, n, 128, width * 128): looked up, or evaluated (past MAX_PATTERNS).
    rows = torch.arange(BLOCK, device=dev).view(1, -1, 1)
    if on.table is not None:
        mask = on.table[on.patterns[a:e, :width].unsqueeze(1), rows]  # (n, 128, width, 128)
    else:
        q_blocks = torch.arange(q0, q0 + n, device=dev).view(-1, 1).expand(n, width)
        pairs = pair_masks(geo, on.mask_mod, q_blocks.flatten(), ids.flatten()).view(n, width, BLOCK, BLOCK)
        listed = torch.arange(width, device=dev) < on.count[a:e, None]  # (n, width): past a tile's list: none
        mask = _additive((pairs & listed[:, :, None, None]).transpose(1, 2), query.dtype)
    mask = mask.reshape(1, n, BLOCK, width * BLOCK)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B * H, n, 128, D)
    return o.view(b, h, n * BLOCK, d)[:, :, : min(r1, q_len) - r0]
