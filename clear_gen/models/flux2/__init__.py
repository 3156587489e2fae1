"""FLUX.2 [klein] in diffusers (Flux2Transformer2DModel, Flux2KleinPipeline): every fact about its layout
that the rest of clear-gen needs.

The transformer's joint sequence is [text T ; image N], text first, in both block kinds (the single-stream
blocks get it concatenated); image tokens are row-major over the (H/16) x (W/16) grid (the VAE's /8, then
2 x 2 patches folded into 4 x 32 = 128 channels). Positions reach attention only through RoPE over four
axes (`img_ids` [0, row, col, 0], `txt_ids` [0, 0, 0, index] -> `pos_embed`, theta 2000); the pipeline
builds them as integers, so they are exact in any dtype.

Double-stream blocks use joint attention (models.attention) as FLUX.1's do, without biases. Single-stream
blocks compute q, k, v and the MLP's input in one Linear (`attn.to_qkv_mlp_proj`, 3C + 2 x 3C outputs),
and project [attention ; SwiGLU(MLP)] back in another (`attn.to_out`), both inside the attention module;
so CLEAR weights for FLUX.2 replace that whole first Linear in single blocks (the q, k, v rows cannot be
replaced apart from the MLP's without splitting diffusers' module), and the image branch's q, k, v, out
in double blocks. The MLPs are 3C wide SwiGLUs (13 C^2 multiply-adds a token and block, FLUX.1's 12).

The text encoder is Qwen3 (hidden states of its layers 9, 18 and 27 side by side: 3 x its width per
token, 512 tokens of a chat-templated prompt), with no pooled embedding; [klein] has no guidance
embedding: the distilled model ignores guidance, the base model runs classifier-free guidance against an
empty prompt. diffusers has no img2img pipeline for it (Flux2KleinPipeline's `image` is a reference the
model attends to beside the picture it makes, not an SDEdit start), so the recipe's SDEdit stages cannot
run (`SDEDIT`), and there is no FLUX.2 ControlNet. Shapes for the memory plan are in `shapes`, activations
in `activations`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...core.flops import FluxShape
from ...core.positions import Grid, exact_ids
from ...errors import ConfigError
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

NAME = "flux2"
LABEL = "FLUX.2"  # how messages name the family
TOKEN_PX = 16  # pixels per image token side: the VAE's factor 8 times the 2 x 2 patches
SDEDIT = False  # no img2img pipeline in diffusers: one text-to-image stage a run
MODEL_CLASSES = ("Flux2Transformer2DModel",)
FORWARD_ARGS = (  # Flux2Transformer2DModel.forward's positional parameters
    "hidden_states",
    "encoder_hidden_states",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
    "joint_attention_kwargs",
    "return_dict",
)
RESIDUALS: tuple[str, ...] = ()  # no ControlNet
IMAGE_IDS = "img_ids"  # the call's argument holding the image tokens' RoPE positions, (N, 4)
TEXT_ENCODER = "text_encoder"  # the component --quantize-text quantizes: Qwen3
SAMPLE_EMBEDDINGS = ("prompt_embeds",)  # of encode_prompt's: what a distillation sample keeps
ORIGINAL_KEY = "double_blocks.0.img_attn.qkv.weight"  # BFL's names, as diffusers' converter reads them
DIFFUSERS_KEY = "transformer_blocks.0.attn.to_q.weight"
ORIGINAL_PREFIX = "model.diffusion_model."
CONTROLNET_CONFIG_FIELDS: tuple[str, ...] = ()


# ---------------------------------------------------------------- the forward call


def is_controlnet(module) -> bool:
    return False


def forward_arguments(module, args: tuple, kwargs: dict) -> dict:
    """The transformer's call arguments by name, positional ones included."""
    return {**dict(zip(FORWARD_ARGS, args, strict=False)), **kwargs}


def text_tokens(module, encoder_hidden_states: Tensor) -> int:
    return encoder_hidden_states.shape[1]


def condition_embedder(module) -> torch.nn.Module | None:
    return None


def image_ids(kwargs: dict) -> Tensor:
    """img_ids as (N, 4) from a call's arguments by name."""
    return _image_ids(kwargs, IMAGE_IDS)


# ---------------------------------------------------------------- attention


def _parallel(attn) -> bool:
    """A single-stream block's attention (Flux2ParallelSelfAttention): fused q, k, v and MLP input."""
    return hasattr(attn, "to_qkv_mlp_proj")


def attention_call(attn, args: tuple, kwargs: dict) -> AttentionCall:
    """A processor call's arguments by meaning: a single-stream block's module passes (hidden_states,
    attention_mask, image_rotary_emb), a double-stream one FluxAttnProcessor's order."""
    if not _parallel(attn):
        return joint_call(args, kwargs)
    names = ("hidden_states", "attention_mask", "image_rotary_emb")
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    return AttentionCall(
        given["hidden_states"], None, given.get("attention_mask"), given.get("image_rotary_emb")
    )


