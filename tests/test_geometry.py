"""Token order and block masks: pure functions of the geometry, checked against dense evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from clear_gen.core.geometry import (
    BLOCK,
    Geometry,
    attention_scale,
    block_mask,
    build_block_lists,
    choose_tile,
    dense_mask,
    image_geometry,
    inverse_order,
    make_mask_mod,
    needed_pairs,
    tile_order,
)


def reference_mask(geo: Geometry) -> torch.Tensor:
    """CLEAR's mask over [text; image in tile order; down], written from the definition."""
    T, n, m = geo.text_len, geo.image_len, geo.down_len
    perm = tile_order(geo.height, geo.width, geo.tile)
    y, x = perm // geo.width, perm % geo.width  # grid position of each tile-order token
    mask = torch.zeros(T + n, T + n + m, dtype=torch.bool)
    mask[:T, : T + n] = True
    mask[T:, :T] = True
    mask[T:, T + n :] = True
    mask[T:, T : T + n] = (y.view(-1, 1) - y.view(1, -1)) ** 2 + (
        x.view(-1, 1) - x.view(1, -1)
    ) ** 2 < geo.window**2
    return mask


GEOMETRIES = [
    Geometry(7, 20, 36, 4),
    Geometry(77, 16, 16, 8, 4),
    Geometry(0, 9, 13, 2),
    Geometry(128, 24, 40, 3, 2),
    Geometry(512, 32, 48, 8, 4, (16, 8)),
    Geometry(256, 32, 32, 16),
    Geometry(3, 9, 13, 2),  # a single block of queries, all of it holding text
]


@pytest.mark.parametrize(
    "h, w, tile", [(16, 32, (8, 16)), (9, 13, (8, 16)), (20, 24, (16, 8)), (5, 3, (8, 16))]
)
def test_tile_order_is_a_permutation_that_round_trips(h, w, tile):
    perm, inv = tile_order(h, w, tile), inverse_order(h, w, tile)
    assert torch.equal(perm.sort().values, torch.arange(h * w))
    x = torch.randn(2, h * w, 3)
    assert torch.equal(x[:, perm][:, inv], x)


def test_tile_order_groups_whole_tiles():
    h, w = 16, 32
    perm = tile_order(h, w, (8, 16))
    for start in range(0, h * w, BLOCK):
        y, x = perm[start : start + BLOCK] // w, perm[start : start + BLOCK] % w
        assert (y.max() - y.min(), x.max() - x.min()) == (7, 15)  # one 8 x 16 rectangle
    first = perm[:BLOCK]
    assert torch.equal(first[:16], torch.arange(16)) and int(first[16]) == w  # row-major inside


def test_edge_tiles_are_cut_to_the_grid():
    perm = tile_order(10, 20, (8, 16))  # tiles: 8x16, 8x4, 2x16, 2x4
    sizes = [128, 32, 32, 8]
    start = 0
    for size, (rows, cols) in zip(sizes, [(8, 16), (8, 4), (2, 16), (2, 4)], strict=True):
        chunk = perm[start : start + size]
        assert (
            int(chunk.div(20, rounding_mode="floor").unique().numel()),
            int((chunk % 20).unique().numel()),
        ) == (
            rows,
            cols,
        )
        start += size


@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
def test_mask_mod_and_pair_count_match_the_definition(geo):
    expected = reference_mask(geo)
    assert torch.equal(dense_mask(geo), expected)
    assert needed_pairs(geo) == int(expected.sum())


