"""FLUX.1 [dev], [schnell] and [dev]'s fine-tunes (Krea [dev], Kontext [dev]) in diffusers
(FluxTransformer2DModel, FluxControlNetModel, FluxPipeline and their img2img and ControlNet twins): every fact
about their layout that the rest of clear-gen needs.

The transformer's joint sequence is [text T ; image N], text first, in both block kinds; image tokens are
row-major over the (H/16) x (W/16) grid (the VAE's /8, then 2 x 2 patches); positions reach attention only
through RoPE (`img_ids`, `txt_ids` -> `pos_embed`, theta 10000). Shapes for the memory plan are in
`shapes` (activations' bytes in `activations`), a random full-size pipeline for benchmarks in `random`,
feed-forward chunking in `chunking`, the VAE's exact tiled decode and encode in `vae`, Kontext's reference
picture (its size, its tokens, the transformer called with them) in `kontext`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...core.flops import FluxShape
from ...core.positions import Grid, GridCache, exact_ids
from ..attention import AttentionCall, AttentionParts, joint_call, joint_parts
from ..layout import (  # noqa: F401  (part of this family's API: models.FAMILY_API)
    BLOCK_KINDS,
    attention_modules,
    blocks,
    compute_device,
    rope_axes,
    rope_theta,
    set_rope,
    set_rope_theta,
    single_blocks,
)
from ..layout import image_ids as _image_ids
from ..layout import is_clear_key as _is_clear_key
from .chunking import chunk_feed_forward  # noqa: F401

NAME = "flux1"
LABEL = "FLUX.1"  # how messages name the family
TOKEN_PX = 16  # pixels per image token side: the VAE's factor 8 times the 2 x 2 packing
SDEDIT = True  # diffusers has its img2img pipeline: the recipe's SDEdit stages run
TEXT_ENCODER = "text_encoder_2"  # the component --quantize-text quantizes: T5
SAMPLE_EMBEDDINGS = ("prompt_embeds", "pooled")  # of encode_prompt's: what a distillation sample keeps
MODEL_CLASSES = ("FluxTransformer2DModel", "FluxControlNetModel")
FORWARD_ARGS = (  # FluxTransformer2DModel.forward's positional parameters
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
    "joint_attention_kwargs",
    "controlnet_block_samples",
    "controlnet_single_block_samples",
)
CONTROLNET_ARGS = (
    "hidden_states",
    "controlnet_cond",
    "controlnet_mode",
    "conditioning_scale",
    *FORWARD_ARGS[1:7],
)
RESIDUALS = ("controlnet_block_samples", "controlnet_single_block_samples")  # lists of (B, N, C) row-major
IMAGE_IDS = "img_ids"  # the call's argument holding the image tokens' RoPE positions, (N, 3)
ORIGINAL_KEY = "double_blocks.0.img_attn.qkv.weight"  # BFL's names, kept by community files (city96, ...)
DIFFUSERS_KEY = "transformer_blocks.0.attn.to_q.weight"
ORIGINAL_PREFIX = "model.diffusion_model."  # some files keep the whole original checkpoint's prefix
CONTROLNET_CONFIG_FIELDS = (  # what a ControlNet shares with the transformer it feeds
    "num_attention_heads",
    "attention_head_dim",
    "joint_attention_dim",
    "pooled_projection_dim",
    "in_channels",
)


# ---------------------------------------------------------------- the forward call


def is_controlnet(module) -> bool:
    return hasattr(module, "controlnet_x_embedder")


def forward_arguments(module, args: tuple, kwargs: dict) -> dict:
    """A transformer's (or ControlNet's) call arguments by name, positional ones included."""
    names = CONTROLNET_ARGS if is_controlnet(module) else FORWARD_ARGS
    return {**dict(zip(names, args, strict=False)), **kwargs}


def text_tokens(module, encoder_hidden_states: Tensor) -> int:
    """The text tokens in the joint sequence: T5's, plus a union ControlNet's mode token."""
    return encoder_hidden_states.shape[1] + int(getattr(module, "union", False))


def condition_embedder(module) -> torch.nn.Module | None:
    """A ControlNet's embedder of its (packed) control condition, which is added to the image tokens."""
    return module.controlnet_x_embedder if is_controlnet(module) else None


