"""FLUX.1 [dev] and [schnell] in diffusers (FluxTransformer2DModel, FluxControlNetModel, FluxPipeline and
their img2img and ControlNet twins): every fact about their layout that the rest of clear-gen needs.

The transformer's joint sequence is [text T ; image N], text first, in both block kinds; image tokens are
row-major over the (H/16) x (W/16) grid (the VAE's /8, then 2 x 2 patches); positions reach attention only
through RoPE (`img_ids`, `txt_ids` -> `pos_embed`, theta 10000). Shapes for the memory plan are in
`shapes` (activations' bytes in `activations`), a random full-size pipeline for benchmarks in `random`,
feed-forward chunking in `chunking`, the VAE's exact tiled decode and encode in `vae`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.flops import FluxShape
from ...core.positions import GridCache, exact_ids

NAME = "flux1"
TOKEN_PX = 16  # pixels per image token side: the VAE's factor 8 times the 2 x 2 packing
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
BLOCK_KINDS = ("transformer_blocks", "single_transformer_blocks")  # double-stream, then single-stream


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
    """img_ids as (N, 3) from a call's arguments by name (3-d ids are deprecated in diffusers)."""
    ids = kwargs[IMAGE_IDS]
    return ids[0] if ids.ndim == 3 else ids


# ---------------------------------------------------------------- blocks, attention, RoPE


def attention_modules(model) -> dict[str, torch.nn.Module]:
    """'transformer_blocks.{i}.attn' / 'single_transformer_blocks.{i}.attn' -> module, in that order."""
    return {
        f"{kind}.{i}.attn": block.attn for kind in BLOCK_KINDS for i, block in enumerate(getattr(model, kind))
    }


def blocks(model) -> list[torch.nn.Module]:
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def single_blocks(model) -> list[torch.nn.Module]:
    """The single-stream blocks (joint attention over [text ; image]): CLEAR's distillation loss reads
    some of their attention outputs."""
    return list(model.single_transformer_blocks)


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
    kind, _, rest = key.partition(".")
    if kind not in BLOCK_KINDS or not rest.split(".", 1)[0].isdigit():
        return False
    attention, _, tail = key.partition(".attn.")
    projection, _, param = tail.rpartition(".")
    return tail == "processor.spatial_weight" or (
        projection in clear_projections(attention) and param in ("weight", "bias")
    )


def rope_theta(model) -> float:
    return model.pos_embed.theta


def set_rope_theta(model, theta: float) -> None:
    model.pos_embed.theta = theta


def compute_device(model) -> torch.device:
    """Where the model computes: its weights' device, or under accelerate's sequential offload (the
    weights on 'meta' between calls) its hook's execution device."""
    hook = getattr(model.x_embedder, "_hf_hook", None)
    if getattr(hook, "offload", False):
        return torch.device(hook.execution_device)
    return model.x_embedder.weight.device


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
from .vae import set_vae_tiling  # noqa: E402, F401
