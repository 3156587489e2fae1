"""FLUX.1 Kontext [dev] (diffusers' FluxKontextPipeline): FLUX.1's transformer, called with a reference
picture's tokens after the image's. What clear-gen needs of it:

- the reference's size: Kontext was trained on pictures of about a megapixel at the sizes of PREFERRED
  (diffusers' PREFERRED_KONTEXT_RESOLUTIONS), and FluxKontextPipeline resizes its picture to the one nearest
  in aspect ratio; `reference_size` does the same, rounded to the run's size multiple (64 px when CLEAR
  pools 4 x 4 cells, which each grid's sides must divide);
- its tokens (`reference_latents`): the picture resized and normalised by the pipeline's image processor,
  the VAE posterior's mode, shifted, scaled and packed as the image's latents; ids [1, row, col] of its
  own grid (core.positions.Grid, index 1);
- the call (`reference_tokens`): while it is on, the transformer is called as FluxKontextPipeline's loop
  calls it, hidden_states [image ; reference] and img_ids [ids ; reference ids], and returns the image
  tokens' prediction alone. Any FLUX.1 pipeline then runs Kontext: FluxPipeline its text-to-image pass and
  FluxImg2ImgPipeline an SDEdit stage with the reference (diffusers has no Kontext img2img pipeline).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ...core.positions import Grid, exact_ids
from ...core.sizes import round_size
from . import TOKEN_PX, forward_arguments, image_ids, model_latents

EDIT_PIPELINES = ("FluxKontextPipeline",)  # model_index.json classes of FLUX.1 models that edit pictures
PREFERRED = (  # (width, height) px: diffusers' PREFERRED_KONTEXT_RESOLUTIONS (pipeline_flux_kontext.py)
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720),
    (1504, 688), (1568, 672),
)  # fmt: skip
REFERENCE_INDEX = 1  # the reference's first id axis


def reference_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) px of the reference tokens of a width x height picture: the preferred size nearest
    its aspect ratio (ties as diffusers breaks them), each side rounded to `multiple`."""
    _, w, h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED)
    return round_size(w, h, multiple)


def reference_latents(pipe, picture, width: int, height: int) -> tuple[Tensor, Grid]:
    """(packed latents (1, N_r, 64), their grid) of a PIL picture as the reference at width x height px,
    as FluxKontextPipeline makes them (resized with the processor's filter, Lanczos; the posterior's mode).
    On the pipeline's execution device, in the VAE's dtype."""
    processor, vae = pipe.image_processor, pipe.vae
    image = processor.preprocess(processor.resize(picture, height, width), height, width)  # (1, 3, H, W)
    with torch.no_grad():
        x0 = vae.encode(image.to(pipe._execution_device, vae.dtype)).latent_dist.mode()  # (1, 16, H/8, W/8)
    return model_latents(vae, x0), Grid(height // TOKEN_PX, width // TOKEN_PX, index=REFERENCE_INDEX)


@contextmanager
def reference_tokens(model, latents: Tensor, grid: Grid) -> Iterator[None]:
    """Inside: every call of `model` (a FluxTransformer2DModel) gets the reference tokens `latents`
    (1, N_r, 64) after its image tokens, with `grid`'s ids after img_ids, and returns the prediction of its
    own image tokens: (B, N + N_r, 64) in, (B, N, 64) out.

    Its input hook runs before every other (CLEAR's tile order, exact positions) but those registered
    after it (a stage's step clock and the capture of its call: a repeated call gets the reference again);
    its output hook after CLEAR's, which goes first (attention.hooks).
    """
    ids = exact_ids(grid, latents.device)  # (N_r, 3): [1, row, col]
    call = {}

    def before(module, args: tuple, kwargs: dict):
        kwargs = forward_arguments(module, args, kwargs)
        hidden, own = kwargs["hidden_states"], image_ids(kwargs)  # (B, N, 64), (N, 3)
        assert own.shape[0] == hidden.shape[1], "reference_tokens: img_ids and hidden_states disagree"
        call["tokens"] = hidden.shape[1]
        reference = latents.to(hidden.device, hidden.dtype).expand(hidden.shape[0], -1, -1)
        kwargs["hidden_states"] = torch.cat([hidden, reference], dim=1)  # (B, N + N_r, 64)
        kwargs["img_ids"] = torch.cat([own, ids.to(own.device, own.dtype)])  # (N + N_r, 3)
        return (), kwargs

    def after(module, args: tuple, output):
        n = call.pop("tokens")
        if isinstance(output, tuple):
            return (output[0][:, :n], *output[1:])
        output.sample = output.sample[:, :n]
        return output

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        model.register_forward_hook(after),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
