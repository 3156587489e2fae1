"""Sampler recipes: how an image's stages are sized and run, as a registry of named recipes.

A recipe says everything about the sampling that is not the model or the attention: the first pass (its
side, steps and guidance), each further stage's img2img (steps, guidance, strength, sigmas, static shift),
the RoPE and softmax-scale changes above the first pass's side, when the VAE tiles, how stage sizes
round, and which targets' SDEdit stages get projected-flow guidance (core/guide.py). `clear` is CLEAR's
reference high-resolution recipe (CLEAR_FACTS.md): a 1024 px first pass with the original model and full
attention, then SDEdit stages with CLEAR (guided above 4096 px or beyond 2:1). `kontext` is the same with
FLUX.1 Kontext's own sampling numbers, for `clear-gen edit` (README, "Editing: FLUX.1 Kontext"). A new
recipe is one more entry.

The first pass keeps the target's aspect: a long side of `first_pass_side`, a short side of at least
`first_pass_short` (beyond 4:1 in `clear` the long side grows instead: 8192x1024 -> 2048x256), each side
rounded to 16 px (it runs full attention with the original weights: a down factor's 64 px would stretch
it, 320x1024 for 1:3 instead of 336x1024). A target no larger than its own first pass is one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.sizes import TOKEN_PX, round_size
from ..errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """One named sampler recipe; every number a run does not override comes from here."""

    name: str
    description: str
    first_pass_side: int  # long side of the full-attention first pass; at or below it, one pass alone
    first_pass_short: int  # px: its short side at least this (the long side grows); at or below it, one pass
    first_steps: int  # the first pass's steps
    first_guidance: float
    steps: int  # each further (SDEdit) stage's steps, and a direct pass's
    sdedit_guidance: float  # guidance of the SDEdit stages
    direct_guidance: float  # guidance of a one-stage text-to-image run at the target
    strength: float  # SDEdit: the part of the schedule that runs
    high_res_ntk: float  # RoPE NTK factor above first_pass_side (1 at or below)
    proportional_above: bool  # proportional attention above first_pass_side
    vae_tiling_above: int  # px: larger stages encode and decode in tiles
    controlnet_clear_above: int  # px: a ControlNet's blocks get training-free CLEAR in larger CLEAR stages
    static_shift: bool  # img2img stages without dynamic shifting (the scheduler's fixed shift)
    guide: str  # projected-flow guidance of the CLEAR SDEdit stages of the targets `guides` picks
    guide_level: int  # its Haar low-pass level L: 2^L x 2^L latent cells
    guide_above: int  # px: a target with a longer side gets `guide`
    guide_ratio: float  # and one whose long side is more than this many times its short side

    def high_res(self, width: int, height: int) -> bool:
        """Larger than its own first pass (long side above first_pass_side, short side above
        first_pass_short): NTK scaling and proportional attention apply, CLEAR pays, stages follow."""
        return max(width, height) > self.first_pass_side and min(width, height) > self.first_pass_short

    def first_pass_size(self, width: int, height: int) -> tuple[int, int]:
        """The first pass of a high_res target: its aspect, scaled to a long side of first_pass_side or up
        to a short side of first_pass_short, whichever is larger, sides rounded to 16 px (module docs)."""
        scale = max(self.first_pass_side / max(width, height), self.first_pass_short / min(width, height))
        return round_size(width * scale, height * scale, TOKEN_PX)

    def vae_tiles(self, width: int, height: int) -> bool:
        return max(width, height) > self.vae_tiling_above

    def guides(self, width: int, height: int) -> bool:
        """A target of this size gets `guide` unless --guide says otherwise (README: why these sizes)."""
        long, short = max(width, height), min(width, height)
        return long > self.guide_above or long > self.guide_ratio * short

    def vae_tiling(self, asked: str, width: int, height: int) -> str:
        """How a stage's VAE runs: the asked exact, fast or off; auto: exact where the recipe tiles."""
        if asked != "auto":
            return asked
        return "exact" if self.vae_tiles(width, height) else "off"

    def sigmas(self, steps: int) -> list[float]:
        """An SDEdit stage's sigmas before the scheduler's shift: linspace(1, 1/steps, steps)."""
        import numpy as np

        return np.linspace(1.0, 1.0 / steps, steps).tolist()

    def long_sides(self, width: int, height: int) -> list[int]:
        """The stages' long sides when none are given: the first pass, then the target (or the target)."""
        long_side = max(width, height)
        if not self.high_res(width, height):
            return [long_side]
        return [max(self.first_pass_size(width, height)), long_side]


RECIPES: dict[str, Recipe] = {
    "clear": Recipe(
        name="clear",
        description="CLEAR's reference: a 1024 px first pass with full attention, then SDEdit with CLEAR",
        first_pass_side=1024,
        first_pass_short=256,  # 16 tokens: 4:1 keeps the reference's 1024 px long side (1024x256)
        first_steps=20,
        first_guidance=3.5,
        steps=20,
        sdedit_guidance=7.5,
        direct_guidance=3.5,
        strength=0.7,
        high_res_ntk=10.0,
        proportional_above=True,
        vae_tiling_above=2048,
        controlnet_clear_above=1024,
        static_shift=True,
        guide="cosine-decay",
        guide_level=1,
        guide_above=4096,
        guide_ratio=2.0,
    ),
}
RECIPES["kontext"] = replace(
    RECIPES["clear"],
    name="kontext",
    description="FLUX.1 Kontext's edit: its sampling (28 steps, guidance 2.5) for a 1024 px first pass with "
    "the reference, then CLEAR's SDEdit stages with the reference (guidance 2.5: Kontext's, not tuned)",
    first_steps=28,  # diffusers' FluxKontextPipeline and BFL's examples: 28 steps, guidance 2.5
    first_guidance=2.5,
    sdedit_guidance=2.5,
    direct_guidance=2.5,
)
DEFAULT_RECIPE = "clear"


def recipe(name: str = DEFAULT_RECIPE) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name]
