"""Planning a run, before anything heavy loads: options, stage sizes, seeds and the attention choice.

Every user error that can be found from the arguments alone is raised here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ConfigError

MIN_SIDE, MAX_SIDE = 64, 16384
FIRST_PASS_SIDE = 1024  # long side of the full-attention first pass in the reference recipe
ATTENTION_FIELDS = frozenset({"variant", "window", "down_factor", "clear_weights"})  # see resolve_clear
TRANSFORMER_FIELDS = {"quantize": "none", "transformer": None}  # a GGUF file or a quantized base, not both
CONTROL_FIELDS = ("control", "controlnet", "control_mode", "control_scale", "control_sha256")  # as a whole


@dataclass
class GenerateOptions:
    """Everything one `clear-gen` run needs. None means: the recipe's default for that stage."""

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
    max_sequence_length: int | None = None  # None: 512 (dev), 256 (schnell), from the model
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


def check_size(width: int, height: int, multiple: int, square_flag: str | None = None) -> None:
    """Sides in range and multiples of 16 (64 for down-sampled variants); else propose the nearest.

    `square_flag` names the option that gave a square size (bench's `--res`): the hint then uses it."""
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ConfigError(
                f"size {width}x{height} is out of range: each side must be {MIN_SIDE}-{MAX_SIDE} px"
            )
    if width % multiple or height % multiple:
        w, h = (max(multiple, int(s / multiple + 0.5) * multiple) for s in (width, height))
        hint = f"{square_flag} {w}" if square_flag and w == h else f"--width {w} --height {h}"
        raise ConfigError(f"size {width}x{height} is not a multiple of {multiple}; try {hint}")


def size_multiple(down_factor: int) -> int:
    """Pixels each side must be a multiple of: 16 per token, and a token grid divisible by the down factor
    (64 px for the published -down4 variants)."""
    return 16 * math.lcm(4, down_factor) if down_factor > 1 else 16


def stage_sizes(width: int, height: int, long_sides: list[int], multiple: int) -> list[tuple[int, int]]:
    """(w, h) of each stage: the target's aspect at each long side, sides rounded to `multiple`."""
    sizes = []
    for side in long_sides:
        scale = side / max(width, height)
        sizes.append(tuple(max(multiple, round(s * scale / multiple) * multiple) for s in (width, height)))
    sizes[-1] = (width, height)
    return sizes


def default_stages(width: int, height: int, stages: list[int] | None) -> list[int]:
    """The recipe: above 1024 px, a 1024 px first pass then the target; else the target alone."""
    if stages:
        if not all(MIN_SIDE <= side <= MAX_SIDE for side in stages):
            got = ",".join(map(str, stages))
            raise ConfigError(f"each stage's long side must be {MIN_SIDE}-{MAX_SIDE} px, got {got}")
        if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
            raise ConfigError(f"--stages must grow: got {','.join(map(str, stages))}")
        return stages
    long_side = max(width, height)
    return [FIRST_PASS_SIDE, long_side] if long_side > FIRST_PASS_SIDE else [long_side]


def image_seeds(seeds: list[int] | None, count: int) -> list[int]:
    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if seeds:
        if count not in (1, len(seeds)):
            raise ConfigError("give either --seed (once per image) or --count, not both")
        bad = [s for s in seeds if not 0 <= s < 2**64]
        if bad:
            raise ConfigError(f"--seed must be in 0 .. 2^64 - 1, got {bad[0]}")
        return list(seeds)
    return [random.randrange(2**32) for _ in range(count)]


@dataclass(frozen=True)
class ClearChoice:
    """Which attention the CLEAR stages use, and where its weights come from."""

    label: str  # variant name, "custom" or "none"
    window: int | None  # None: stock attention
    down_factor: int = 1
    weights: Path | None = None
    note: str | None = None  # why this choice, when the user did not make it

    @property
    def hub_variant(self) -> str | None:
        """The registry variant whose checkpoint comes from the Hugging Face cache; None: no checkpoint or
        a local file."""
        return None if self.weights is not None or self.label in ("custom", "none") else self.label


