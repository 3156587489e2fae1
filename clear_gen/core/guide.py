"""Projected-flow guidance (I-Max, arXiv 2410.07536) as pure functions of latents on their grid.

An SDEdit stage starts from a clean guide latent x_g (the previous picture, upscaled and encoded). At step
i of an n-step schedule, noise level sigma, the model's velocity v at x_t is corrected before the
scheduler's step towards the projected velocity v_p = (x_t - x_g) / sigma, the one that lands on x_g,
in the low frequencies only (LP: a level-L Haar low-pass, the 2^L x 2^L block mean):
- `cosine-decay`: v + c_i (LP(v_p) - LP(v)), c_i = (1 + cos(pi i / n)) / 2;
- `constant`: v + LP(v_p) - LP(v);
- `cosine-shift`: v + c_i (v_p - v) + (1 - c_i) (LP(v_p) - LP(v)).
With x0 = x_t - sigma v (the clean image a step predicts), cosine-decay gives
LP(x0') = c_i LP(x_g) + (1 - c_i) LP(x0): the low frequencies of the prediction drawn towards the guide's,
less at every step; the high frequencies are the model's. No transformer evaluation.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

GUIDES = ("none", "cosine-decay", "constant", "cosine-shift")
EPS = 1e-6  # keeps v_p finite at sigma = 0 (a schedule's end)


def lowpass(x: Tensor, level: int) -> Tensor:
    """The level-`level` Haar low-pass of (B, C, h, w) latents: each 2^L x 2^L block's mean over it.
    h and w must be multiples of 2^L."""
    b, c, h, w = x.shape
    k = 2**level
    mean = F.avg_pool2d(x, k)  # (B, C, h/k, w/k)
    blocks = mean[:, :, :, None, :, None].expand(b, c, h // k, k, w // k, k)  # (B, C, h/k, k, w/k, k)
    return blocks.reshape(b, c, h, w)


def weight(kind: str, i: int, n: int) -> float:
    """c_i of step i (from 0) of an n-step schedule: (1 + cos(pi i / n)) / 2, or 1 for `constant`."""
    return 1.0 if kind == "constant" else (1 + math.cos(math.pi * i / n)) / 2


def guided_velocity(
    kind: str, v: Tensor, x_t: Tensor, x_g: Tensor, sigma: float, c: float, level: int
) -> Tensor:
    """The velocity `kind` makes of v at x_t with weight c (`constant` takes none): module docstring. All
    (B, C, h, w) on the latent grid."""
    v_p = (x_t - x_g) / (sigma + EPS)
    low = lowpass(v_p - v, level)  # LP(v_p) - LP(v): the low-pass is linear
    if kind == "cosine-shift":
        return v + c * (v_p - v) + (1 - c) * low
    if kind == "constant":
        return v + low
    assert kind == "cosine-decay", kind
    return v + c * low
