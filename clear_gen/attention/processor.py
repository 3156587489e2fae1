"""CLEAR's attention processor: the stock processor's projections, q/k norm and RoPE (the model family
says what they are: models.attention), then CLEAR's masked attention (backends.py) over the tile-ordered
sequence, with the down-sampled keys pooled in place, then the module's own output projections.

The processor takes the arguments the attention module passes its stock processor and keeps diffusers'
(batch, seq, heads, head_dim) layout; it reads the layout of the current forward from the state its
model's hooks set (hooks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import geometry as G
from .backends import clear_attention
from .state import ClearState

ROPE_CHUNK_TOKENS = 8192  # tokens per slice of q/k norm and RoPE (whose float32 temporaries are 6x q's size)


def pool_keys(x: Tensor, geo: G.Geometry, inv: Tensor, weight: Tensor) -> Tensor:
    """Down-sampled tokens: sum_{i,j<f} s[i,j] x[cell_y*f+i, cell_x*f+j]. x: (B, N, H, D) tile order.

    Returns (B, M, H, D), one token per f x f cell. Attention treats every down-sampled key alike (all
    image queries see all of them, text queries none), so their order is free: cells come in tile order,
    pooled from strided views of x without a copy of it. Tiles whose sides f does not divide fall back to
    a gather into row-major order.
    """
    f, (th, tw) = geo.down_factor, geo.tile
    s = weight.view(f, f)
    if th % f or tw % f:
        grid = x[:, inv].unflatten(1, (geo.height // f, f, geo.width // f, f))  # (B, h/f, f, w/f, f, H, D)
        return _weighted_cells(grid, s).flatten(1, 2)  # (B, M, H, D), row-major cells
    pieces = []
    for rows, band in _tile_bands(x, geo):  # band: (B, R, rows * w, H, D), R tile rows of `rows` rows
        main = geo.width // tw * tw  # columns in whole-width tiles; the rest is the edge tile
        if main:
            tiles = band[:, :, : rows * main].unflatten(2, (main // tw, rows // f, f, tw // f, f))
            pieces.append(_weighted_cells(tiles, s).flatten(1, -3))  # (B, cells, H, D)
        if geo.width > main:
            edge = band[:, :, rows * main :].unflatten(2, (rows // f, f, (geo.width - main) // f, f))
            pieces.append(_weighted_cells(edge, s).flatten(1, -3))
    return torch.cat(pieces, dim=1)


def pool_grids(x: Tensor, geo: G.Geometry, inv: Tensor, weight: Tensor) -> Tensor:
    """pool_keys over every grid of the image tokens x (B, N, H, D), tile order: the image's cells, then a
    reference's (each grid pooled on its own: geometry.Geometry.grids). (B, M, H, D)."""
    if not geo.ref_len:
        return pool_keys(x, geo, inv, weight)
    parts = []
    for offset, grid in geo.grids():
        rows = slice(offset, offset + grid.grid_len)
        parts.append(pool_keys(x[:, rows], grid, inv[rows] - offset, weight))
    return torch.cat(parts, dim=1)


def _tile_bands(x: Tensor, geo: G.Geometry) -> list[tuple[int, Tensor]]:
    """Tile-ordered (B, N, H, D) as rows of tiles: whole-height ones, then the cut last one if any."""
    th, w = geo.tile[0], geo.width
    whole = geo.height // th
    bands = [(th, x[:, : whole * th * w].unflatten(1, (whole, th * w)))] if whole else []
    if geo.height > whole * th:
        rest = geo.height - whole * th
        bands.append((rest, x[:, whole * th * w :].unflatten(1, (1, rest * w))))
    return bands


def _weighted_cells(v: Tensor, s: Tensor) -> Tensor:
    """(..., a=f, cols, b=f, H, D) -> (..., cols, H, D): sum of s[a, b] * v[..., a, :, b], in float32."""
    f = s.shape[0]
    out = torch.zeros(v[..., 0, :, 0, :, :].shape, dtype=torch.float32, device=v.device)
    for a in range(f):
        for b in range(f):
            out.add_(v[..., a, :, b, :, :].float() * s[a, b].float())
    return out.to(v.dtype)