def image_ids(kwargs: dict) -> Tensor:
    """img_ids as (N, 3) from a call's arguments by name."""
    return _image_ids(kwargs, IMAGE_IDS)


# ---------------------------------------------------------------- blocks, attention, RoPE


def attention_call(attn, args: tuple, kwargs: dict) -> AttentionCall:
    """A processor call's arguments by meaning: FluxAttnProcessor's order in both block kinds."""
    return joint_call(args, kwargs)


def attention_parts(attn, hidden: Tensor, text: Tensor | None) -> AttentionParts:
    """What FluxAttention computes around its attention (models.attention): joint attention."""
    return joint_parts(attn, hidden, text)


def attention_output(block, keep: Callable[[Tensor], None]):
    """Hand `keep` a single-stream block's attention output (B, T + N, C), before any output projection,
    at every call: the attention module's own output. Returns the hook's handle."""
    return block.attn.register_forward_hook(lambda module, args, output: keep(output))


def clear_projections(attention: str) -> tuple[str, ...]:
    """The projections of an attention module that CLEAR's checkpoints replace: the image branch's q, k,
    v, and in double-stream blocks its output projection."""
    return (
        ("to_q", "to_k", "to_v", "to_out.0")
        if attention.startswith("transformer_")
        else ("to_q", "to_k", "to_v")
    )


def is_clear_key(key: str) -> bool:
    """A key of a published CLEAR checkpoint for this family: an attention module's replaced projection
    (clear_projections) or its processor's spatial weight."""
    return _is_clear_key(key, clear_projections)


def flop_shape(config) -> FluxShape:
    """The FLOP model's shape (core.flops) of a FluxTransformer2DModel (or ControlNet) config, or anything
    with its field names."""
    return FluxShape(
        heads=config.num_attention_heads,
        head_dim=config.attention_head_dim,
        double=config.num_layers,
        single=config.num_single_layers,
        in_channels=config.in_channels,
        joint_dim=config.joint_attention_dim,
    )


def text_length(config) -> int:
    """T5 tokens the model was trained with: 512, or 256 for the guidance-free (timestep-distilled)
    schnell, as BFL's reference code sets them; the config tells them apart, not the name."""
    guidance = config.get("guidance_embeds", True) if isinstance(config, dict) else config.guidance_embeds
    return 512 if guidance else 256


def encode_prompt(pipe, prompt: str, device, max_len: int) -> dict[str, Tensor]:
    """One prompt's embeddings by name, each (1, ...): T5's `prompt_embeds` (1, T, 4096) and CLIP's
    `pooled` (1, 768)."""
    embeds, pooled, _ = pipe.encode_prompt(prompt, None, device=device, max_sequence_length=max_len)
    return {"prompt_embeds": embeds, "pooled": pooled}


def prompt_arguments(embeds: dict[str, Tensor]) -> dict[str, Tensor]:
    """encode_prompt's embeddings as the pipelines' call takes them."""
    return {"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled"]}


def prompt_cut(pipe, prompt: str, max_len: int) -> str | None:
    """What of `prompt` the text encoders do not read, in words ('CLIP reads 77 of its 210 tokens, T5 512
    of 1,650'), or None when both read all of it (diffusers cuts them silently)."""
    cut = []
    for name, tokenizer, limit in (("CLIP", pipe.tokenizer, pipe.tokenizer.model_max_length),
                                   ("T5", pipe.tokenizer_2, max_len)):  # fmt: skip
        if tokenizer is None:
            continue
        tokens = len(tokenizer(prompt, truncation=False).input_ids)
        if tokens > limit:
            cut.append(f"{name} {limit} of {tokens:,}")
    return None if not cut else " and ".join(cut) + " tokens"


# ---------------------------------------------------------------- latents


