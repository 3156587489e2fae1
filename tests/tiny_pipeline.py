"""A tiny FLUX.1 pipeline in diffusers format, built from local configs and vocabularies (no network)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def _tokenizers(tmp: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTokenizer, T5TokenizerFast

    letters = string.ascii_lowercase
    words = ["<|startoftext|>", "<|endoftext|>"] + [f"{c}</w>" for c in letters] + list(letters)
    (tmp / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    clip = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *letters]
    unigram = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    t5 = T5TokenizerFast(
        tokenizer_object=unigram,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )
    return clip, t5, len(words), len(pieces)


def save_tiny_flux(
    path: Path,
    seed: int = 0,
    heads: int = 2,
    vae_channels: int = 8,
    vae_attention: bool = True,
    pipeline: str = "FluxPipeline",
) -> Path:
    """Write a FluxPipeline with 1 double + 1 single block, `heads` heads of 16, a 4-level VAE `vae_channels`
    wide at every level (`vae_attention`: with its mid block's attention, as FLUX.1's); ~1 MB.

    6 heads: 2 and 3 ranks of a sequence-parallel run each take a whole number of them. Without the mid
    block's attention (quadratic in the latent's pixels: ~35 s a decode of 2048x6144 px on 2 CPU cores) a
    picture of 10M px decodes in seconds (test_wide.py). `pipeline`: the class it is saved as
    (FluxKontextPipeline: a tiny FLUX.1 Kontext, in path / "kontext")."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path.mkdir(parents=True, exist_ok=True)
    clip_tok, t5_tok, clip_vocab, t5_vocab = _tokenizers(path)
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            relative_attention_num_buckets=8,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[vae_channels] * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=vae_attention,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    pipe = getattr(diffusers, pipeline)(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    folder = path / ("flux" if pipeline == "FluxPipeline" else "kontext")
    pipe.save_pretrained(folder)
    for leftover in ("vocab.json", "merges.txt"):
        (path / leftover).unlink()
    return folder


def tiny_controlnet(transformer_config: dict, union: bool, seed: int = 7, **config):
    """A FluxControlNetModel for a transformer of this config (1 double + 1 single block, 3 modes if
    `union`; `config` overrides, e.g. another joint_attention_dim), its zero-initialised layers made
    random so that the control changes the image."""
    from diffusers import FluxControlNetModel

    settings = {
        **transformer_config,
        "num_layers": 1,
        "num_single_layers": 1,
        "num_mode": 3 if union else None,
    }
    torch.manual_seed(seed)
    net = FluxControlNetModel.from_config({**settings, **config}).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.normal_(0, 0.3)
    return net


def save_tiny_controlnet(path: Path, model: Path, union: bool, seed: int = 7, **config) -> Path:
    """Write tiny_controlnet for the tiny pipeline in `model` (its transformer's config) into `path`."""
    base = json.loads((model / "transformer" / "config.json").read_text())
    tiny_controlnet(base, union, seed, **config).save_pretrained(path)
    return path


def _qwen_tokenizer():
    """A byte-level BPE tokenizer of letters, in Qwen2TokenizerFast's class, with a chat template of Qwen's
    shape (Flux2KleinPipeline wraps each prompt in one)."""
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *string.ascii_lowercase, "Ġ", "Ċ", *"<>|_/:"])}
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer, len(vocab)


def save_tiny_flux2(path: Path, seed: int = 0, heads: int = 2, distilled: bool = False) -> Path:
    """Write a Flux2KleinPipeline with 1 double + 1 single block, `heads` heads of 16, a 28-layer Qwen3 of
    width 16 (the pipeline reads its layers 9, 18 and 27: 48 features a token), a 4-level VAE with 4 latent
    channels and random batch-norm statistics; ~0.5 MB. `distilled`: the guidance-free kind (no CFG).
    The blocks' modulation is scaled up: CLEAR changes the prediction a few %, as on the tiny FLUX.1."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = _qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
        )
    )
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=48,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    with torch.no_grad():  # gates 8x as wide: attention moves the output a few %, as in the tiny FLUX.1
        for modulation in (
            "double_stream_modulation_img",
            "double_stream_modulation_txt",
            "single_stream_modulation",
        ):
            getattr(transformer, modulation).linear.weight.mul_(8)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipe.save_pretrained(path / "flux2")
    return path / "flux2"
