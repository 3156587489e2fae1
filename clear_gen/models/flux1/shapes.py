"""A FLUX.1 model's shapes without its weights: the transformer's configuration and every component's
parameter count, for the memory plan (memory.py).

A registry base (dev, schnell, krea, or their Hub repos) comes from the shapes shipped with the package
(shapes.toml): no download, no network. A local diffusers folder (or a cached Hub snapshot) gives its
own transformer/config.json and the safetensors headers of its other components. Anything else is
planned with FLUX.1-dev's shapes, and says so.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..shapes import ModelShapes, Params, TransformerFields, folder_params, read_toml, shipped

SHAPES_FILE = Path(__file__).with_name("shapes.toml")
TIMESTEP_CHANNELS = 256  # sinusoidal features of the timestep (and guidance) embedders


@dataclass(frozen=True)
class TransformerConfig(TransformerFields):
    """The fields of a FluxTransformer2DModel config.json that size it."""

    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    in_channels: int = 64
    guidance_embeds: bool = True


@dataclass(frozen=True)
class Flux1Shapes(ModelShapes):
    """FLUX.1's shapes (its formulas are this module's and activations.py's): `text` is T5
    (text_encoder_2), `text_small` CLIP (text_encoder)."""

    transformer: TransformerConfig


ModelShapes = Flux1Shapes  # this family's (models.shapes.ModelShapes is the contract)


def mlp_params(cfg: TransformerConfig) -> int:
    """Double blocks' ff and ff_context (C -> 4C -> C each), single blocks' proj_mlp (C -> 4C) and
    proj_out (5C -> C): what each feed-forward slice runs again."""
    return (16 * cfg.num_layers + 9 * cfg.num_single_layers) * cfg.hidden**2


def _linears(cfg: TransformerConfig) -> list[tuple[int, int]]:
    """(in, out) of every nn.Linear in FluxTransformer2DModel; all have a bias."""
    c, t = cfg.hidden, TIMESTEP_CHANNELS
    embedders = [(t, c), (c, c)] * (2 if cfg.guidance_embeds else 1)  # timestep (and guidance) MLPs
    embedders += [(cfg.pooled_projection_dim, c), (c, c), (cfg.joint_attention_dim, c), (cfg.in_channels, c)]
    # double: adaLN x 2 (6C each), q k v out x 2 streams, MLP C -> 4C -> C x 2 streams
    double = [(c, 6 * c)] * 2 + [(c, c)] * 8 + [(c, 4 * c), (4 * c, c)] * 2
    single = [(c, 3 * c), (c, 4 * c), (5 * c, c)] + [(c, c)] * 3  # adaLN, MLP in, out of [attn, MLP], q k v
    out = [(c, 2 * c), (c, cfg.in_channels)]  # norm_out's modulation, proj_out
    return embedders + double * cfg.num_layers + single * cfg.num_single_layers + out


def transformer_params(cfg: TransformerConfig) -> Params:
    """FluxTransformer2DModel's parameters from its config: Linear weights and biases, and the RMSNorm
    weights of q and k (head_dim each; four per double block, two per single block)."""
    linears = _linears(cfg)
    norms = cfg.attention_head_dim * (4 * cfg.num_layers + 2 * cfg.num_single_layers)
    return Params(
        linear=sum(i * o for i, o in linears),
        rows=sum(o for _, o in linears),
        other=sum(o for _, o in linears) + norms,
        largest=max(i * o for i, o in linears),
    )


def controlnet_params(
    cfg: TransformerConfig, num_layers: int, num_single_layers: int, num_mode: int
) -> Params:
    """FluxControlNetModel's parameters: the transformer's embedders and `num_layers` + `num_single_layers`
    of its blocks (cfg: the transformer it feeds), without its output layers, plus a zero-initialised
    C x C Linear per block (its residual), the condition's embedder and a union model's mode embedding."""
    c = cfg.hidden
    blocks = transformer_params(replace(cfg, num_layers=num_layers, num_single_layers=num_single_layers))
    out = [(c, 2 * c), (c, cfg.in_channels)]  # norm_out's modulation, proj_out: not in a ControlNet
    added = [(c, c)] * (num_layers + num_single_layers)  # controlnet_blocks and controlnet_single_blocks
    added.append((cfg.in_channels, c))  # controlnet_x_embedder
    linear = blocks.linear + sum(i * o for i, o in added) - sum(i * o for i, o in out)
    rows = blocks.rows + sum(o for _, o in added) - sum(o for _, o in out)
    return Params(linear=linear, rows=rows, other=rows + (blocks.other - blocks.rows) + num_mode * c,
                  largest=blocks.largest)  # fmt: skip


def clear_params(cfg: TransformerConfig, down_factor: int) -> int:
    """Parameters a CLEAR checkpoint replaces: the image branch's q, k, v (and out in double blocks),
    weights and biases, and each attention's f x f spatial weights when down-sampled."""
    c, attns = cfg.hidden, cfg.num_layers + cfg.num_single_layers
    projections = 4 * cfg.num_layers + 3 * cfg.num_single_layers
    return projections * (c * c + c) + (attns * down_factor**2 if down_factor > 1 else 0)


@functools.lru_cache(maxsize=1)
def _shipped() -> dict:
    return read_toml(SHAPES_FILE)


def shipped_shapes(base: str, source: str, note: str | None = None) -> Flux1Shapes:
    """The shapes of a registry base as shipped in shapes.toml (a base it does not list: dev's, noted)."""
    data = _shipped()
    if base not in data["transformer"]:
        note, base = note or f"{base}: no shipped shapes, planned with FLUX.1-dev's", "dev"
    return shipped(Flux1Shapes, TransformerConfig, data, base, source, note, "text_encoder_2", "text_encoder")


def folder_shapes(folder: Path) -> Flux1Shapes:
    """The shapes of a diffusers FLUX.1 folder: its configs and safetensors headers (dev's where absent)."""
    dev = shipped_shapes("dev", str(folder))
    config = folder / "transformer" / "config.json"
    transformer = TransformerConfig.from_dict(json.loads(config.read_text())) if config.is_file() else None
    vae_config = folder / "vae" / "config.json"
    tile = (
        json.loads(vae_config.read_text()).get("sample_size", dev.vae_tile) if vae_config.is_file() else None
    )
    vae = folder_params(folder / "vae")
    return Flux1Shapes(
        transformer=transformer or dev.transformer,
        text=folder_params(folder / "text_encoder_2") or dev.text,
        text_small=folder_params(folder / "text_encoder") or dev.text_small,
        vae=vae.total if vae else dev.vae,
        vae_tile=tile or dev.vae_tile,
        source=str(folder),
        note=None if transformer else f"{folder} has no transformer/config.json: FLUX.1-dev's shapes assumed",
    )
