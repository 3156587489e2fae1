"""Generation: text-to-image at the first stage, then SDEdit stages with CLEAR, timed against full attention.

`generate(GenerateOptions(...))` is what `clear-gen PROMPT` calls. The default high-resolution recipe
follows CLEAR's reference: a first pass with the original weights and full attention at a long side of
1024 px, then img2img at the target with CLEAR (strength 0.7, 20 steps, guidance 7.5, sigmas
linspace(1, 1/steps, steps), static shift, NTK factor 10, proportional attention, VAE tiling).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .attention import apply_clear, remove_clear
from .errors import ConfigError, DeviceError, WeightsError
from .flops import FluxShape, speedup_bound, step_flops
from .geometry import Geometry, build_block_lists, needed_pairs

MIN_SIDE, MAX_SIDE = 64, 16384
FIRST_PASS_SIDE = 1024  # long side of the full-attention first pass in the reference recipe
FULL_MEASURE_BUDGET_S = 60.0  # measure full attention when a warm + timed step costs less than this


@dataclass
class GenerateOptions:
    """Everything one `clear-gen` run needs. None means: the recipe's default for that stage."""

    prompts: list[str]
    width: int = 1024
    height: int = 1024
    model: str = "dev"  # registry base name, Hub repo id or local diffusers directory
    variant: str | None = None  # registry variant; "none" = stock attention; None = registry default
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
    offload: str = "none"  # none | model | sequential
    compare_full: bool = True
    backend: str = "auto"
    token: str | None = None


@dataclass
class StageTiming:
    width: int
    height: int
    attention: str  # "full" or "CLEAR r=8 f=4"
    steps: int
    seconds: float  # whole stage, compile included
    step_s: float  # median seconds per step after the first
    full_step_s: float | None = None  # full attention, same size and device
    full_estimated: bool = False  # True: from the FLOP model, not measured
    density: float = 1.0  # fraction of (q, kv) pairs CLEAR computes exactly

    @property
    def speedup(self) -> float | None:
        return None if not self.full_step_s or self.attention == "full" else self.full_step_s / self.step_s


@dataclass
class ImageResult:
    path: Path
    prompt: str
    seed: int
    width: int
    height: int
    stages: list[StageTiming] = field(default_factory=list)
    stage_paths: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "prompt": self.prompt,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "stage_paths": [str(p) for p in self.stage_paths],
            "stages": [{**vars(s), "speedup": s.speedup} for s in self.stages],
        }


# ---------------------------------------------------------------- planning (pure)


def check_size(width: int, height: int, multiple: int) -> None:
    """Sides in range and multiples of 16 (64 for down-sampled variants); else propose the nearest."""
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ConfigError(
                f"size {width}x{height} is out of range: each side must be {MIN_SIDE}-{MAX_SIDE} px"
            )
    if width % multiple or height % multiple:
        w, h = (max(multiple, int(s / multiple + 0.5) * multiple) for s in (width, height))
        raise ConfigError(
            f"size {width}x{height} is not a multiple of {multiple}; try --width {w} --height {h}"
        )


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
        if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
            raise ConfigError(f"--stages must grow: got {','.join(map(str, stages))}")
        return stages
    long_side = max(width, height)
    return [FIRST_PASS_SIDE, long_side] if long_side > FIRST_PASS_SIDE else [long_side]


def image_seeds(seeds: list[int] | None, count: int) -> list[int]:
    if seeds:
        if count not in (1, len(seeds)):
            raise ConfigError("give either --seed (once per image) or --count, not both")
        return list(seeds)
    if count < 1:
        raise ConfigError("--count must be at least 1")
    return [random.randrange(2**32) for _ in range(count)]


# ---------------------------------------------------------------- loading


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {device}: torch sees no CUDA GPU; use --device cpu or install a CUDA build of torch"
        )
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N") from e


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class ClearChoice:
    """Which attention the CLEAR stages use, and where its weights come from."""

    label: str  # variant name, "custom" or "none"
    window: int | None  # None: stock attention
    down_factor: int = 1
    weights: Path | None = None


def resolve_clear(opts: GenerateOptions) -> ClearChoice:
    """--variant, or --window/--down-factor/--clear-weights, into one choice (weights fetched later)."""
    from .registry import load_registry

    if opts.window is not None or opts.clear_weights is not None:
        if opts.window is None:
            raise ConfigError(
                "--clear-weights needs --window (and --down-factor if the weights are down-sampled)"
            )
        weights = Path(opts.clear_weights) if opts.clear_weights else None
        if weights is not None and not weights.is_file():
            raise ConfigError(f"--clear-weights {weights}: no such file")
        return ClearChoice("custom", opts.window, opts.down_factor or 1, weights)
    if opts.variant == "none":
        return ClearChoice("none", None)
    registry = load_registry()
    variant = registry.variant(opts.variant or registry.default_variant)
    return ClearChoice(variant.name, variant.window, variant.down_factor)


