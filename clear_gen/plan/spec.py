"""What a run was asked (`GenerateOptions`) and what it will do (`RunSpec`), as frozen values.

`GenerateOptions` holds the arguments as given: the command line's flags, a library call's keywords or a
PNG record's values (`--from`); None means "the recipe's default". `plan.parse` turns it into a
`RunSpec` once, at the entry point (`generate`, `upscale`, `compare`, `--dry-run`): every name checked,
every number in range, the attention, LoRAs and ControlNet resolved, the stages sized, the seeds drawn.
The layers below read the spec's groups and never validate them again. What was asked and what was
decided are different fields: `spec.settings.offload` is the asked offload, the memory plan's `offload`
the decided one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.sizes import TOKEN_PX
from ..errors import ConfigError
from ..weights.spec import WeightsSpec
from .recipe import Recipe


@dataclass(frozen=True)
class GenerateOptions:
    """Everything one `clear-gen` run is asked for. None means: the recipe's default for that stage."""

    prompts: list[str]
    width: int = 1024
    height: int = 1024
    model: str = "dev"  # registry base name, Hub repo id or local diffusers directory
    variant: str | None = None  # registry variant; "none" = stock attention; None: default above 1024 px
    window: int | None = None  # custom CLEAR window (training-free unless clear_weights)
    down_factor: int | None = None
    clear_weights: str | None = None  # a local CLEAR .safetensors
    stages: list[int] | None = None  # long sides; the last is the target; None = recipe
    first_size: str | None = None  # "WxH": the first pass's size as a PNG recorded it (--from); None: recipe
    strength: float = 0.7
    steps: int = 20  # steps of each CLEAR / target stage
    guidance: float | None = None  # target stages: 7.5 for SDEdit, 3.5 for direct text-to-image
    first_steps: int | None = None  # the first pass's; None: the recipe's (20; kontext: 28)
    first_guidance: float | None = None  # None: the recipe's (3.5; kontext: 2.5)
    seeds: list[int] | None = None
    count: int = 1
    max_sequence_length: int | None = None  # None: the model's (512 for dev, 256 for schnell)
    ntk_factor: float | None = None  # None: 10 above 1024 px, else 1
    proportional_attention: bool | None = None  # None: on above 1024 px (off in DyPE's stages)
    dype: bool = False  # DyPE's Dy-YaRN RoPE in the CLEAR stages instead of the NTK factor (core/dype.py)
    keep_stages: bool = False
    out: str | None = None
    device: str = "auto"
    dtype: str | None = None  # bf16 | fp16 | fp32; None: bf16 on CUDA and MPS, fp32 elsewhere
    offload: str = "auto"  # auto | none | model | sequential; auto: from the memory plan (memory.py)
    gpu_memory: float | None = None  # GB the plan may use (default: the GPU's free memory, or 24 without one)
    compare_full: bool = True
    backend: str = "auto"
    token: str | None = None
    quantize: str = "none"  # transformer weights: none | fp8 | fp8dq | int8 | nf4 (quantize.py)
    quantize_text: str = "none"  # T5's weights: none | int8 | fp8 | nf4
    transformer: str | None = None  # a FLUX.1 transformer .gguf (file or owner/repo/file.gguf) for the base's
    loras: list[str] | None = None  # --lora PATH_OR_REPO[:SCALE] each (lora.py)
    lora_files: list[str] | None = None  # --lora-file: the files of the bare owner/repo --loras, in order
    controlnet: str | None = None  # --controlnet: a registry name, Hub repo or local folder (control.py)
    control: str | None = None  # --control: the control picture (upscale: its own picture by default)
    control_mode: str | None = None  # a union ControlNet's mode: a registry name or the mode's number
    control_scale: float | None = None  # None: the registry's recommended scale, else 1
    control_sha256: str | None = None  # --from: the control picture's then (a note when it changed)
    clear_weights_sha256: str | None = None  # --from: the local CLEAR checkpoint's then (a note when changed)
    compile: bool = False  # regional compilation of the transformer blocks (speed.py)
    cache: str = "none"  # step caching: none | fbc[:T] | taylorseer[:N] (speed.py)
    parallel: str = "auto"  # under torchrun: auto | sequence | data (see parallel.py)
    recipe: str = "clear"  # the sampler recipe (recipe.py)
    guide: str | None = None  # none | cosine-decay | constant | cosine-shift (core/guide.py); None: the
    # recipe's (cosine-decay in the CLEAR SDEdit stages of a target above 4096 px or beyond 2:1, else none)
    guide_level: int | None = None  # its Haar low-pass level; None: the recipe's (1)
    vae_tiling: str = "auto"  # auto | exact | fast | off; auto: exact in the stages the recipe tiles
    vae_tile: int | None = None  # px, a tile's side; None: the VAE's sample_size (1024 for FLUX.1)
    edit: str | None = None  # a picture to edit (FLUX.1 Kontext): its tokens join every stage's
    edit_sha256: str | None = None  # --from: the picture's sha256 then (a note when it changed)