class ClearAttnProcessor(torch.nn.Module):
    """The stock attention processor with CLEAR's local attention. An nn.Module so that `spatial_weight`
    is saved and loaded as `...attn.processor.spatial_weight`, as in the published checkpoints."""

    def __init__(self, state: ClearState, like: Tensor):
        super().__init__()
        self._state = [state]  # a list, so nn.Module does not try to register or copy it
        f = state.config.down_factor
        if f > 1:
            init = torch.full((1, 1, 1, f, 1, f, 1), 1.0 / f**2, dtype=like.dtype, device=like.device)
            self.spatial_weight = torch.nn.Parameter(init, requires_grad=False)

    def __call__(self, attn, *args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
        """Whatever the attention module's own processor returns; its arguments as the module passes them
        (its family's adapter names them: models.attention)."""
        state = self._state[0]
        layout = state.layout
        assert layout is not None, "CLEAR attention runs inside its transformer's forward (hooks set it up)"
        call = state.family.attention_call(attn, args, kwargs)
        assert call.mask is None, "CLEAR attention takes no attention_mask"
        geo, text, head_dim, parallel = layout.geometry, call.text, attn.head_dim, state.parallel
        if text is not None:
            assert parallel is not None or text.shape[1] == geo.text_len
        parts = state.family.attention_parts(attn, call.hidden, text)
        # 1. Projections, q/k RMSNorm and RoPE, as the stock processor computes them: (B, L, H, D), text
        # first. In sequence mode L is this rank's slice of the tokens.
        extra = geo.kv_len - geo.q_len if parallel is None else 0  # room for the down-sampled keys
        query, key, v_parts = _projected(parts, call.rope, head_dim, extra)
        # 2. Down-sampled keys and values (from post-norm, post-RoPE keys), after the image's.
        if parallel is None:
            assert query.shape[1] == geo.q_len, (query.shape, geo)
            key, value = self._with_down_sampled(key, v_parts, geo, layout, head_dim)
        else:  # sequence mode: every token for this rank's heads, (B, T + N, H/P, D), then pool
            value = torch.cat(v_parts, dim=1) if len(v_parts) > 1 else v_parts[0]
            query, key, value = parallel.gather_heads(query, key, value.unflatten(-1, (-1, head_dim)))
            assert query.shape[1] == geo.q_len, (query.shape, geo)
            if geo.down_factor > 1:
                image = slice(geo.text_len, geo.q_len)
                key = torch.cat([key, pool_grids(key[:, image], geo, layout.inv, self.spatial_weight)], dim=1)
                value = torch.cat(
                    [value, pool_grids(value[:, image], geo, layout.inv, self.spatial_weight)], 1
                )
        del v_parts
        # 3. Attention over (B, H, L, D).
        scale = G.attention_scale(geo, attn.head_dim, state.config.proportional_attention)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
        out = clear_attention(q, k, v, geo, scale, state.config.backend, state.note)  # (B, H, T + N, D)
        out = out.transpose(1, 2)  # (B, T + N, H, D)
        if state.parallel is not None:  # sequence mode: back to this rank's tokens, every head
            out = state.parallel.scatter_heads(out)
        out = out.flatten(2, 3).to(query.dtype)  # (B, L, H * D)
        del q, k, v, query, key, value
        # 4. Output projections, exactly as the stock processor.
        return parts.output(out)

    def _with_down_sampled(self, key: Tensor, v_parts: list[Tensor], geo: G.Geometry, layout, head_dim: int):
        """(key, value) with the pooled keys written into key's spare rows and the pooled values appended:
        (B, kv_len, H, D) each."""
        if geo.down_factor > 1:
            keys = key[:, geo.text_len : geo.q_len]
            key[:, geo.q_len :] = pool_grids(keys, geo, layout.inv, self.spatial_weight)
            values = v_parts[-1][:, -geo.image_len :].unflatten(-1, (-1, head_dim))  # (B, N, H, D)
            v_parts.append(pool_grids(values, geo, layout.inv, self.spatial_weight).flatten(2, 3))
        value = torch.cat(v_parts, dim=1) if len(v_parts) > 1 else v_parts[0]  # (B, kv_len, H * D)
        return key, value.unflatten(-1, (-1, head_dim))  # (B, kv_len, H, D)


def attention_bytes(text_len: int, image_len: int, hidden: int, e: int, down: int = 1) -> int:
    """Peak bytes this processor holds for attention on T + N tokens of `hidden` channels at e bytes an
    element: q, k, v and the value concatenation (4 copies), or 3 and one norm/RoPE slice of
    ROPE_CHUNK_TOKENS tokens (its float32 temporaries: 2e + 12 bytes an element), whichever is larger, and
    the down-sampled keys and values (the memory plan: each family's activations.py)."""
    tokens = text_len + image_len
    x = tokens * hidden
    pooled = image_len // down**2 * hidden if down > 1 else 0
    rope_slice = min(tokens, ROPE_CHUNK_TOKENS) * hidden * (2 * e + 12)
    return max(4 * x * e, 3 * x * e + rope_slice) + 3 * pooled * e


def _projected(parts, rope, head_dim: int, extra: int) -> tuple[Tensor, Tensor, list]:
    """(query (B, L, H, D), key (B, L + extra, H, D), [text values,] image values (B, l, H * D)): the
    projections of `parts` (models.attention.AttentionParts), one kind at a time, then q/k RMSNorm and RoPE
    over token slices (the same values, _normed_rotated)."""
    query = _normed_rotated([(project(), norm) for project, norm in parts.query], rope, head_dim)
    key = _normed_rotated([(project(), norm) for project, norm in parts.key], rope, head_dim, extra=extra)
    return query, key, [project() for project in parts.value]  # (B, l, H * D) each


def _normed_rotated(
    parts: list[tuple[Tensor, torch.nn.Module]],
    rope: tuple[Tensor, Tensor] | None,
    head_dim: int,
    extra: int = 0,
) -> Tensor:
    """RMSNorm then RoPE of projected queries or keys: [(text, its norm),] (image, its norm), each
    (B, l, H * D) -> (B, T + N + extra, H, D); the last `extra` rows are left for the caller.

    The stock processors norm each part, concatenate them and apply RoPE to the whole; both work token
    by token, so running them over slices of ROPE_CHUNK_TOKENS tokens straight into one output gives the
    same values without a concatenated copy or RoPE's full-size float32 temporaries.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    length, out, start = sum(x.shape[1] for x, _ in parts), None, 0
    for x, norm in parts:
        for s in range(0, x.shape[1], ROPE_CHUNK_TOKENS):
            piece = norm(x[:, s : s + ROPE_CHUNK_TOKENS].unflatten(-1, (-1, head_dim)))  # (B, l, H, D)
            rows = slice(start + s, start + s + piece.shape[1])
            if rope is not None:
                piece = apply_rotary_emb(piece, (rope[0][rows], rope[1][rows]), sequence_dim=1)
            if out is None:
                out = piece.new_empty(
                    (piece.shape[0], length + extra, *piece.shape[2:])
                )  # (B, L + extra, H, D)
            out[:, rows] = piece
        start += x.shape[1]
    return out
