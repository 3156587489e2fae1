"""Peak bytes of FLUX.1's activations: one denoising step of the transformer, and the VAE's decode or
encode, for the memory plan (plan/memory.py). With e the compute dtype's bytes per element:

Activations of one step at L = T + N tokens (text + image) and hidden size C (3072 for FLUX.1). The
peak is in a single-stream block (the double-stream blocks peak lower); in copies of one L x C
activation at e bytes:
- carried through the block: its input, the concatenated residual, the adaLN-normed input   3
- the MLP's GELU output, 4C wide, kept alive through attention (stock block only)             4
- attention, stock processor: q, k, v and RoPE's rotated copy                                 4
  + RoPE's three float32 temporaries, 3 x L x C x 4 bytes
- attention, CLEAR: q, k, v and the value concatenation                                       4
  (or 3 + a norm/RoPE slice of min(L, 8192) tokens at 2e + 12 bytes an element, if larger)
- the stock block's output: attention out 1, MLP 4, their concatenation 5, projection 1, gate 1:
  with the 3 carried, 15 copies, the largest phase of a stock block.
Feed-forward chunking (chunking.py) runs the MLP after attention over slices of S tokens: the MLP
leaves the attention phase, and the output phase becomes 5 copies + 9 x S x C x e.
So a step needs, besides RoPE's cos/sin tables (2 x L x head_dim x 4 bytes):
    stock:  max(11 L C e + 12 L C, 15 L C e)    chunked:  max(7 L C e + 12 L C, 5 L C e + 9 S C e)
    CLEAR:  15 L C e                            chunked:  7 L C e
i.e. at 8192 px in bf16 (L = 262,656, 1.61 GB a copy) 24.5 GB for CLEAR unchunked, 11.6 GB chunked.
A ControlNet adds its residuals, one N x C image activation per block of it, alive through the
transformer's call (15 blocks of union-pro: 24 GB at 8192 px in bf16); its own call, on the same tokens
with fewer blocks, peaks no higher than the transformer's.

VAE (AutoencoderKL, counted on diffusers' decoder): decode 768 e bytes a pixel, or with tiling one
tile's (sample_size px a side) 768 e bytes a pixel plus 5 e a pixel of the whole image; encode 640 e
a pixel (tiled: a tile's, plus 4 e a pixel). Decoding also keeps 3 copies of the RGB image.
"""

from __future__ import annotations

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
    feed-forward slice; `attention`: the attention phase's bytes of another processor than the stock one
    (CLEAR's: attention.processor.attention_bytes)."""
    tokens = text_len + image_len
    x = tokens * cfg.hidden  # elements of one (L, C) activation
    carried, mlp = 3 * x * e, (0 if chunk else 4 * x * e)
    if attention is None:  # the stock processor: q, k, v, RoPE's rotated copy and its float32 temporaries
        attention = 4 * x * e + 3 * x * 4
    if chunk:
        output = 5 * x * e + 9 * min(chunk, tokens) * cfg.hidden * e
    else:
        output = 15 * x * e
    rope_tables = 2 * tokens * cfg.attention_head_dim * 4
    return rope_tables + max(carried + mlp + attention, output)


def vae_activations(width: int, height: int, e: int, tile: int | None, encode: bool) -> int:
    """Peak bytes of a VAE decode (or encode) of a width x height image; `tile`: the tile side with
    tiling on (tiles apply above it), None without."""
    pixels, per_pixel = width * height, (640 if encode else 768) * e
    if tile is None or max(width, height) <= tile:
        vae = per_pixel * pixels
    else:
        vae = per_pixel * tile * tile + (4 if encode else 5) * e * pixels
    return vae if encode else max(vae, 9 * e * pixels)  # decoding: then the RGB image, twice normalised
