"""Validation during distillation: each held-out prompt rendered by the teacher (full attention, the base's
projections) and by the student (CLEAR, its trained projections) from the same seed, side by side in one
PNG per validation, with PSNR and SSIM of student against teacher (compare.similarity)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .. import models
from ..attention import original_attention
from ..run.compare import grid_image, similarity
from .data import Samples


def validation_folder(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + "-validation")


def render(pipe, embeds: dict, opts, seed: int):
    """One image at opts.res from cached prompt embeddings, as text-to-image (the base's scheduler)."""
    return pipe(
        **models.of(pipe.transformer).prompt_arguments(embeds),
        height=opts.res,
        width=opts.res,
        num_inference_steps=opts.validate_steps,
        guidance_scale=opts.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def validate(pipe, samples: Samples, opts, step: int, out: Path) -> dict:
    """{"psnr", "ssim" (means over the prompts; psnr None when every pair is identical), "path"}."""
    from PIL import Image

    transformer, dtype = pipe.transformer, pipe.transformer.dtype
    rows, psnrs, ssims = [], [], []
    for k, (prompt, embeds) in enumerate(samples.validation(transformer.device, dtype)):
        with original_attention(transformer):
            teacher = render(pipe, embeds, opts, opts.seed + k)
        student = render(pipe, embeds, opts, opts.seed + k)
        identical, psnr, ssim = similarity(np.asarray(teacher), np.asarray(student))
        psnrs += [] if identical else [psnr]
        ssims.append(ssim)
        score = "identical" if identical else f"PSNR {psnr:.2f} dB, SSIM {ssim:.3f}"
        labels = [
            ["teacher: full attention", prompt],
            [f"student: CLEAR r={opts.window} f={opts.down_factor}", score],
        ]
        rows.append(grid_image([teacher, student], labels))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    y = 0
    for row in rows:  # one teacher | student pair a row
        sheet.paste(row, (0, y))
        y += row.height
    folder = validation_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    sheet.save(path)
    psnr = sum(psnrs) / len(psnrs) if psnrs else None
    return {
        "psnr": psnr if psnr is None or math.isfinite(psnr) else None,
        "ssim": sum(ssims) / len(ssims),
        "path": str(path),
    }
