"""Image sizes in pixels: the range every side must be in, the multiple it must be of (a whole token grid
that a down factor divides), and the one rule for rounding a size to that multiple."""

from __future__ import annotations

import math

from ..errors import ConfigError

MIN_SIDE, MAX_SIDE = 64, 16384  # px: every stage's sides
TOKEN_PX = 16  # FLUX.1's pixels per token side (models.flux1.TOKEN_PX): what sizes are multiples of


def size_multiple(down_factor: int) -> int:
    """Pixels each side must be a multiple of: 16 per token, and a token grid divisible by the down factor
    (64 px for the published -down4 variants)."""
    return TOKEN_PX * math.lcm(4, down_factor) if down_factor > 1 else TOKEN_PX


def check_size(width: int, height: int, multiple: int, square_flag: str = "--res") -> None:
    """Sides in range and multiples of 16 (64 for down-sampled variants); else propose the nearest:
    `square_flag` (the option that sets both sides) for a square size."""
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ConfigError(
                f"size {width}x{height} is out of range: each side must be {MIN_SIDE}-{MAX_SIDE} px"
            )
    if width % multiple or height % multiple:
        w, h = (max(multiple, int(s / multiple + 0.5) * multiple) for s in (width, height))
        hint = f"{square_flag} {w}" if w == h else f"--width {w} --height {h}"
        raise ConfigError(f"size {width}x{height} is not a multiple of {multiple}; try {hint}")


def round_size(width: float, height: float, multiple: int) -> tuple[int, int]:
    """Each side rounded to the nearest multiple (at least one multiple): the one rounding rule for stage
    sizes, upscale targets and the largest size that fits."""
    return tuple(max(multiple, round(s / multiple) * multiple) for s in (width, height))


def scaled_size(width: int, height: int, long_side: int, multiple: int) -> tuple[int, int]:
    """width x height scaled to this long side, aspect kept, rounded with `round_size`."""
    scale = long_side / max(width, height)
    return round_size(width * scale, height * scale, multiple)
