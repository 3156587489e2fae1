"""A reference picture's tokens beside the image's (FLUX.1 Kontext: [text ; image ; reference]) and CLEAR's
pattern over them, in exact integer arithmetic. geometry.py holds the sequence and dispatches here when a
geometry has a reference; this module imports nothing of ours.

The reference is the image's frame at another size: h_r x w_r tokens against the image's h x w. Its token
(y', x') sits at ((y' + 1/2) h / h_r - 1/2, (x' + 1/2) w / w_r - 1/2) on the image's grid: token centres
mapped onto each other, each axis scaled on its own. The pattern (README, "Editing: FLUX.1 Kontext"):
- image query at (y, x): every text key; the image keys with dy^2 + dx^2 < r^2, as without a reference;
  the reference keys whose place on the image grid is as close (the same circle); every pooled key;
- reference query at (y', x'): every text key; the reference keys within r on the reference's own grid
  (CLEAR as on a picture of the reference's size); every pooled key; no image key;
- text query: every text, image and reference key; no pooled key;
- pooled keys: one per f x f cell of each grid, the image's then the reference's.

Positions are written in "fine" units: image row y at (2y + 1) b_y, reference row y' at (2y' + 1) a_y,
where h / h_r = a_y / b_y in lowest terms (columns alike with a_x, b_x). A difference D_y (fine units) is
D_y / (2 b_y) image rows, or D_y / (2 a_y) reference rows, so the two circles are, exactly:
    image side:     D_y^2 b_x^2 + D_x^2 b_y^2 < 4 r^2 b_y^2 b_x^2
    reference side: D_y^2 a_x^2 + D_x^2 a_y^2 < 4 r^2 a_y^2 a_x^2
in int64 (Frame.fits says when a pair of grids keeps every such number below 2^62).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LIMIT = 1 << 62  # what every fine-unit product must stay below (int64)


@dataclass(frozen=True)
class Frame:
    """How the reference's grid maps onto the image's: h / h_r = a_y / b_y and w / w_r = a_x / b_x, in
    lowest terms."""

    a_y: int
    b_y: int
    a_x: int
    b_x: int

    @classmethod
    def of(cls, height: int, width: int, ref_height: int, ref_width: int) -> Frame:
        gy, gx = math.gcd(height, ref_height), math.gcd(width, ref_width)
        return cls(height // gy, ref_height // gy, width // gx, ref_width // gx)

    def image_side(self, r: int) -> tuple[int, int, int]:
        """(c_y, c_x, bound): D_y^2 c_y + D_x^2 c_x < bound is within r image tokens."""
        return self.b_x**2, self.b_y**2, 4 * r * r * self.b_y**2 * self.b_x**2

    def reference_side(self, r: int) -> tuple[int, int, int]:
        """(c_y, c_x, bound): D_y^2 c_y + D_x^2 c_x < bound is within r reference tokens."""
        return self.a_x**2, self.a_y**2, 4 * r * r * self.a_y**2 * self.a_x**2

    def reach(self, r: int, reference: bool) -> tuple[int, int]:
        """(R_y, R_x): |D_y| < R_y and |D_x| < R_x for every pair within r (image or reference side)."""
        return (2 * r * self.a_y, 2 * r * self.a_x) if reference else (2 * r * self.b_y, 2 * r * self.b_x)

    def fits(self, height: int, width: int, ref_height: int, ref_width: int, r: int) -> bool:
        """Every fine-unit number the pattern computes stays below LIMIT (int64) for these grids and r."""
        span_y = 2 * max(height * self.b_y, ref_height * self.a_y)  # the largest |D_y|
        span_x = 2 * max(width * self.b_x, ref_width * self.a_x)
        sides = (self.image_side(r), self.reference_side(r))
        return all(span_y**2 * cy + span_x**2 * cx < LIMIT and bound < LIMIT for cy, cx, bound in sides)


def fine(rows: Tensor, cols: Tensor, unit_y: int, unit_x: int) -> tuple[Tensor, Tensor]:
    """Grid rows and columns in fine units: (2y + 1) unit_y, (2x + 1) unit_x (b for the image's grid, a for
    the reference's), int64."""
    return (2 * rows.long() + 1) * unit_y, (2 * cols.long() + 1) * unit_x


def grid_rows(low: Tensor, high: Tensor, unit: int) -> tuple[Tensor, Tensor]:
    """(first, last) rows (or columns) of a grid of this fine unit that may lie strictly between `low` and
    `high` (fine units); a superset, unclamped: (2y + 1) unit > low and (2y + 1) unit < high."""
    first = torch.div(torch.div(low, unit, rounding_mode="floor") - 1, 2, rounding_mode="floor")
    last = torch.div(torch.div(high, unit, rounding_mode="floor"), 2, rounding_mode="floor")
    return first, last


def mask_mod(ys: Tensor, xs: Tensor, text_len: int, image_end: int, q_len: int, frame: Frame, r: int):
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) of CLEAR over [text ; image ; reference ; pooled], every
    position's fine coordinates in ys, xs (int64; text and pooled entries unused)."""
    (iy, ix, image_bound), (ry, rx, ref_bound) = frame.image_side(r), frame.reference_side(r)

    def clear_reference_mask(b, h, q_idx, kv_idx):
        dy = ys[q_idx] - ys[kv_idx]
        dx = xs[q_idx] - xs[kv_idx]
        dy2, dx2 = dy * dy, dx * dx
        kv_text, kv_down = kv_idx < text_len, kv_idx >= q_len
        kv_image = ~kv_text & ~kv_down  # the image's or the reference's
        kv_ref = kv_image & (kv_idx >= image_end)
        image_row = kv_text | kv_down | (kv_image & (dy2 * iy + dx2 * ix < image_bound))
        ref_row = kv_text | kv_down | (kv_ref & (dy2 * ry + dx2 * rx < ref_bound))
        return torch.where(q_idx < text_len, ~kv_down, torch.where(q_idx < image_end, image_row, ref_row))

    return clear_reference_mask


