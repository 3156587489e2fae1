"""Peak bytes of FLUX.2's activations: one denoising step of the transformer, and the VAE's decode or
encode, for the memory plan (plan/memory.py). With e the compute dtype's bytes per element, L = T + N
tokens (text + image), hidden size C and MLP width M = r C (r = 3 for [klein]):

The peak is in a single-stream block, whose attention module computes q, k, v and the MLP's input in one
Linear (3C + 2M wide) that stays alive until [attention ; SwiGLU] is projected back. In copies of one
L x C activation at e bytes:
- carried through the block: its input and the modulated norm                                   2
- the fused projection (q, k, v and the MLP's gate and value)                                   3 + 2r
- attention, stock processor: q and k normed and rotated, the output                            3
  + RoPE's float32 temporaries, 3 x L x C x 4 bytes
- attention, CLEAR: its processor's bytes (attention.processor.attention_bytes)
- the output phase: the attention output 1, SwiGLU's silu and product r + r: 6 + 4r; stock, 9 + 4r: the
  fused projection stays alive through the concatenation 1 + r and the projection 1, and the attention
  output is copied once more (flattened from the kernel's layout).
So a step needs, besides RoPE's cos/sin tables (of the text, the image and both: 4 x L x head_dim x 4
bytes):
    stock:  max((8 + 2r) L C e + 12 L C, (9 + 4r) L C e)
    CLEAR:  max((5 + 2r) L C e + attention, (6 + 4r) L C e)
i.e. for [klein] at 4096 px in bf16 (L = 66,048 tokens, 0.41 GB a copy) 8.7 GB stock, 7.4 GB with CLEAR. The
double-stream blocks peak lower (their MLPs are on one stream at a time); feed-forward chunking slices
them only, so it does not lower the step's peak. Measured op by op against diffusers' blocks on the 'meta'
device (tests/test_flux2.py), not on a GPU.

VAE (AutoencoderKLFlux2): the decoder and encoder of FLUX.1's AutoencoderKL (blocks 128/256/512/512, two
layers each) with 32 latent channels and a batch-norm of the patchified latents: FLUX.1's formula.
"""

from __future__ import annotations

from ..flux1.activations import vae_activations  # noqa: F401  (the same decoder: see above)
from .shapes import TransformerConfig


def step_activations(
    text_len: int,
    image_len: int,
    cfg: TransformerConfig,
    e: int,
    chunk: int | None,
    attention: int | None = None,
) -> int:
    """Peak bytes of activations of one transformer call on T + N tokens (module docstring); `chunk`: the
    double blocks' feed-forward slice (no effect on the peak); `attention`: the attention phase's bytes
    of another processor than the stock one (CLEAR's: attention.processor.attention_bytes)."""
    tokens = text_len + image_len
    x = tokens * cfg.hidden  # elements of one (L, C) activation
    r = cfg.mlp / cfg.hidden
    carried, fused = 2 * x * e, round((3 + 2 * r) * x) * e
    if attention is None:  # the stock processor: q, k rotated, the output, RoPE's float32 temporaries
        attention, output = 3 * x * e + 3 * x * 4, round((9 + 4 * r) * x) * e
    else:
        output = round((6 + 4 * r) * x) * e
    rope_tables = 4 * tokens * cfg.attention_head_dim * 4
    return rope_tables + max(carried + fused + attention, output)