def clear_weights_file(choice: ClearChoice, token: str | None) -> Path | None:
    """The checkpoint of a registry variant (from the cache or the Hub), a custom file, or None."""
    from .hub import resolve_variant_file

    if choice.weights is not None or choice.label in ("custom", "none"):
        return choice.weights
    return resolve_variant_file(choice.label, token)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No loading bars, accelerate hints or deprecation notes from diffusers and transformers."""
    import warnings

    import diffusers
    import transformers

    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers.logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()


def load_pipeline(opts: GenerateOptions, device: torch.device, dtype: torch.dtype):
    """FluxPipeline from a registry base, Hub repo or local directory, placed per --offload."""
    from diffusers import FluxPipeline

    from .hub import resolve_base

    path = resolve_base(opts.model, opts.token)
    try:
        with _quiet_loading():
            pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise WeightsError(
            f"{path} is not a complete FLUX.1 diffusers folder ({str(e).splitlines()[0][:160]}); "
            f"fetch one with `clear-gen download --base dev`"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    if opts.offload == "none":
        pipe.to(device)
    elif opts.offload in ("model", "sequential"):
        try:
            import accelerate  # noqa: F401
        except ImportError as e:
            raise ConfigError("--offload needs accelerate: pip install accelerate") from e
        offload = (
            pipe.enable_model_cpu_offload if opts.offload == "model" else pipe.enable_sequential_cpu_offload
        )
        offload(device=device)
    else:
        raise ConfigError(f"unknown --offload {opts.offload!r}; choose none, model or sequential")
    return pipe


def load_clear_weights(path: Path) -> dict[str, torch.Tensor]:
    """A CLEAR .safetensors checkpoint into a state dict on the CPU."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(
            f"{path} is not a readable .safetensors checkpoint ({e}); download it again"
        ) from e


# ---------------------------------------------------------------- timing