def image_reference_pairs(height: int, width: int, ref_height: int, ref_width: int, r: int) -> int:
    """Exact count of (image query, reference key) pairs within the circle, without a mask.

    For each reference row y', only the image rows near its place can pair (2r + 3 of them at most); for
    each (y', y, x') the image columns x that pair are one interval, found with an integer square root.
    Reference rows go in chunks of about 4M (y', y, x') triples.
    """
    frame = Frame.of(height, width, ref_height, ref_width)
    near = min(2 * r + 3, height)
    chunk = max(1, (1 << 22) // (near * ref_width))
    return sum(
        _pairs(frame, torch.arange(y0, min(y0 + chunk, ref_height)), height, width, ref_width, r)
        for y0 in range(0, ref_height, chunk)
    )


def _pairs(frame: Frame, ref_rows: Tensor, height: int, width: int, ref_width: int, r: int) -> int:
    """image_reference_pairs of these reference rows."""
    cy, cx, bound = frame.image_side(r)
    fy_ref = (2 * ref_rows + 1) * frame.a_y  # (n,) fine units
    if 2 * r + 3 >= height:
        rows = torch.arange(height).expand(len(ref_rows), -1)  # (n, h): every image row
    else:
        centre = torch.div(fy_ref, 2 * frame.b_y, rounding_mode="floor")  # the image row holding it
        rows = centre.view(-1, 1) + torch.arange(-r - 1, r + 2).view(1, -1)  # (n, 2r + 3): rows within r + 1
    real = (rows >= 0) & (rows < height)
    left = bound - ((2 * rows + 1) * frame.b_y - fy_ref.view(-1, 1)) ** 2 * cy  # room for D_x^2 c_x
    half = _isqrt(torch.div(left - 1, cx, rounding_mode="floor").clamp(min=0))  # largest |D_x|
    c = ((2 * torch.arange(ref_width) + 1) * frame.a_x).view(1, 1, -1)  # (1, 1, w_r) fine units
    m = half.unsqueeze(-1)  # (n, rows, 1)
    # the image columns x with (2x + 1) b_x in [c - m, c + m]: 2x + 1 from ceil((c - m) / b_x) to
    # floor((c + m) / b_x)
    first = torch.div(-torch.div(m - c, frame.b_x, rounding_mode="floor"), 2, rounding_mode="floor")
    last = torch.div(torch.div(c + m, frame.b_x, rounding_mode="floor") - 1, 2, rounding_mode="floor")
    count = (last.clamp(max=width - 1) - first.clamp(min=0) + 1).clamp(min=0)  # (n, rows, w_r)
    return int((count * (real & (left > 0)).unsqueeze(-1)).sum())


def _isqrt(n: Tensor) -> Tensor:
    """floor(sqrt(n)) of non-negative int64 values, exactly (float64's root, then corrected)."""
    root = torch.sqrt(n.double()).long()
    root = torch.where(root * root > n, root - 1, root)
    return torch.where((root + 1) * (root + 1) <= n, root + 1, root)