def attention_parts(attn, hidden: Tensor, text: Tensor | None) -> AttentionParts:
    """What the attention module computes around its attention (models.attention): joint attention in
    double blocks; in single blocks, as Flux2ParallelSelfAttnProcessor: q, k, v from the first 3C outputs
    of to_qkv_mlp_proj (computed once, when the queries are), and to_out([attention ; SwiGLU(rest)])."""
    if not _parallel(attn):
        return joint_parts(attn, hidden, text)
    inner, fused = attn.inner_dim, {}

    def projection(i: int) -> Callable[[], Tensor]:
        def project() -> Tensor:
            if "x" not in fused:
                fused["x"] = attn.to_qkv_mlp_proj(hidden)  # (B, L, 3C + 2M)
            return fused["x"][..., i * inner : (i + 1) * inner]  # (B, L, C): a view

        return project

    def output(out: Tensor) -> Tensor:
        mlp = attn.mlp_act_fn(fused.pop("x")[..., 3 * inner :])  # (B, L, M)
        return attn.to_out(torch.cat([out, mlp], dim=-1))  # (B, L, C)

    return AttentionParts(
        [(projection(0), attn.norm_q)], [(projection(1), attn.norm_k)], [projection(2)], output
    )


def attention_output(block, keep: Callable[[Tensor], None]):
    """Hand `keep` a single-stream block's attention output (B, T + N, C), before any output projection,
    at every call: the first C channels of what `to_out` projects. Returns the hook's handle."""
    inner = block.attn.inner_dim
    return block.attn.to_out.register_forward_pre_hook(lambda module, args: keep(args[0][..., :inner]))


def clear_projections(attention: str) -> tuple[str, ...]:
    """The projections of an attention module that CLEAR weights replace: the image branch's q, k, v and
    output projection in double-stream blocks, the fused q, k, v and MLP-input Linear in single ones."""
    return (
        ("to_q", "to_k", "to_v", "to_out.0") if attention.startswith("transformer_") else ("to_qkv_mlp_proj",)
    )


def is_clear_key(key: str) -> bool:
    """A key of a CLEAR checkpoint for this family: an attention module's replaced projection
    (clear_projections) or its processor's spatial weight."""
    return _is_clear_key(key, clear_projections)


def flop_shape(config) -> FluxShape:
    """The FLOP model's shape (core.flops) of a Flux2Transformer2DModel config (or anything with its field
    names): per token and block, q, k, v, out (4 C^2) and a SwiGLU MLP of ratio r (3r C^2), in both kinds."""
    get = (
        (lambda k, d: config.get(k, d)) if isinstance(config, dict) else (lambda k, d: getattr(config, k, d))
    )
    return FluxShape(
        heads=get("num_attention_heads", 48),
        head_dim=get("attention_head_dim", 128),
        double=get("num_layers", 8),
        single=get("num_single_layers", 48),
        in_channels=get("in_channels", 128),
        joint_dim=get("joint_attention_dim", 15360),
        block_macs=4 + 3 * get("mlp_ratio", 3.0),
    )


def text_length(config) -> int:
    """Qwen3 tokens of a prompt: 512 (Flux2KleinPipeline's max_sequence_length), whatever the config."""
    return 512


def prompt_cut(pipe, prompt: str, max_len: int) -> str | None:
    """What of `prompt` Qwen3 does not read ('Qwen3 reads 512 of its 1,650 tokens', counting the chat
    template the pipeline wraps it in), or None when it reads all of it (diffusers cuts it silently)."""
    text = _chat(pipe.tokenizer, prompt)
    tokens = len(pipe.tokenizer(text, truncation=False).input_ids)
    return f"Qwen3 {max_len} of {tokens:,} tokens" if tokens > max_len else None