class StepClock:
    """Times denoising steps through the pipeline's step-end callback (synchronising CUDA)."""

    def __init__(self, device: torch.device, on_step: Callable[[], None] | None = None):
        self.device, self.on_step, self.stamps = device, on_step, [time.perf_counter()]

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.on_step:
            self.on_step()
        return kwargs

    def step_seconds(self) -> float:
        """Median step time, leaving out the first (it holds compilation) when there are others."""
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        d = d[1:] if len(d) > 1 else d
        return sorted(d)[len(d) // 2] if d else 0.0


@contextmanager
def capture_transformer_call(transformer) -> Iterator[dict]:
    """Keep the last call's inputs, seen before any CLEAR hook changes them."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen.clear()
        seen.update(kwargs)

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield seen
    finally:
        handle.remove()


def _synced_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _shape(config) -> FluxShape:
    return FluxShape(
        heads=config.num_attention_heads,
        head_dim=config.attention_head_dim,
        double=config.num_layers,
        single=config.num_single_layers,
        in_channels=config.in_channels,
        joint_dim=config.joint_attention_dim,
    )


def time_full_attention(
    transformer, inputs: dict, timing: StageTiming, geo: Geometry, device, reapply
) -> None:
    """timing.full_step_s: one warm step with stock attention when that is cheap, else the FLOP model.

    The estimate scales the measured CLEAR step by the FLOP ratio (linear + full attention) /
    (linear + computed CLEAR attention), so it assumes both run at the same FLOP rate.
    """
    computed = build_block_lists(geo).computed_pairs()
    estimate = timing.step_s * speedup_bound(step_flops(_shape(transformer.config), geo, computed))
    if 2 * estimate > FULL_MEASURE_BUDGET_S or not inputs:
        timing.full_step_s, timing.full_estimated = estimate, True
        return
    remove_clear(transformer)
    try:
        _synced_seconds(lambda: transformer(**inputs), device)  # warm-up
        timing.full_step_s = _synced_seconds(lambda: transformer(**inputs), device)
    finally:
        reapply()


# ---------------------------------------------------------------- generation


@dataclass
class Stage:
    width: int
    height: int
    clear: bool  # CLEAR attention (else the original model with full attention)
    steps: int
    guidance: float
    sdedit: bool  # img2img from the previous stage's image


def plan_stages(opts: GenerateOptions, choice: ClearChoice) -> list[Stage]:
    """The stages of one image, checked before anything heavy is loaded."""
    multiple = 64 if choice.down_factor > 1 else 16
    check_size(opts.width, opts.height, multiple)
    long_sides = default_stages(opts.width, opts.height, opts.stages)
    if long_sides[-1] != max(opts.width, opts.height):
        raise ConfigError(
            f"the last stage ({long_sides[-1]} px) must be the target's long side "
            f"({max(opts.width, opts.height)} px)"
        )
    sizes = stage_sizes(opts.width, opts.height, long_sides, multiple)
    for w, h in sizes:
        check_size(w, h, multiple)
    use_clear = choice.window is not None
    if len(sizes) == 1:
        w, h = sizes[0]
        return [Stage(w, h, use_clear, opts.steps, 3.5 if opts.guidance is None else opts.guidance, False)]
    first = Stage(*sizes[0], False, opts.first_steps, opts.first_guidance, False)
    guidance = 7.5 if opts.guidance is None else opts.guidance
    return [first] + [Stage(w, h, use_clear, opts.steps, guidance, True) for w, h in sizes[1:]]


def _clear_kwargs(opts: GenerateOptions, choice: ClearChoice, stage: Stage, state_dict) -> dict:
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


def _encode(pipe, prompts: list[str], device, max_len: int) -> list[tuple]:
    """(prompt_embeds, pooled) per prompt; then text encoders leave the GPU for the transformer's room."""
    with torch.no_grad():
        out = [pipe.encode_prompt(p, None, device=device, max_sequence_length=max_len)[:2] for p in prompts]
    if device.type == "cuda" and getattr(pipe, "_offload_gpu_id", None) is None:
        pipe.text_encoder.to("cpu")
        pipe.text_encoder_2.to("cpu")
        torch.cuda.empty_cache()
    return out


def _run_stage(pipe, img2img, stage: Stage, embeds, image, seed: int, opts: GenerateOptions, clock):
    """One stage's diffusion; returns the PIL image."""
    import numpy as np

    common = dict(
        prompt_embeds=embeds[0],
        pooled_prompt_embeds=embeds[1],
        width=stage.width,
        height=stage.height,
        num_inference_steps=stage.steps,
        guidance_scale=stage.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=clock,
    )
    if not stage.sdedit:
        return pipe(**common).images[0]
    from PIL import Image

    resized = image.resize((stage.width, stage.height), Image.LANCZOS)
    sigmas = np.linspace(1.0, 1.0 / stage.steps, stage.steps).tolist()
    return img2img(image=resized, strength=opts.strength, sigmas=sigmas, **common).images[0]


def _img2img(pipe):
    """FluxImg2ImgPipeline sharing pipe's modules, with the recipe's static shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    img2img.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False
    )
    img2img.set_progress_bar_config(disable=True)
    return img2img


@dataclass
class Hooks:
    """What the caller sees while generating: a stage starts, a step ends, an image is saved."""

    stage_start: Callable[[int, Stage], None] = lambda i, s: None
    step: Callable[[], None] = lambda: None
    image_done: Callable[[ImageResult], None] = lambda r: None


def generate(opts: GenerateOptions, hooks: Hooks | None = None) -> list[ImageResult]:
    """Generate one image per prompt and seed; each is saved as soon as it is done (see module docstring)."""
    from . import output
    from .errors import OutputError

    hooks = hooks or Hooks()
    # 1. Check everything the user gave before loading gigabytes.
    prompts = [p.strip() for p in opts.prompts]
    if not prompts or not all(prompts):
        raise ConfigError("the prompt is empty: give a PROMPT or a --prompts-file with one prompt a line")
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    choice = resolve_clear(opts)
    stages = plan_stages(opts, choice)
    seeds = image_seeds(opts.seeds, opts.count)
    probe = output.ImageRecord(
        prompt=prompts[0],
        seed=seeds[0],
        model=opts.model,
        steps=1,
        guidance=0.0,
        width=opts.width,
        height=opts.height,
    )
    output.release(output.output_path(opts.out, probe))  # fails now, not after an hour, if unwritable
    # 2. Load the CLEAR weights and the pipeline; encode every prompt once.
    weights = clear_weights_file(choice, opts.token)
    state_dict = load_clear_weights(weights) if weights is not None else None
    pipe = load_pipeline(opts, device, dtype)
    if max(opts.width, opts.height) > 2048:
        pipe.vae.enable_tiling()
    max_len = opts.max_sequence_length or (256 if "schnell" in str(opts.model).lower() else 512)
    embeds = _encode(pipe, prompts, device, max_len)
    img2img = _img2img(pipe) if len(stages) > 1 else None
    # 3. Every prompt and seed: its stages, then save.
    results = []
    try:
        for prompt, emb in zip(prompts, embeds, strict=True):
            for seed in seeds:
                result = _one_image(
                    pipe, img2img, stages, emb, prompt, seed, opts, choice, state_dict, device, hooks
                )
                results.append(result)
                hooks.image_done(result)
    except torch.cuda.OutOfMemoryError as e:
        raise DeviceError("out of GPU memory: try --offload model or a smaller size") from e
    except OSError as e:
        raise OutputError(f"cannot write the image: {e}") from e
    finally:
        remove_clear(pipe.transformer)
    return results


def _attention_label(choice: ClearChoice, stage: Stage) -> str:
    if not stage.clear:
        return "full"
    return f"CLEAR r={choice.window}" + (f" f={choice.down_factor}" if choice.down_factor > 1 else "")


def _one_image(
    pipe, img2img, stages, emb, prompt, seed, opts, choice, state_dict, device, hooks
) -> ImageResult:
    from . import output

    transformer = pipe.transformer
    last = stages[-1]
    result = ImageResult(path=Path(), prompt=prompt, seed=seed, width=last.width, height=last.height)
    image = None
    for i, stage in enumerate(stages):
        # 1. Attention for this stage: the original model, or CLEAR with the stage's NTK and scale.
        kwargs = _clear_kwargs(opts, choice, stage, state_dict)
        if stage.clear:
            apply_clear(transformer, **kwargs)
        else:
            remove_clear(transformer)
        # 2. Denoise, timing every step.
        hooks.stage_start(i, stage)
        clock = StepClock(device, hooks.step)
        with capture_transformer_call(transformer) as inputs:
            image = _run_stage(pipe, img2img, stage, emb, image, seed, opts, clock)
        timing = _timing(stage, choice, clock, len(emb[0][0]))
        if opts.compare_full and stage.clear:
            geo = _geometry(stage, choice, len(emb[0][0]))
            time_full_attention(
                transformer, inputs, timing, geo, device, lambda kw=kwargs: apply_clear(transformer, **kw)
            )
        elif not stage.clear:
            timing.full_step_s = timing.step_s
        result.stages.append(timing)
        # 3. Intermediate images, when asked.
        if opts.keep_stages and stage is not last:
            record = _record(opts, choice, prompt, seed, stages[: i + 1], result)
            result.stage_paths.append(output.save_png(image, output.output_path(opts.out, record), record))
    record = _record(opts, choice, prompt, seed, stages, result)
    result.path = output.save_png(image, output.output_path(opts.out, record), record)
    return result


def _geometry(stage: Stage, choice: ClearChoice, text_len: int) -> Geometry:
    return Geometry(text_len, stage.height // 16, stage.width // 16, choice.window, choice.down_factor)


def _timing(stage: Stage, choice: ClearChoice, clock: StepClock, text_len: int) -> StageTiming:
    timing = StageTiming(
        width=stage.width,
        height=stage.height,
        attention=_attention_label(choice, stage),
        steps=len(clock.stamps) - 1,
        seconds=clock.stamps[-1] - clock.stamps[0],
        step_s=clock.step_seconds(),
    )
    if stage.clear:
        geo = _geometry(stage, choice, text_len)
        timing.density = needed_pairs(geo) / (geo.q_len * geo.kv_len)
    return timing


def _record(opts, choice: ClearChoice, prompt: str, seed: int, stages: list[Stage], result: ImageResult):
    from . import output

    last = stages[-1]
    return output.ImageRecord(
        prompt=prompt,
        seed=seed,
        model=opts.model,
        variant=choice.label,
        window=choice.window,
        down_factor=choice.down_factor if choice.window else None,
        steps=last.steps,
        guidance=last.guidance,
        width=last.width,
        height=last.height,
        stages=[max(s.width, s.height) for s in stages],
        strength=opts.strength if len(stages) > 1 else None,
        timings={"stages": [{**vars(t), "speedup": t.speedup} for t in result.stages[: len(stages)]]},
        extra={
            "first_steps": opts.first_steps,
            "first_guidance": opts.first_guidance,
            "ntk_factor": opts.ntk_factor,
            "proportional_attention": opts.proportional_attention,
            "max_sequence_length": opts.max_sequence_length,
            "clear_weights": opts.clear_weights,
            "dtype": opts.dtype,
            "backend": opts.backend,
        },
    )


def options_from_record(record, **overrides) -> GenerateOptions:
    """GenerateOptions that re-run a saved image (`--from`); `overrides` win over the record."""
    extra = record.extra or {}
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
    )
    return replace(opts, **overrides)