@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
def test_analytic_block_mask_equals_create_block_mask(geo):
    ours = block_mask(geo, "cpu")
    exact = create_block_mask(make_mask_mod(geo), 1, 1, geo.q_len, geo.kv_len, device="cpu")
    assert torch.equal(ours.to_dense(), exact.to_dense())
    # Full blocks skip the mask_mod: every one of ours must truly be full.
    nq, nk = math.ceil(geo.q_len / BLOCK), math.ceil(geo.kv_len / BLOCK)
    padded = torch.ones(nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    padded[: geo.q_len, : geo.kv_len] = reference_mask(geo)
    truly_full = padded.view(nq, BLOCK, nk, BLOCK).all(3).all(1)
    lists = build_block_lists(geo)
    for i in range(nq):
        for j in lists.full_idx[i, : lists.full_num[i]].tolist():
            assert truly_full[i, j], (i, j)
        partial = set(lists.partial_idx[i, : lists.partial_num[i]].tolist())
        assert not partial & set(lists.full_idx[i, : lists.full_num[i]].tolist())
    # And where blocks are whole tiles, ours finds every full block.
    if geo.text_len % BLOCK == 0 and geo.width % geo.tile[1] == 0 and geo.height % geo.tile[0] == 0:
        assert int(lists.full_num.sum()) == int(
            (truly_full & padded.view(nq, BLOCK, nk, BLOCK).any(3).any(1)).sum()
        )


@pytest.mark.parametrize("rows", [256, 384])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
def test_coarser_query_blocks_list_the_same_pairs_and_keep_full_blocks_full(geo, rows):
    """Query blocks of 256 rows (FlashAttention-4 on Blackwell; key blocks stay 128): the blocks listed are
    create_block_mask's at that size, each full one is truly full, none is both partial and full."""
    ours = block_mask(geo, "cpu", rows=rows)
    exact = create_block_mask(
        make_mask_mod(geo), 1, 1, geo.q_len, geo.kv_len, device="cpu", BLOCK_SIZE=(rows, BLOCK)
    )
    assert ours.BLOCK_SIZE == (rows, BLOCK) and torch.equal(ours.to_dense(), exact.to_dense())
    nq, nk = math.ceil(geo.q_len / rows), math.ceil(geo.kv_len / BLOCK)
    padded = torch.ones(nq * rows, nk * BLOCK, dtype=torch.bool)  # past the ends: no row, no constraint
    padded[: geo.q_len, : geo.kv_len] = reference_mask(geo)
    truly_full = padded.view(nq, rows, nk, BLOCK).all(3).all(1)
    num, idx = ours.full_kv_num_blocks[0, 0], ours.full_kv_indices[0, 0]
    pnum, pidx = ours.kv_num_blocks[0, 0], ours.kv_indices[0, 0]
    for i in range(nq):
        full = idx[i, : num[i]].tolist()
        assert all(truly_full[i, j] for j in full), i
        assert not set(full) & set(pidx[i, : pnum[i]].tolist())
    assert block_mask(geo, "cpu", True, rows).q_num_blocks is not None  # training: the transposed lists


@pytest.mark.parametrize("window, bound", [(8, 1.8), (16, 1.65)])
def test_computed_over_needed_pairs_at_8k(window, bound):
    geo = Geometry(512, 512, 512, window)  # 8192 x 8192 px
    ratio = build_block_lists(geo).computed_pairs() / needed_pairs(geo)
    assert 1.0 <= ratio <= bound


def test_proportional_scale():
    geo = Geometry(512, 64, 64, 8)
    assert attention_scale(geo, 128, False) == pytest.approx(128**-0.5)
    assert attention_scale(geo, 128, True) == pytest.approx(math.sqrt(math.log(4608) / math.log(4608) / 128))
    big = Geometry(512, 512, 512, 8, 4)
    n = 10 * (512 + 512 * 512)
    assert attention_scale(big, 128, True) == pytest.approx(math.sqrt(math.log(n) / math.log(4608) / 128))


def test_tile_keeps_blocks_whole_tiles_when_it_can():
    assert choose_tile(64, 64) == (8, 16)
    assert choose_tile(64, 72) == (16, 8)  # 1152 px wide: 16 does not divide 72, 8 does
    assert choose_tile(64, 70) == (8, 16)  # neither divides: the default
    assert image_geometry(512, 64, 72, 8, 4) == Geometry(512, 64, 72, 8, 4, (16, 8))
