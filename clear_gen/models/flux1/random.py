"""A transformer with FLUX.1-dev's architecture and random weights, built directly on the device.

Speed does not depend on weight values, so `clear-gen bench --what step` times this instead of the
30 GB checkpoint. Built on the 'meta' device and materialised in the target dtype: no float32 copy of
the 12B parameters is ever allocated.
"""

from __future__ import annotations

import torch

from ...core import flops as FL
from ...errors import ConfigError


def flux_shape(heads: int, head_dim: int, layers: int) -> FL.FluxShape:
    """FLUX.1-dev's transformer with `layers` blocks split 1 : 2 as in FLUX (57 = 19 double + 38 single)."""
    if layers < 1:
        raise ConfigError(f"--layers must be at least 1, got {layers}")
    double = max(1, round(layers * 19 / 57))
    return FL.FluxShape(heads=heads, head_dim=head_dim, double=double, single=layers - double)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (index, row, column) summing to head_dim in FLUX's 16 : 56 : 56 proportion."""
    if head_dim % 32:
        raise ConfigError(f"--head-dim must be a multiple of 32 for the step benchmark, got {head_dim}")
    side = (head_dim - head_dim // 8) // 2
    return (head_dim // 8, side, side)


def free_bytes(device: torch.device) -> int:
    """Memory free on the device: the GPU's, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_transformer(shape: FL.FluxShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """FluxTransformer2DModel with FLUX.1-dev's configuration and random weights, made on the device in
    dtype (built on 'meta' first, so no float32 copy is ever allocated). Refused, with the sizes, when
    its weights alone would not fit in the device's free memory."""
    need = FL.parameter_count(shape) * torch.empty(0, dtype=dtype).element_size()
    if need > free_bytes(device):
        raise ConfigError(
            f"a transformer of {shape.layers} layers x {shape.heads} heads x {shape.head_dim} needs "
            f"{need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')} and {device} has "
            f"{free_bytes(device) / 1e9:.1f} GB free; shrink it with --layers, --heads or --head-dim"
        )
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError:
        raise ConfigError("the step benchmark needs diffusers: pip install 'diffusers>=0.35'") from None
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=shape.double,
            num_single_layers=shape.single,
            attention_head_dim=shape.head_dim,
            num_attention_heads=shape.heads,
            joint_attention_dim=shape.joint_dim,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=rope_axes(shape.head_dim),
            in_channels=shape.in_channels,
        )
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)  # meta: no memory yet
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)  # keeps activations O(1)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)  # biases 0, norm weights 1
    return model.eval().requires_grad_(False)


def step_inputs(model, res: int, text_len: int, device, dtype, seed: int = 0) -> dict:
    """Random latents and text features, with FluxPipeline's ids: img_ids rows [0, y, x] row-major."""
    side, cfg = res // 16, model.config
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # (h, w) each
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).view(-1, 3)  # (N, 3)
    return {
        "hidden_states": rand(1, side * side, cfg.in_channels),  # (B, N, 64) packed latents
        "encoder_hidden_states": rand(1, text_len, cfg.joint_attention_dim),  # (B, T, 4096)
        "pooled_projections": rand(1, cfg.pooled_projection_dim),  # (B, 768)
        "timestep": torch.tensor([1.0], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "img_ids": img_ids.to(device, dtype),
        "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
        "return_dict": False,
    }


# ---------------------------------------------------------------- a whole pipeline (bench --what image)

VAE_CHANNELS = 128  # FLUX.1-dev's VAE: 128, 256, 512, 512 channels
VAE_TILE = 1024  # px: its sample_size, the side of diffusers' tiles
CLIP_DIM = 768  # the pooled text vector FLUX.1 takes (pooled_projection_dim)
SCHEDULER = dict(  # FLUX.1-dev's scheduler configuration
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
    use_dynamic_shifting=True,
)  # fmt: skip


def build_vae(device: torch.device, dtype: torch.dtype, channels: int = VAE_CHANNELS, seed: int = 0):
    """AutoencoderKL with FLUX.1-dev's VAE configuration (tiling sizes included) and random weights, made
    on the device; `channels` < 128 narrows every level in the same 1 : 2 : 4 : 4 proportion."""
    from diffusers import AutoencoderKL

    check_vae_channels(channels)
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=VAE_TILE,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[channels, 2 * channels, 4 * channels, 4 * channels],
            norm_num_groups=min(32, channels), scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
        )  # fmt: skip
    return torch.nn.Module.to(vae, dtype).eval().requires_grad_(False)  # diffusers' .to() warns of upcasts


def check_vae_channels(channels: int) -> None:
    if channels < 8 or channels % 8:
        raise ConfigError(f"--vae-channels must be a positive multiple of 8 (128: FLUX.1's), got {channels}")


def _tokenizers():
    """CLIP- and T5-like tokenizers over a-z, built in memory: the real ones cannot be fetched offline,
    and what the text encoders make of a prompt does not change a step's speed."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    def make(specials: list[str], template: str, max_len: int):
        vocab = {w: i for i, w in enumerate([*specials, *string.ascii_lowercase])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1]))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token a character
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template]
        )
        names = dict(zip(("bos_token", "eos_token", "pad_token", "unk_token"), specials, strict=False))
        return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **names), len(vocab)

    clip_specials = ["<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"]
    clip = make(clip_specials, "<|startoftext|> $A <|endoftext|>", 77)
    t5 = make(["<s>", "</s>", "<pad>", "<unk>"], "$A </s>", 512)
    return clip, t5


def build_text_encoders(joint_dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Tiny random CLIP and T5 text encoders (one layer, a few channels inside) with FLUX.1's output sizes:
    a pooled 768 vector and `joint_dim` (4096) features a token. ((clip, tokenizer), (t5, tokenizer))."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    (clip_tok, clip_vocab), (t5_tok, t5_vocab) = _tokenizers()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=CLIP_DIM, intermediate_size=16, num_attention_heads=1,
        num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=joint_dim, d_ff=16, d_kv=8, num_heads=1, num_layers=1,
        relative_attention_num_buckets=8, pad_token_id=2, eos_token_id=1, decoder_start_token_id=2,
    ))  # fmt: skip
    encoders = [m.to(device, dtype).eval().requires_grad_(False) for m in (clip, t5)]
    return (encoders[0], clip_tok), (encoders[1], t5_tok)


def build_pipeline(
    shape: FL.FluxShape, device: torch.device, dtype: torch.dtype, vae_channels: int = VAE_CHANNELS
):
    """A FluxPipeline of random parts, in memory, on the device: FLUX.1-dev's transformer (`shape`) and
    VAE, tiny text encoders, FLUX.1-dev's scheduler. No download and nothing written to disk."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = build_transformer(shape, device, dtype)
    (clip, clip_tok), (t5, t5_tok) = build_text_encoders(shape.joint_dim, device, dtype)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=build_vae(device, dtype, vae_channels),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
