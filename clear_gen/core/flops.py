"""FLOP model of one FLUX denoising step, full attention versus CLEAR (2 FLOPs per multiply-add).

Per token, with hidden size C = heads * head_dim:
- double-stream block: each stream (text and image) has q, k, v, out (4 C^2) and an MLP C -> 4C -> C
  (8 C^2): 12 C^2 multiply-adds = 24 C^2 FLOPs per token, over all T + N tokens;
- single-stream block: q, k, v (3 C^2), MLP in C -> 4C (4 C^2), out (C + 4C) -> C (5 C^2): also 24 C^2;
- other block layouts give other counts per token and block (`FluxShape.block_macs`, in C^2 units);
- embedders: x_embedder in -> C and proj_out C -> in on the N image tokens, context_embedder
  joint -> C on the T text tokens. The per-sample adaLN modulations (one vector each) are left out.
Attention per layer: Q K^T and P V, 2 x 2 FLOPs per (query, key) pair per channel:
- full: 4 * Lq * Lkv * H * D with Lq = Lkv = T + N;
- CLEAR exact: 4 * needed_pairs * H * D (what an ideal kernel does);
- CLEAR computed: 4 * computed_pairs * H * D (the 128 x 128 blocks our block mask visits).
At 8192 px this gives 3.39 PFLOP of linear layers, 48.3 PFLOP of full attention (847.7 TFLOP per
layer) and 0.22 PFLOP of exact CLEAR r = 8 attention per step, as CLEAR_FACTS.md states.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import geometry as G


@dataclass(frozen=True)
class FluxShape:
    heads: int = 24  # H
    head_dim: int = 128  # D; hidden C = H * D = 3072
    double: int = 19  # double-stream blocks
    single: int = 38  # single-stream blocks
    in_channels: int = 64  # packed latent channels per image token
    joint_dim: int = 4096  # T5 features per text token
    block_macs: int = 12  # multiply-adds per token per block, in units of C^2 (FLUX.1: 12; models/ says)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def layers(self) -> int:
        return self.double + self.single


def parameter_count(shape: FluxShape) -> int:
    """Weights of the transformer's blocks, the bulk of its parameters (11.9B for FLUX.1-dev): per
    double block 2 x (4 C^2 attention + 8 C^2 MLP + 6 C^2 modulation), per single block
    3 C^2 q/k/v + 4 C^2 MLP in + 5 C^2 out + 3 C^2 modulation."""
    c = shape.hidden
    return shape.double * 36 * c * c + shape.single * 15 * c * c


def linear_flops(shape: FluxShape, text_len: int, image_len: int) -> float:
    """Linear-layer FLOPs of one step (all blocks and the embedders) at T text and N image tokens."""
    c, tokens = shape.hidden, text_len + image_len
    blocks = shape.layers * 2 * shape.block_macs * c * c * tokens
    embed = 2 * c * (2 * image_len * shape.in_channels + text_len * shape.joint_dim)
    return float(blocks + embed)


def attention_flops(shape: FluxShape, pairs: int) -> float:
    """Attention FLOPs of one step for `pairs` (query, key) pairs per layer and head."""
    return 4.0 * pairs * shape.heads * shape.head_dim * shape.layers


def full_pairs(geo: G.Geometry) -> int:
    """(query, key) pairs of full attention: the stock model has no down-sampled keys."""
    return geo.q_len * geo.q_len


def step_flops(shape: FluxShape, geo: G.Geometry, computed_pairs: int) -> dict[str, float]:
    """FLOPs of one step: linear, full attention, CLEAR exact and computed attention, in FLOP."""
    return {
        "linear": linear_flops(shape, geo.text_len, geo.image_len),
        "attn_full": attention_flops(shape, full_pairs(geo)),
        "attn_exact": attention_flops(shape, G.needed_pairs(geo)),
        "attn_computed": attention_flops(shape, computed_pairs),
    }


def speedup_bound(flops: dict[str, float]) -> float:
    """Step speedup of CLEAR over full attention if every FLOP ran at the same rate."""
    return (flops["linear"] + flops["attn_full"]) / (flops["linear"] + flops["attn_computed"])
