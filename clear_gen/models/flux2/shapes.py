"""A FLUX.2 model's shapes without its weights: the transformer's configuration and every component's
parameter count, for the memory plan (plan/memory.py, through models.shapes.ModelShapes).

A registry base (klein, or its Hub repo) comes from the shapes shipped with the package (shapes.toml,
which says where its numbers come from): no download, no network. A local diffusers folder (or a cached
Hub snapshot) gives its own transformer/config.json and the safetensors headers of its other components.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ..shapes import NO_PARAMS, ModelShapes, Params, TransformerFields, folder_params, read_toml, shipped

SHAPES_FILE = Path(__file__).with_name("shapes.toml")


@dataclass(frozen=True)
class TransformerConfig(TransformerFields):
    """The fields of a Flux2Transformer2DModel config.json that size it (defaults: FLUX.2 [klein] 4B's)."""

    num_layers: int = 5  # double-stream blocks
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 7680  # 3 x Qwen3's width: three of its layers' hidden states
    in_channels: int = 128  # 2 x 2 patches of 32 latent channels
    mlp_ratio: float = 3.0  # the SwiGLU MLPs' width over C
    timestep_guidance_channels: int = 256
    guidance_embeds: bool = False

    @property
    def mlp(self) -> int:
        """M: the MLPs' hidden width (each MLP's input projection makes 2M: gate and value)."""
        return int(self.hidden * self.mlp_ratio)


def _linears(cfg: TransformerConfig) -> list[tuple[int, int]]:
    """(in, out) of every nn.Linear in Flux2Transformer2DModel; none has a bias."""
    c, m, t = cfg.hidden, cfg.mlp, cfg.timestep_guidance_channels
    embedders = [(t, c), (c, c)] * (2 if cfg.guidance_embeds else 1)  # timestep (and guidance) MLPs
    embedders += [(cfg.in_channels, c), (cfg.joint_attention_dim, c)]  # x_embedder, context_embedder
    modulation = [(c, 6 * c), (c, 6 * c), (c, 3 * c)]  # shared by all blocks: double img, txt; single
    double = [(c, c)] * 8 + [(c, 2 * m), (m, c)] * 2  # q k v out x 2 streams, SwiGLU MLP x 2 streams
    single = [(c, 3 * c + 2 * m), (c + m, c)]  # to_qkv_mlp_proj, to_out
    out = [(c, 2 * c), (c, cfg.in_channels)]  # norm_out's modulation, proj_out
    return embedders + modulation + double * cfg.num_layers + single * cfg.num_single_layers + out


def transformer_params(cfg: TransformerConfig) -> Params:
    """Flux2Transformer2DModel's parameters from its config: Linear weights, and the RMSNorm weights of q
    and k (head_dim each; four per double block, two per single block)."""
    linears = _linears(cfg)
    norms = cfg.attention_head_dim * (4 * cfg.num_layers + 2 * cfg.num_single_layers)
    return Params(
        linear=sum(i * o for i, o in linears),
        rows=sum(o for _, o in linears),
        other=norms,
        largest=max(i * o for i, o in linears),
    )


def clear_params(cfg: TransformerConfig, down_factor: int) -> int:
    """Parameters CLEAR weights replace (models.flux2.clear_projections): the image branch's q, k, v, out
    in double blocks, to_qkv_mlp_proj in single blocks, and each attention's f x f spatial weights when
    down-sampled."""
    c, attns = cfg.hidden, cfg.num_layers + cfg.num_single_layers
    spatial = attns * down_factor**2 if down_factor > 1 else 0
    return cfg.num_layers * 4 * c * c + cfg.num_single_layers * (3 * c + 2 * cfg.mlp) * c + spatial


def controlnet_params(cfg: TransformerConfig, num_layers: int, num_single_layers: int, num_mode: int):
    raise AssertionError("FLUX.2 has no ControlNet: plan.parse refuses --controlnet for it")


def mlp_params(cfg: TransformerConfig) -> int:
    """The double blocks' two SwiGLU MLPs (C -> 2M, M -> C each): what feed-forward chunking slices (the
    single blocks' MLP is fused with their attention and runs whole)."""
    return cfg.num_layers * 2 * 3 * cfg.mlp * cfg.hidden


@dataclass(frozen=True)
class Flux2Shapes(ModelShapes):
    """FLUX.2's shapes (its formulas are this module's and activations.py's): `text` is Qwen3
    (text_encoder); there is no second text encoder."""

    transformer: TransformerConfig


ModelShapes = Flux2Shapes  # this family's (models.shapes.ModelShapes is the contract)


@functools.lru_cache(maxsize=1)
def _shipped() -> dict:
    return read_toml(SHAPES_FILE)


def shipped_shapes(base: str, source: str, note: str | None = None) -> Flux2Shapes:
    """The shapes of a registry base as shipped in shapes.toml (a base it does not list: klein's, noted)."""
    data = _shipped()
    if base not in data["transformer"]:
        note, base = note or f"{base}: no shipped shapes, planned with FLUX.2 [klein]'s", "klein"
    return shipped(Flux2Shapes, TransformerConfig, data, base, source, note, "text_encoder")


def folder_shapes(folder: Path) -> Flux2Shapes:
    """The shapes of a diffusers FLUX.2 [klein] folder: its configs and safetensors headers (klein's where
    absent)."""
    klein = shipped_shapes("klein", str(folder))
    config = json.loads((folder / "transformer" / "config.json").read_text())  # folder_family read it
    vae_config = folder / "vae" / "config.json"
    tile = json.loads(vae_config.read_text()).get("sample_size") if vae_config.is_file() else None
    vae = folder_params(folder / "vae")
    return Flux2Shapes(
        transformer=TransformerConfig.from_dict(config),
        text=folder_params(folder / "text_encoder") or klein.text,
        text_small=NO_PARAMS,
        vae=vae.total if vae else klein.vae,
        vae_tile=tile or klein.vae_tile,
        source=str(folder),
    )