def resolve_clear(opts: GenerateOptions) -> ClearChoice:
    """--variant, or --window/--down-factor/--clear-weights, into one choice (weights fetched later)."""
    from .registry import load_registry

    custom = {
        "--window": opts.window,
        "--down-factor": opts.down_factor,
        "--clear-weights": opts.clear_weights,
    }
    given = [f"{flag} {value}" for flag, value in custom.items() if value is not None]
    if given and opts.variant is not None:
        raise ConfigError(
            f"--variant {opts.variant} and {given[0]} conflict: give a variant or a custom "
            "--window [--down-factor] [--clear-weights], not both"
        )
    if given:
        if opts.window is None:
            raise ConfigError(
                f"{given[0]} needs --window (and --down-factor if the weights are down-sampled)"
            )
        if opts.window < 1 or (opts.down_factor is not None and opts.down_factor < 1):
            raise ConfigError("--window and --down-factor must be at least 1")
        weights = Path(opts.clear_weights) if opts.clear_weights else None
        if weights is not None and not weights.is_file():
            raise ConfigError(f"--clear-weights {weights}: no such file")
        return ClearChoice("custom", opts.window, opts.down_factor or 1, weights)
    if opts.variant == "none":
        return ClearChoice("none", None)
    if opts.variant is None and max(opts.width, opts.height) <= FIRST_PASS_SIDE:
        note = (
            f"{opts.width}x{opts.height}: the original weights with full attention, as CLEAR is no faster "
            f"at or below {FIRST_PASS_SIDE} px (--variant or --window forces CLEAR)"
        )
        return ClearChoice("none", None, note=note)
    registry = load_registry()
    local = Path(opts.variant or "").expanduser()
    if opts.variant and local.is_file():  # a downloaded checkpoint: its published file name says r and f
        known = {v.filename: v for v in registry.variants.values()}
        if local.name not in known:
            raise ConfigError(
                f"--variant {local}: not a published CLEAR file name; use --clear-weights with --window"
            )
        v = known[local.name]
        return ClearChoice(v.name, v.window, v.down_factor, local)
    variant = registry.variant(opts.variant or registry.default_variant)
    return ClearChoice(variant.name, variant.window, variant.down_factor)


