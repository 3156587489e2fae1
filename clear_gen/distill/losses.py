"""The distillation objective (CLEAR's recipe): noisy latents, the teacher's and student's predictions and
attention outputs, and L = w_fm L_fm + w_pred L_pred + w_attn L_attn, each a plain MSE:

    L_fm   = |v_student - (eps - x0)|^2        flow matching against the data
    L_pred = |v_student - v_teacher|^2         the teacher's velocity
    L_attn = mean over single blocks 1, 5, 9, ... of |A_student - A_teacher|^2

A is a single block's attention output (all tokens, text included, before any output projection). The
student's image tokens are tile-ordered inside the transformer (attention.py); its A is put back in
row-major order, the teacher's, before they are compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import models
from ..core.positions import Grid
from .data import Batch

DEFAULT_WEIGHTS = (1.0, 0.5, 0.5)  # fm, pred, attn
ATTENTION_EVERY = 4  # single blocks 1, 5, 9, ...: 10 of FLUX.1's 38


def attention_layers(single_blocks: int) -> list[int]:
    """Single blocks 1, 5, 9, ... that exist; the last one of a model that has fewer than two."""
    layers = list(range(1, single_blocks, ATTENTION_EVERY))
    return layers or [single_blocks - 1]


def sigmas(u: Tensor) -> Tensor:
    """The recipe's timesteps from u ~ U[0, 1): index floor(1000 u), sigma = (1000 - index) / 1000,
    so sigma is uniform on {0.001, ..., 1}, no shift."""
    index = torch.floor(u * 1000).clamp(max=999)
    return (1000 - index) / 1000


@dataclass
class Noised:
    """One micro-batch ready for the transformer."""

    inputs: dict  # the transformer's keyword arguments
    target: Tensor  # (B, N, C): eps - x0, the flow-matching velocity


def noised(family, batch: Batch, vae, guidance: float | None, generators: list[torch.Generator]) -> Noised:
    """x0 drawn from the cached posterior, brought into the transformer's latent space as the model
    family's pipeline does (FLUX.1: the VAE config's shift and scale), then x_t = (1 - s) x0 + s eps.

    One generator per sample draws its posterior noise, eps and sigma: a sample gets the same draws
    whichever batch or process it lands in.
    """
    b, _, h, w = batch.mean.shape
    device, dtype = batch.mean.device, batch.mean.dtype
    shape = batch.mean.shape[1:]  # (C, h, w)
    draws = [
        (torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(1, generator=g))
        for g in generators
    ]
    posterior, noise, u = (torch.stack(d).to(device, torch.float32) for d in zip(*draws, strict=True))
    x0 = batch.mean.float() + batch.std.float() * posterior  # (B, C, h, w)
    x0 = family.model_latents(vae, x0)  # (B, N, 4C)
    eps = family.pack_latents(noise)
    sigma = sigmas(u.view(b))  # (B,)
    x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * eps
    strength = None if guidance is None else torch.full((b,), guidance, device=device, dtype=dtype)
    inputs = family.forward_inputs(
        x_t.to(dtype), batch.embeds, sigma.to(dtype), Grid(h // 2, w // 2), strength
    )
    return Noised(inputs | {"return_dict": False}, eps - x0)


@contextmanager
def captured_attention(transformer, layers: list[int], tiled: bool) -> Iterator[dict[int, Tensor]]:
    """{layer: attention output (B, T + N, C), row-major} of the given single blocks, for one forward.
    tiled: the transformer runs CLEAR (its image tokens are tile-ordered inside), not the stock model.

    The hooks only keep the outputs (an operation inside a gradient-checkpointed block would be one
    more saved tensor than its recomputation makes); the student's are put in row-major order when the
    block exits, outside the checkpointed blocks, and the hooks are gone by the backward pass.
    """
    captured: dict[int, Tensor] = {}
    family = models.of(transformer)
    blocks = family.single_blocks(transformer)
    handles = [family.attention_output(blocks[i], partial(captured.__setitem__, i)) for i in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
    if tiled:
        captured.update({k: _row_major(transformer, v) for k, v in captured.items()})


def _row_major(transformer, output: Tensor) -> Tensor:
    """A CLEAR single block's attention output with its image tokens back in row-major order."""
    layout = transformer._clear_state.layout  # the latest forward's
    text = layout.geometry.text_len
    return torch.cat([output[:, :text], output[:, text:][:, layout.inv]], dim=1)  # (B, T + N, C)


def mse(a: Tensor, b: Tensor) -> Tensor:
    return F.mse_loss(a.float(), b.float())


def distill_loss(
    v_student: Tensor,
    v_teacher: Tensor,
    target: Tensor,
    a_student: dict[int, Tensor],
    a_teacher: dict[int, Tensor],
    weights: tuple[float, float, float],
) -> dict[str, Tensor]:
    """{"loss", "loss_fm", "loss_pred", "loss_attn"}: float32 scalars. Every term stays in the graph, even
    with weight 0, so that every trainable parameter gets a gradient (DDP expects one)."""
    assert a_student.keys() == a_teacher.keys() and a_student, (a_student.keys(), a_teacher.keys())
    fm = mse(v_student, target)
    pred = mse(v_student, v_teacher)
    attn = torch.stack([mse(a_student[i], a_teacher[i]) for i in sorted(a_student)]).mean()
    w_fm, w_pred, w_attn = weights
    loss = w_fm * fm + w_pred * pred + w_attn * attn
    return {"loss": loss, "loss_fm": fm, "loss_pred": pred, "loss_attn": attn}
