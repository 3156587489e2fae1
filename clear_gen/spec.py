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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    strength: float = 0.7
    steps: int = 20  # steps of each CLEAR / target stage
    guidance: float | None = None  # target stages: 7.5 for SDEdit, 3.5 for direct text-to-image
    first_steps: int = 20
    first_guidance: float = 3.5
    seeds: list[int] | None = None
    count: int = 1
    max_sequence_length: int | None = None  # None: the model's (512 for dev, 256 for schnell)
    ntk_factor: float | None = None  # None: 10 above 1024 px, else 1
    proportional_attention: bool | None = None  # None: on above 1024 px
    keep_stages: bool = False
    out: str | None = None
    device: str = "auto"
    dtype: str | None = None  # bf16 | fp16 | fp32; None: bf16 on CUDA, fp32 elsewhere
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
    compile: bool = False  # regional compilation of the transformer blocks (speed.py)
    cache: str = "none"  # step caching: none | fbc[:T] | taylorseer[:N] (speed.py)
    parallel: str = "auto"  # under torchrun: auto | sequence | data (see parallel.py)
    recipe: str = "clear"  # the sampler recipe (recipe.py)


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
    vae_tiling: bool = False  # the VAE encodes and decodes this stage in tiles

    @property
    def tokens(self) -> int:
        """Image tokens of this stage: (height / 16) x (width / 16)."""
        return (self.height // 16) * (self.width // 16)

    @property
    def long_side(self) -> int:
        return max(self.width, self.height)

    @property
    def denoising_steps(self) -> int:
        """Steps that run: img2img skips the first (1 - strength) of the schedule, as diffusers does."""
        return self.steps - int(max(self.steps - min(self.steps * self.strength, self.steps), 0))


@dataclass(frozen=True)
class ClearChoice:
    """Which attention the CLEAR stages use, and where its weights come from."""

    label: str  # variant name, "custom" or "none"
    window: int | None  # None: stock attention
    down_factor: int = 1
    weights: Path | None = None
    note: str | None = None  # why this choice, when the user did not make it
    chosen: bool = True  # False: the registry's default variant (full attention at or below 1024 px)

    @property
    def hub_variant(self) -> str | None:
        """The registry variant whose checkpoint comes from the Hugging Face cache; None: no checkpoint or
        a local file."""
        return None if self.weights is not None or self.label in ("custom", "none") else self.label

    def geometry(self, width: int, height: int, text_len: int, down_factor: int | None = None):
        """CLEAR's geometry.Geometry for a width x height px image (16 px a token) and this window; with
        `down_factor`, that one instead of the choice's (a ControlNet's training-free CLEAR: 1)."""
        from .geometry import image_geometry

        f = self.down_factor if down_factor is None else down_factor
        return image_geometry(text_len, height // 16, width // 16, self.window, f)

    @property
    def attention_label(self) -> str:
        """'CLEAR r=8 f=4' (or 'full'): how tables and plans name it."""
        if self.window is None:
            return "full"
        return f"CLEAR r={self.window}" + (f" f={self.down_factor}" if self.down_factor > 1 else "")


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
class LoraSpec:
    """One LoRA: a local file, or a file in a Hub repo, and the scale its low-rank term is multiplied by."""

    source: str  # an absolute local path, or a Hub repo id
    file: str | None  # the file in the repo; None for a local file
    scale: float = 1.0

    @property
    def spec(self) -> str:
        """As `--lora` takes it and the PNG records it: PATH:SCALE or owner/repo/file:SCALE."""
        where = self.source if self.file is None else f"{self.source}/{self.file}"
        return f"{where}:{self.scale:g}"

    @property
    def name(self) -> str:
        return Path(self.file or self.source).stem


@dataclass(frozen=True)
class ControlSpec:
    """What a run's ControlNet is: its weights, the control picture, the mode and the scale."""

    net: Any  # registry.ControlNet: a registry entry, or an ad-hoc one for a Hub repo or a local folder
    folder: Path | None  # a local diffusers folder; None: from the Hub (net.repo)
    image: Path | None  # the control picture; None: upscale's own picture
    mode: int | None  # a union model's mode id
    mode_name: str | None  # the mode as given (a registry name, or the id as text)
    scale: float
    picture: Any = field(default=None, compare=False)  # source.Source: the picture, read once (or None)

    @property
    def source(self) -> str:
        """As `--controlnet` takes it and the PNG records it: a registry name, a repo id, a folder."""
        return str(self.folder) if self.folder is not None else self.net.name


@dataclass(frozen=True)
class WeightsSpec:
    """Which weights a run loads and how they are stored: the base, a GGUF transformer, quantization,
    LoRAs and a ControlNet."""

    model: str  # registry base name, Hub repo id or local folder
    token: str | None = None
    quantize: str = "none"  # the transformer's quantization mode (quantize.MODES)
    quantize_text: str = "none"  # T5's
    transformer: str | None = None  # a GGUF transformer: a file or owner/repo/file.gguf
    loras: tuple[LoraSpec, ...] = ()
    controlnet: ControlSpec | None = None

    @property
    def gguf(self) -> bool:
        return self.transformer is not None and str(self.transformer).lower().endswith(".gguf")


@dataclass(frozen=True)
class Settings:
    """How and where a run computes: device, dtype, memory, processes and speed options (as asked)."""

    device: str = "auto"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 elsewhere
    offload: str = "auto"  # asked; the memory plan decides auto
    gpu_memory: float | None = None  # GB the plan may use
    parallel: str = "auto"  # under torchrun: auto | sequence | data (asked; World decides auto)
    compile: bool = False
    cache: CacheChoice = CacheChoice()
    backend: str = "auto"  # CLEAR's attention kernel (attention.BACKENDS), chosen per device when auto
    compare_full: bool = True  # time full attention at each CLEAR size


@dataclass(frozen=True)
class OutputSpec:
    """Where images go."""

    out: str | None = None  # a folder or a .png path; None: the current folder
    keep_stages: bool = False  # also save each earlier stage's image


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

    @property
    def width(self) -> int:
        return self.asked.width

    @property
    def height(self) -> int:
        return self.asked.height