@dataclass
class Stage:
    width: int
    height: int
    clear: bool  # CLEAR attention (else the original model with full attention)
    steps: int
    guidance: float
    sdedit: bool  # img2img from the previous stage's image
    strength: float = 1.0  # SDEdit: the part of the schedule that runs

    @property
    def tokens(self) -> int:
        """Image tokens of this stage: (height / 16) x (width / 16)."""
        return (self.height // 16) * (self.width // 16)

    @property
    def denoising_steps(self) -> int:
        """Steps that run: img2img skips the first (1 - strength) of the schedule, as diffusers does."""
        return self.steps - int(max(self.steps - min(self.steps * self.strength, self.steps), 0))


def check_options(opts: GenerateOptions) -> None:
    """Numbers and names that need no model to check."""
    if not 0 < opts.strength <= 1:
        raise ConfigError(f"--strength must be in (0, 1], got {opts.strength}")
    ranges = {  # option: (lowest, highest or None); an unset option (None: the recipe's default) passes
        "steps": (1, None),
        "first_steps": (1, None),
        "max_sequence_length": (1, 512),  # T5's limit in FluxPipeline
        "guidance": (0, None),
        "first_guidance": (0, None),
    }
    for name, (low, high) in ranges.items():
        value = getattr(opts, name)
        if value is not None and not (low <= value and (high is None or value <= high)):  # NaN fails too
            limits = f"at least {low}" if high is None else f"{low}-{high}"
            raise ConfigError(f"--{name.replace('_', '-')} must be {limits}, got {value}")
    if opts.ntk_factor is not None and not opts.ntk_factor > 0:
        raise ConfigError(f"--ntk-factor must be positive, got {opts.ntk_factor}")
    from .speed import parse_cache

    parse_cache(opts.cache)
    if opts.offload not in ("auto", "none", "model", "sequential"):
        raise ConfigError(f"unknown --offload {opts.offload!r}; choose auto, none, model or sequential")
    from .quantize import check_names  # imports torch: not at the CLI's start

    check_names(opts.quantize, opts.quantize_text, opts.transformer)
    from .lora import parse_loras

    parse_loras(opts.loras or [], opts.lora_files or [])  # scales are numbers, files exist
    if opts.offload in ("model", "sequential"):
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ConfigError(f"--offload {opts.offload} needs accelerate: pip install accelerate") from None


def plan_stages(opts: GenerateOptions, choice: ClearChoice) -> list[Stage]:
    """The stages of one image, checked before anything heavy is loaded."""
    sizes = _checked_sizes(opts, choice, default_stages(opts.width, opts.height, opts.stages))
    use_clear = choice.window is not None
    if len(sizes) == 1:
        w, h = sizes[0]
        return [Stage(w, h, use_clear, opts.steps, 3.5 if opts.guidance is None else opts.guidance, False)]
    first = Stage(*sizes[0], False, opts.first_steps, opts.first_guidance, False)
    return [first] + sdedit_stages(opts, choice, sizes[1:])


def plan_upscale(opts: GenerateOptions, choice: ClearChoice) -> list[Stage]:
    """The stages of an upscale to opts.width x opts.height: every one an SDEdit stage, the first from the
    given picture (which is not a stage); `opts.stages` lists the long sides after it."""
    long_sides = default_stages(opts.width, opts.height, opts.stages or [max(opts.width, opts.height)])
    return sdedit_stages(opts, choice, _checked_sizes(opts, choice, long_sides))


def sdedit_stages(opts: GenerateOptions, choice: ClearChoice, sizes: list[tuple[int, int]]) -> list[Stage]:
    """img2img stages, each from the previous image: CLEAR (when chosen) with the recipe's defaults."""
    guidance = 7.5 if opts.guidance is None else opts.guidance
    use_clear = choice.window is not None
    return [Stage(w, h, use_clear, opts.steps, guidance, True, opts.strength) for w, h in sizes]


def _checked_sizes(
    opts: GenerateOptions, choice: ClearChoice, long_sides: list[int]
) -> list[tuple[int, int]]:
    """(w, h) of each stage at these long sides, every number checked: the last is the target."""
    check_options(opts)
    multiple = size_multiple(choice.down_factor)
    check_size(opts.width, opts.height, multiple)
    if long_sides[-1] != max(opts.width, opts.height):
        raise ConfigError(
            f"the last stage ({long_sides[-1]} px) must be the target's long side "
            f"({max(opts.width, opts.height)} px)"
        )
    sizes = stage_sizes(opts.width, opts.height, long_sides, multiple)
    for w, h in sizes:
        check_size(w, h, multiple)
    return sizes


def clear_kwargs(opts: GenerateOptions, choice: ClearChoice, stage: Stage, state_dict) -> dict:
    high_res = max(stage.width, stage.height) > FIRST_PASS_SIDE
    ntk = opts.ntk_factor if opts.ntk_factor is not None else (10.0 if high_res else 1.0)
    prop = opts.proportional_attention if opts.proportional_attention is not None else high_res
    return dict(
        window=choice.window,
        down_factor=choice.down_factor,
        state_dict=state_dict,
        proportional_attention=prop,
        ntk_factor=ntk,
        backend=opts.backend,
    )


def options_from_record(record, **overrides) -> GenerateOptions:
    """GenerateOptions that re-run a saved image (`--from`); `overrides` win over the record.

    An override of the attention (variant, window, down factor or CLEAR weights) replaces the record's
    attention as a whole, so `--from x.png --variant r16` does not conflict with x.png's custom window;
    likewise `--quantize` or `--transformer` replaces the record's transformer (a GGUF file or a quantized
    base's), `--lora` the record's LoRAs and `--controlnet` (or --control, --control-mode, --control-scale)
    the record's ControlNet."""
    extra = record.extra or {}
    if extra.get("source"):
        src = extra["source"]
        raise ConfigError(
            f"this image was upscaled from {src.get('file')} (sha256 {str(src.get('sha256'))[:12]}...): "
            f"re-make it with `clear-gen upscale {src.get('file')}` and the settings `clear-gen info` shows"
        )
    custom = record.variant == "custom"
    opts = GenerateOptions(
        prompts=[record.prompt],
        width=record.width,
        height=record.height,
        model=record.model,
        variant=None if custom else record.variant,
        window=record.window if custom else None,
        down_factor=record.down_factor if custom else None,
        clear_weights=extra.get("clear_weights"),
        stages=list(record.stages) if record.stages else None,
        strength=record.strength if record.strength is not None else 0.7,
        steps=record.steps,
        guidance=record.guidance,
        first_steps=extra.get("first_steps", 20),
        first_guidance=extra.get("first_guidance", 3.5),
        seeds=[record.seed],
        max_sequence_length=extra.get("max_sequence_length"),
        ntk_factor=extra.get("ntk_factor"),
        proportional_attention=extra.get("proportional_attention"),
        dtype=extra.get("dtype"),
        backend=extra.get("backend", "auto"),
        quantize=extra.get("quantize", "none"),
        quantize_text=extra.get("quantize_text", "none"),
        transformer=extra.get("transformer"),
        loras=extra.get("loras"),
        **_control_options(extra.get("control")),
        compile=extra.get("compile", False),
        cache=extra.get("cache", "none"),
    )
    if ATTENTION_FIELDS & overrides.keys():
        opts = replace(opts, **dict.fromkeys(ATTENTION_FIELDS))
    if TRANSFORMER_FIELDS.keys() & overrides.keys():
        opts = replace(opts, **TRANSFORMER_FIELDS)
    if {"controlnet", "control"} & overrides.keys():
        opts = replace(opts, **dict.fromkeys(CONTROL_FIELDS))
    return replace(opts, **overrides)


def _control_options(control: dict | None) -> dict:
    """GenerateOptions' ControlNet fields from a record's `control` entry (control.control_record)."""
    if not control:
        return {}
    return {
        "controlnet": control.get("controlnet"),
        "control": control.get("image"),
        "control_mode": control.get("mode"),
        "control_scale": control.get("scale"),
        "control_sha256": control.get("sha256"),
    }


def text_tokens(opts: GenerateOptions) -> int:
    """T5 tokens of the prompt: --max-sequence-length, else 256 for schnell and 512 for dev."""
    return opts.max_sequence_length or (256 if "schnell" in str(opts.model).lower() else 512)