@dataclass(frozen=True)
class Stage:
    """One stage of an image, everything about it decided: size, attention, steps, the recipe's knobs."""

    width: int
    height: int
    clear: bool  # CLEAR attention (else the original model with full attention)
    steps: int
    guidance: float
    sdedit: bool  # img2img from the previous stage's image
    strength: float = 1.0  # SDEdit: the part of the schedule that runs
    ntk_factor: float = 1.0  # RoPE theta multiplier in this stage (CLEAR stages)
    proportional: bool = False  # proportional attention in this stage (CLEAR stages)
    vae_tiling: str = "off"  # how the VAE encodes and decodes this stage: off | exact | fast (VAE_TILINGS)
    vae_tile: int = 1024  # px: the side of a tile (exact: of its core)
    controlnet_clear: bool = False  # a ControlNet's blocks get CLEAR too (training-free, f = 1)
    guide: str = "none"  # projected-flow guidance towards the stage's start picture (CLEAR SDEdit stages)
    guide_level: int = 1  # its Haar low-pass level
    reference: tuple[int, int] | None = None  # px (width, height) of an edit's reference tokens
    dype: bool = False  # DyPE's RoPE at each step (CLEAR stages; ntk_factor is then 1)

    @property
    def tokens(self) -> int:
        """Image tokens the transformer runs in this stage: (height / 16) x (width / 16), and an edit's
        reference tokens."""
        ref = (self.reference[0] // TOKEN_PX) * (self.reference[1] // TOKEN_PX) if self.reference else 0
        return (self.height // TOKEN_PX) * (self.width // TOKEN_PX) + ref

    @property
    def long_side(self) -> int:
        return max(self.width, self.height)

    @property
    def vae_tiles(self) -> str:
        """The VAE tiling that runs: off when the picture fits in one tile (either tiling runs it whole)."""
        return "off" if self.long_side <= self.vae_tile else self.vae_tiling

    @property
    def denoising_steps(self) -> int:
        """Steps that run: img2img skips the first (1 - strength) of the schedule, as diffusers does."""
        return self.steps - int(max(self.steps - min(self.steps * self.strength, self.steps), 0))


@dataclass(frozen=True)
class CacheChoice:
    """A parsed --cache: none, fbc with its threshold, or taylorseer with its interval."""

    kind: str = "none"
    value: float | None = None  # fbc: threshold; taylorseer: steps between full steps

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        return f"{self.kind}:{self.value:g}"


@dataclass(frozen=True)
class Settings:
    """How and where a run computes: device, dtype, memory, processes and speed options (as asked)."""

    device: str = "auto"
    dtype: str | None = None  # None: bf16 on CUDA and MPS, fp32 elsewhere
    offload: str = "auto"  # asked; the memory plan decides auto
    gpu_memory: float | None = None  # GB the plan may use
    parallel: str = "auto"  # under torchrun: auto | sequence | data (asked; World decides auto)
    compile: bool = False
    cache: CacheChoice = CacheChoice()
    backend: str = "auto"  # CLEAR's attention kernel (attention.BACKENDS), chosen per device when auto
    compare_full: bool = True  # time full attention at each CLEAR size
    vae_tiling: str = "auto"  # asked; each Stage holds what it decided
    vae_tile: int = 1024  # px: the asked tile side, else the VAE's sample_size


@dataclass(frozen=True)
class OutputSpec:
    """Where images go."""

    out: str | None = None  # a folder or a .png path; None: the current folder
    keep_stages: bool = False  # also save each earlier stage's image


@dataclass(frozen=True)
class EditSpec:
    """The picture an edit changes (FLUX.1 Kontext), and the size of its reference tokens."""

    source: Any  # files.source.Source: the picture (PIL, RGB), its path and sha256
    reference: tuple[int, int]  # px (width, height): the model's size for it (its reference_size)

    def record(self) -> dict[str, Any]:
        """What a PNG records of it (`extra.edit_source`), so that `--from` edits it again."""
        src = self.source
        path = os.path.abspath(src.path)
        return {"file": path, "sha256": src.sha256, "width": src.size[0], "height": src.size[1]}


@dataclass(frozen=True)
class RunSpec:
    """One run, parsed and checked (plan.parse): what every layer below the entry points reads."""

    asked: GenerateOptions  # as given: what a PNG records, so that `--from` asks the same again
    prompts: tuple[str, ...]  # stripped, non-empty (upscale: () or one)
    seeds: tuple[int, ...]  # every image's seed, random ones drawn once
    recipe: Recipe
    attention: ClearChoice  # the CLEAR stages' attention at this run's size
    weights: WeightsSpec
    settings: Settings
    output: OutputSpec
    text_len: int  # T5 tokens of every prompt
    stages: tuple[Stage, ...] = ()  # generate's; an upscale's are per picture (its jobs')
    edit: EditSpec | None = None  # an edit's picture (FLUX.1 Kontext)

    @property
    def width(self) -> int:
        return self.asked.width

    @property
    def height(self) -> int:
        return self.asked.height


CACHES = ("none", "fbc", "taylorseer")


VAE_TILINGS = ("auto", "exact", "fast", "off")  # --vae-tiling


FBC_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default


TAYLORSEER_INTERVAL = 5  # diffusers' TaylorSeerCacheConfig default: one full step in 5


def parse_cache(spec: str | None) -> CacheChoice:
    """'none', 'fbc', 'fbc:0.1', 'taylorseer' or 'taylorseer:4' into a CacheChoice."""
    kind, _, value = (spec or "none").strip().lower().partition(":")
    if kind not in CACHES:
        raise ConfigError(f"unknown --cache {spec!r}; choose none, fbc[:THRESHOLD] or taylorseer[:INTERVAL]")
    if kind == "none":
        if value:
            raise ConfigError(f"--cache none takes no value, got {spec!r}")
        return CacheChoice()
    default = FBC_THRESHOLD if kind == "fbc" else TAYLORSEER_INTERVAL
    try:
        number = float(value) if value else float(default)
    except ValueError:
        raise ConfigError(f"--cache {spec!r}: {value!r} is not a number") from None
    if kind == "fbc" and not number > 0:
        raise ConfigError(f"--cache fbc:T needs a threshold T > 0 (e.g. fbc:{FBC_THRESHOLD}), got {spec!r}")
    if kind == "taylorseer" and not (number >= 1 and number.is_integer()):
        raise ConfigError(f"--cache taylorseer:N needs a whole number of steps N >= 1, got {spec!r}")
    return CacheChoice(kind, number)


@dataclass(frozen=True)
class ClearChoice:
    """Which attention the CLEAR stages use, and where its weights come from."""

    label: str  # variant name, "custom" or "none"
    window: int | None  # None: stock attention
    down_factor: int = 1
    weights: Path | None = None
    note: str | None = None  # why this choice, when the user did not make it
    chosen: bool = True  # False: the registry's default variant (full attention at or below 1024 px)
    sha256: str | None = None  # a local checkpoint's (what the PNG records)

    @property
    def hub_variant(self) -> str | None:
        """The registry variant whose checkpoint comes from the Hugging Face cache; None: no checkpoint or
        a local file."""
        return None if self.weights is not None or self.label in ("custom", "none") else self.label

    def geometry(
        self,
        width: int,
        height: int,
        text_len: int,
        down_factor: int | None = None,
        reference: tuple[int, int] | None = None,
    ):
        """CLEAR's geometry.Geometry for a width x height px image (16 px a token) and this window; with
        `down_factor`, that one instead of the choice's (a ControlNet's training-free CLEAR: 1); with
        `reference`, (width, height) px of an edit's reference tokens after the image's."""
        from ..core.geometry import image_geometry

        f = self.down_factor if down_factor is None else down_factor
        ref = (reference[1] // TOKEN_PX, reference[0] // TOKEN_PX) if reference else None
        return image_geometry(text_len, height // TOKEN_PX, width // TOKEN_PX, self.window, f, ref)

    @property
    def attention_label(self) -> str:
        """'CLEAR r=8 f=4' (or 'full'): how tables and plans name it."""
        if self.window is None:
            return "full"
        return f"CLEAR r={self.window}" + (f" f={self.down_factor}" if self.down_factor > 1 else "")
