"""Real sizes in the dtypes GPUs run: the grid and RoPE positions at 8K in bf16, with and without CLEAR.

bf16 holds integers exactly only up to 256: diffusers' img_ids at 8192 px (512 tokens a side) are rounded.
These tests run a tiny-channel transformer on the real 512 x 512 (and 256 x 512) token grids.
"""

from __future__ import annotations

import pytest
import torch
from conftest import grid_ids, tiny_transformer

import clear_gen
from clear_gen.core.positions import find_grid
from clear_gen.errors import ConfigError
from clear_gen.models.flux1 import use_exact_positions


def tile_order_by_hand(h: int, w: int, th: int = 8, tw: int = 16) -> torch.Tensor:
    """Row-major index of each token in tile order, by explicit loops (tiles cut at the border)."""
    order = []
    for ty in range(0, h, th):
        for tx in range(0, w, tw):
            for y in range(ty, min(ty + th, h)):
                order.extend(y * w + x for x in range(tx, min(tx + tw, w)))
    return torch.tensor(order)


def bf16_inputs(h: int, w: int, text_len: int = 8) -> dict:
    """What FluxPipeline passes in bf16: every tensor, img_ids included, in the prompt's dtype."""
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, h * w, 4, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, text_len, 32, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
        timestep=torch.tensor([0.7]).bfloat16(),
        guidance=torch.tensor([3.5]).bfloat16(),
        img_ids=grid_ids(h, w).bfloat16(),
        txt_ids=torch.zeros(text_len, 3).bfloat16(),
    )


class Spy:
    """Records the ids RoPE sees, the tokens the first layer sees, and CLEAR's geometry at that moment."""

    def __init__(self, model):
        self.ids, self.tokens, self.geometry = None, None, None
        model.pos_embed.register_forward_pre_hook(self._ids)
        model.x_embedder.register_forward_pre_hook(self._tokens)
        self.model = model

    def _ids(self, module, args):
        self.ids = args[0].clone()
        state = getattr(self.model, "_clear_state", None)
        self.geometry = state.layout.geometry if state is not None and state.layout is not None else None

    def _tokens(self, module, args):
        self.tokens = args[0].clone()


def test_bf16_rounds_positions_above_256():
    ids = grid_ids(512, 512).bfloat16()
    assert ids[511, 2].item() == 512.0  # column 511 reads 512: why the grid cannot be read from max - min
    assert len(torch.unique(ids[:512, 2])) < 512  # neighbours share a position


@pytest.mark.slow
@pytest.mark.parametrize("h, w", [(512, 512), (256, 512)], ids=["8192x8192", "8192x4096"])
def test_clear_at_8k_in_bf16_finds_the_grid_and_feeds_exact_positions(h, w):
    model = tiny_transformer().bfloat16()
    spy = Spy(model)
    inputs = bf16_inputs(h, w)
    clear_gen.apply_clear(model, window=8, down_factor=4, backend="flex")
    with torch.no_grad():
        out = model(**inputs).sample
    perm = tile_order_by_hand(h, w)
    # 1. The grid found and the tile CLEAR runs.
    assert (spy.geometry.height, spy.geometry.width, spy.geometry.tile) == (h, w, (8, 16))
    # 2. RoPE sees exact integer positions in tile order: text first, then [0, row, col] of each token.
    text_len = inputs["txt_ids"].shape[0]
    assert spy.ids.dtype == torch.float32
    rows, cols = perm // w, perm % w
    assert torch.equal(spy.ids[text_len:, 1], rows.float()) and torch.equal(
        spy.ids[text_len:, 2], cols.float()
    )
    assert spy.ids[text_len:, 2].max().item() == w - 1
    # 3. The layers see the tokens in tile order, and the output comes back row-major.
    assert torch.equal(spy.tokens, inputs["hidden_states"][:, perm])
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()


def test_stock_attention_gets_exact_positions_too():
    model = tiny_transformer().bfloat16()
    spy = Spy(model)
    use_exact_positions(model)
    use_exact_positions(model)  # idempotent: one hook
    inputs = bf16_inputs(20, 300)  # 300 columns: bf16 rounds those above 256
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(spy.ids[8:], grid_ids(20, 300))


def test_find_grid_reads_rounded_ids_and_refuses_what_is_not_a_grid():
    for h, w, dtype in [(512, 512, torch.bfloat16), (3, 700, torch.bfloat16), (7, 5, torch.float16)]:
        grid = find_grid(grid_ids(h, w).to(dtype))
        assert (grid.height, grid.width) == (h, w)
    shuffled = grid_ids(8, 8)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ConfigError, match="row-major image grid"):
        find_grid(shuffled)
    with pytest.raises(ConfigError, match="row-major image grid"):
        find_grid(grid_ids(8, 8)[:60])  # not whole rows
