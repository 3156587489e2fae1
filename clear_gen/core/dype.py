"""DyPE's Dy-YaRN (arXiv 2510.20766, its method section; the authors' MIT code, guyyariv/DyPE): RoPE
frequencies of one image axis that change with the denoising step, as pure functions.

An axis of D dims rotates its pair i (0 <= i < D/2) at w_i = theta^(-2i/D). At a grid side of n tokens
against the model's training side N (FLUX.1: 64 tokens, 1024 px), s = n / N; at s <= 1 nothing changes.
Above, YaRN's "NTK-by-parts" (arXiv 2309.00071, section 3) blends per pair, by the turns r_i = N w_i / 2 pi
the pair makes over the training side: the index of the pair making r turns is
idx(r) = D ln(N / (2 pi r)) / (2 ln theta), and a ramp between the bounds (a, b) (a > b turns) weighs
1 at pairs i <= floor(idx(a)) (more than a turns), 0 at i >= ceil(idx(b)), linear in i between.
As the authors' code does, two ramps:
1. w' = w / s (position interpolation) blended with w'' = (theta s^(D/(D-2)))^(-2i/D) (NTK-aware)
   by the ramp of (1.25, 0.75) turns: pairs of more than 1.25 turns take the NTK-aware frequency;
2. that blended with the original w_i by the ramp of (16, 2) turns: pairs of more than 16 turns keep
   their own frequency (extrapolation).
DyPE multiplies every bound by kappa(t) = t^2, t the step's (shifted) sigma: at t = 1 this is the static
YaRN above; as t -> 0 the bounds go to 0 turns, every pair keeps w_i, and the axis extrapolates plainly.
(The bounds' indices are clamped to [0, D/2], so t -> 0 is exactly the original frequencies; the authors'
code clamps only the upper one and flips to interpolation below t ~ 0.03, which FLUX's shifted schedules
never reach.) YaRN's attention temperature rides on cos and sin: mscale = 1 + 0.1 ln s (1 at s <= 1), so
q.k over the axis' dims grows by mscale^2; it does not depend on t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BASE_SIDE = 64  # tokens a side FLUX.1 was trained at: 1024 px / 16 px a token
INTERPOLATION_TURNS = (1.25, 0.75)  # ramp 1: position interpolation below, NTK-aware above
EXTRAPOLATION_TURNS = (16.0, 2.0)  # ramp 2: the blend of ramp 1 below, the original frequency above


def kappa(t: float) -> float:
    """DyPE's schedule of the ramps' bounds: t^2 (t = 1 pure noise, 0 clean)."""
    return t * t


def mscale(side: int, base: int = BASE_SIDE) -> float:
    """YaRN's factor on an axis' cos and sin: 1 + 0.1 ln s, s = side / base; 1 at s <= 1."""
    s = side / base
    return 1.0 + 0.1 * math.log(s) if s > 1 else 1.0


def ramp(dim: int, theta: float, base: int, turns: tuple[float, float]) -> Tensor:
    """(dim/2,) float64: 1 at the pairs that make more than turns[0] turns over `base` positions, 0 at
    those making fewer than turns[1], linear in the pair's index between (module docstring)."""
    half = dim // 2

    def index(r: float) -> float:  # the (fractional) pair that makes r turns; 0 turns: past the last
        return math.inf if r <= 0 else dim * math.log(base / (2 * math.pi * r)) / (2 * math.log(theta))

    lo = math.floor(min(max(index(turns[0]), 0), half))  # clamped to [0, D/2] (module docstring)
    hi = math.ceil(min(max(index(turns[1]), 0), half))
    i = torch.arange(half, dtype=torch.float64)
    if hi <= lo:
        return (i <= lo).double()
    return ((hi - i) / (hi - lo)).clamp(0, 1)


def axis_frequencies(dim: int, theta: float, side: int, t: float, base: int = BASE_SIDE) -> Tensor:
    """(dim/2,) float64: Dy-YaRN's frequencies of one axis of `dim` dims at a grid side of `side`
    tokens, step t (module docstring); the original theta^(-2i/dim) at side <= base."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # 2i / D
    original = theta**-exponent
    s = side / base
    if s <= 1:
        return original
    interpolated = original / s
    ntk = (theta * s ** (dim / (dim - 2))) ** -exponent
    k = kappa(t)
    inner = ramp(dim, theta, base, (INTERPOLATION_TURNS[0] * k, INTERPOLATION_TURNS[1] * k))
    blend = interpolated * (1 - inner) + ntk * inner
    outer = ramp(dim, theta, base, (EXTRAPOLATION_TURNS[0] * k, EXTRAPOLATION_TURNS[1] * k))
    return blend * (1 - outer) + original * outer


def rotary(
    ids: Tensor,
    axes_dim: tuple[int, ...],
    theta: float,
    sides: dict[int, int],
    t: float,
    base: int = BASE_SIDE,
) -> tuple[Tensor, Tensor]:
    """cos and sin (S, sum(axes_dim)) float32 of positions `ids` (S, axes), as diffusers' FluxPosEmbed lays
    them out (each pair's value twice), with Dy-YaRN on the axes `sides` names (axis -> grid side) and
    their mscale on every row; the other axes are the original RoPE."""
    wide = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64  # as diffusers: no fp64
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        side = sides.get(axis, 0)
        freqs = axis_frequencies(dim, theta, side, t, base).to(ids.device, wide)
        angles = torch.outer(ids[:, axis].to(wide), freqs)  # (S, dim/2)
        m = mscale(side, base) if side else 1.0
        cos_parts.append((angles.cos() * m).repeat_interleave(2, dim=1))  # (S, dim)
        sin_parts.append((angles.sin() * m).repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=-1).float(), torch.cat(sin_parts, dim=-1).float()
