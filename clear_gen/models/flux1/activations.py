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

VAE (AutoencoderKL, counted on diffusers' decoder): decode 768 e bytes a pixel, encode 640 e a pixel;
- fast tiling (diffusers'): one tile's (`tile` px a side) 768 e a pixel plus 5 e a pixel of the whole
  image (encode: a tile's 640 e, plus 4 e a pixel);
- exact tiling (vae.py): the larger of its whole-latent part (decode: conv_in and the mid block, 64 e a
  pixel; encode: the mid block and conv_out, 56 e) and its tiled part: the parked residual stream of the
  full-size level (128 channels, 128 e a pixel), with the one before it until a sweep has passed it
  (1/rows + 1/tiles of it more), plus one tile's working set: 528 e a pixel of the largest tile's core
  decoding, 616 e encoding (measured on 'meta' over 4-32 tiles of 256 and 512 px: 520-528 and 556-615);
  with sequential offload the parked tiles wait in the machine's memory and only the working set and
  the whole-latent part are on the GPU. At 8192 px in bf16 with 1024 px tiles (8 x 8): 20.7 GB decoding,
  20.9 GB encoding.
  Measured against the live bytes of a full-width VAE on 'meta' (tests/test_vae_tiling.py).
Decoding also keeps 3 copies of the RGB image.
"""

from __future__ import annotations

import math

from ...core.tiles import LATENT_PX, tile_grid
from .shapes import TransformerConfig

VAE_TOP_CHANNELS = 128  # block_out_channels[0]: the channels of the VAE's full-size level
TILE_DECODE, TILE_ENCODE = 528, 616  # e bytes a pixel of a tile's core: exact tiling's working set


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


def vae_activations(
    width: int, height: int, e: int, tiling: str, tile: int, encode: bool, parked: bool = True
) -> int:
    """Peak bytes of a VAE decode (or encode) of a width x height image with `tiling` (off, fast or exact;
    tiles apply above `tile` px); `parked`: exact tiling's parked activations count (False: they wait in
    the machine's memory, with sequential offload)."""
    pixels, per_pixel = width * height, (640 if encode else 768) * e
    if tiling == "off" or max(width, height) <= tile:
        vae = per_pixel * pixels
    elif tiling == "fast":
        vae = per_pixel * tile * tile + (4 if encode else 5) * e * pixels
    else:
        vae = _exact(width, height, e, tile, encode, parked)
    return vae if encode else max(vae, 9 * e * pixels)  # decoding: then the RGB image, twice normalised


def _exact(width: int, height: int, e: int, tile: int, encode: bool, parked: bool) -> int:
    """Exact tiling's peak (module docstring): its whole-latent part or its tiled part."""
    grid = tile_grid(height // LATENT_PX, width // LATENT_PX, tile // LATENT_PX)
    rows, cols = grid.shape
    core = math.ceil(height / LATENT_PX / rows) * math.ceil(width / LATENT_PX / cols) * LATENT_PX**2
    pixels = width * height
    stream = VAE_TOP_CHANNELS * e * pixels * (1 + 1 / rows + 1 / (rows * cols)) if parked else 0
    whole = (56 if encode else 64) * e * pixels
    return max(whole, math.ceil(stream) + (TILE_ENCODE if encode else TILE_DECODE) * e * core)