def _chat(tokenizer, prompt: str) -> str:
    """The prompt as Flux2KleinPipeline gives it to Qwen3: a user turn of its chat template."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def encode_prompt(pipe, prompt: str, device, max_len: int) -> dict[str, Tensor]:
    """One prompt's embeddings by name, each (1, T, 3 x Qwen3's width): `prompt_embeds`, and for a model
    that runs classifier-free guidance (not distilled) the empty prompt's, `negative_prompt_embeds`, so
    that the pipeline never needs the text encoder again."""
    out = {"prompt_embeds": pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=max_len)[0]}
    if not pipe.config.get("is_distilled", False):
        out["negative_prompt_embeds"] = pipe.encode_prompt(
            prompt="", device=device, max_sequence_length=max_len
        )[0]
    return out


def prompt_arguments(embeds: dict[str, Tensor]) -> dict[str, Tensor]:
    """encode_prompt's embeddings as Flux2KleinPipeline's call takes them."""
    return dict(embeds)


# ---------------------------------------------------------------- latents


def _patchify(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2): each 2 x 2 patch into channels, as diffusers' _patchify_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2)  # (B, C, h/2, 2, w/2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def pack_latents(latents: Tensor) -> Tensor:
    """VAE latents into FLUX.2 tokens: (B, C, h, w) -> (B, (h/2)(w/2), 4C), 2 x 2 patches row-major."""
    x = _patchify(latents)  # (B, 4C, h/2, w/2)
    return x.flatten(2).transpose(1, 2)  # (B, (h/2)(w/2), 4C)


def unpack_latents(latents: Tensor, width: int, height: int) -> Tensor:
    """FLUX.2 tokens of a width x height px image back into VAE latents: (B, N, 4C) -> (B, C, H/8, W/8)."""
    b, _, c = latents.shape
    h, w = height // TOKEN_PX, width // TOKEN_PX
    x = latents.transpose(1, 2).reshape(b, c // 4, 2, 2, h, w)  # (B, C, 2, 2, H/16, W/16)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)  # (B, C, H/8, W/8)


def _batch_norm(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE's batch-norm statistics of the patchified latents, (1, 4C, 1, 1) each: mean and std."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        like.device, like.dtype
    )
    return mean, std


def vae_latents(vae, latents: Tensor, width: int, height: int) -> Tensor:
    """A pipeline's `output_type="latent"` result as the VAE decodes it: Flux2KleinPipeline returns VAE
    latents (B, 32, H/8, W/8) already (unpacked, batch-norm undone, unpatchified)."""
    return latents


def model_latents(vae, x0: Tensor) -> Tensor:
    """VAE latents (B, C, h, w) as the transformer takes them: patchified, normalised with the VAE's
    batch-norm statistics and packed, (B, N, 4C)."""
    x = _patchify(x0)  # (B, 4C, h/2, w/2)
    mean, std = _batch_norm(vae, x)
    return ((x - mean) / std).flatten(2).transpose(1, 2)  # (B, N, 4C)


def forward_inputs(
    hidden: Tensor, embeds: dict[str, Tensor], timestep: Tensor, grid: Grid, guidance: Tensor | None
) -> dict:
    """The transformer's keyword arguments for packed tokens (B, N, 4C) of an h x w grid, embeddings as
    encode_prompt names them (batched), timestep sigma (B,) and guidance (B,) or None (ignored without a
    guidance embedder)."""
    device, text_len = hidden.device, embeds["prompt_embeds"].shape[1]
    txt_ids = torch.zeros(text_len, 4, device=device)
    txt_ids[:, 3] = torch.arange(text_len, device=device)  # [0, 0, 0, index], as the pipeline's
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=embeds["prompt_embeds"],
        timestep=timestep,  # sigma: the transformer multiplies by 1000, as the pipeline relies on
        img_ids=exact_ids(grid, device, axes=4),  # cached: the same tensor every step
        txt_ids=txt_ids,
        guidance=guidance,
    )


# ---------------------------------------------------------------- positions and feed-forward chunking


def use_exact_positions(model) -> None:
    """Nothing to do: FLUX.2's pipelines build integer img_ids, exact in every dtype (CLEAR's hooks feed
    RoPE the same integers as float32)."""


def chunk_feed_forward(transformer, tokens: int | None) -> None:
    """Run the double-stream blocks' feed-forwards (ff, ff_context) `tokens` tokens at a time; None restores
    the stock forwards. The single-stream blocks' MLP is fused with their attention's projections (inside
    the attention module) and runs whole."""
    from ..flux1.chunking import chunked_ff, replace_forward

    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    for block in transformer.transformer_blocks:
        replace_forward(block.ff, tokens, chunked_ff)
        replace_forward(block.ff_context, tokens, chunked_ff)
    transformer._ff_chunk_tokens = tokens


# ---------------------------------------------------------------- diffusers classes


def pipeline_class(img2img: bool = False, controlnet: bool = False):
    """Flux2KleinPipeline; diffusers has no img2img or ControlNet pipeline for FLUX.2 [klein]."""
    if img2img or controlnet:
        what = "an img2img (SDEdit)" if img2img else "a ControlNet"
        raise ConfigError(f"diffusers has no {what} pipeline for {LABEL} [klein]")
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def transformer_class():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel


def controlnet_class():
    raise ConfigError(f"{LABEL} ({NAME}) has no ControlNet in diffusers: run it without --controlnet")


def convert_original(state_dict: dict) -> dict:
    """A transformer state dict under BFL's original names, under diffusers' (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(state_dict)


def text_encoder_class():
    """Qwen3 (text_encoder), the text encoder --quantize-text quantizes."""
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM


# ---------------------------------------------------------------- editing (a reference picture)

EDIT_PIPELINES = ()  # Flux2KleinPipeline's reference pictures: not run by clear-gen yet


def _no_edit(*args, **kwargs):
    raise ConfigError(f"clear-gen does not edit pictures with {LABEL} ({NAME}): FLUX.1 Kontext [dev] does")


reference_size = reference_latents = reference_tokens = _no_edit


from ..flux1.vae import set_vae_tiling  # noqa: E402, F401  (FLUX.2's VAE: FLUX.1's encoder and decoder blocks)
from . import activations, shapes  # noqa: E402, F401  (its submodules: models.family("flux2").shapes)