def pack_latents(latents: Tensor) -> Tensor:
    """VAE latents into FLUX tokens: (B, C, h, w) -> (B, (h/2)(w/2), 4C), 2 x 2 patches row-major."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2)  # (B, C, h/2, 2, w/2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: Tensor, width: int, height: int) -> Tensor:
    """FLUX tokens of a width x height px image back into VAE latents: (B, N, 4C) -> (B, C, H/8, W/8)."""
    b, _, c = latents.shape  # (B, (H/16)(W/16), 64): 2 x 2 patches of 16 channels
    h, w = height // TOKEN_PX, width // TOKEN_PX
    latents = latents.view(b, h, w, c // 4, 2, 2)  # (B, H/16, W/16, 16, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)  # (B, 16, H/16, 2, W/16, 2)
    return latents.reshape(b, c // 4, 2 * h, 2 * w)  # (B, 16, H/8, W/8)


def vae_latents(vae, latents: Tensor, width: int, height: int) -> Tensor:
    """A pipeline's `output_type="latent"` result (packed tokens) as the VAE decodes it: unpacked, then
    unscaled and unshifted as FluxPipeline does. (B, 16, H/8, W/8)."""
    latents = unpack_latents(latents, width, height)
    return latents / vae.config.scaling_factor + vae.config.shift_factor


def model_latents(vae, x0: Tensor) -> Tensor:
    """VAE latents (B, 16, h, w) as the transformer takes them: shifted, scaled and packed, (B, N, 64)."""
    return pack_latents((x0 - vae.config.shift_factor) * vae.config.scaling_factor)


def forward_inputs(
    hidden: Tensor, embeds: dict[str, Tensor], timestep: Tensor, grid: Grid, guidance: Tensor | None
) -> dict:
    """The transformer's keyword arguments for packed tokens (B, N, 64) of an h x w grid, embeddings as
    encode_prompt names them (batched), timestep sigma (B,) and guidance (B,) or None."""
    device, text_len = hidden.device, embeds["prompt_embeds"].shape[1]
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=embeds["prompt_embeds"],
        pooled_projections=embeds["pooled"],
        timestep=timestep,  # sigma: the transformer multiplies by 1000, as FluxPipeline relies on
        img_ids=exact_ids(grid, device),  # cached: the same tensor every step
        txt_ids=torch.zeros(text_len, 3, device=device),
        guidance=guidance,
    )


# ---------------------------------------------------------------- exact RoPE positions


def use_exact_positions(model) -> None:
    """From now on this model's RoPE sees exact integer image positions (core/positions.py says why).

    Idempotent. CLEAR's own hooks (attention) do the same for CLEAR runs; this one covers stock attention
    too, so that a CLEAR-versus-full comparison changes only the attention.
    """
    if getattr(model, "_exact_positions", None) is not None:
        return
    model._exact_positions = model.register_forward_pre_hook(
        _ExactIds(GridCache()),
        with_kwargs=True,
        prepend=True,  # before CLEAR's
    )


class _ExactIds:
    """The forward pre-hook of `use_exact_positions`: img_ids (keyword or 5th positional) made exact."""

    def __init__(self, cache: GridCache) -> None:
        self.cache = cache

    def __call__(self, module, args: tuple, kwargs: dict):
        ids = kwargs["img_ids"] if "img_ids" in kwargs else args[4]
        ids = ids[0] if ids.ndim == 3 else ids  # (N, 3)
        exact = exact_ids(self.cache(ids), ids.device)
        if "img_ids" in kwargs:
            return args, {**kwargs, "img_ids": exact}
        return (*args[:4], exact, *args[5:]), kwargs


# ---------------------------------------------------------------- diffusers classes


def pipeline_class(img2img: bool = False, controlnet: bool = False):
    """FluxPipeline, FluxImg2ImgPipeline, or their ControlNet twins."""
    import diffusers

    name = {(False, False): "FluxPipeline", (True, False): "FluxImg2ImgPipeline"}
    name |= {(False, True): "FluxControlNetPipeline", (True, True): "FluxControlNetImg2ImgPipeline"}
    return getattr(diffusers, name[(img2img, controlnet)])


def transformer_class():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def controlnet_class():
    from diffusers import FluxControlNetModel

    return FluxControlNetModel


def convert_original(state_dict: dict) -> dict:
    """A transformer state dict under BFL's original names, under diffusers' (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    return convert_flux_transformer_checkpoint_to_diffusers(state_dict)


def text_encoder_class():
    """T5 (text_encoder_2), the text encoder --quantize-text quantizes."""
    from transformers import T5EncoderModel

    return T5EncoderModel


from . import activations, shapes  # noqa: E402, F401  (its submodules: models.family("flux1").shapes)
from .kontext import EDIT_PIPELINES, reference_latents, reference_size, reference_tokens  # noqa: E402, F401
from .vae import set_vae_tiling  # noqa: E402, F401
