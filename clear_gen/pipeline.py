"""Generation: text-to-image at the first stage, then SDEdit stages with CLEAR, timed against full attention.

`generate(GenerateOptions(...))` is what `clear-gen PROMPT` calls. The default high-resolution recipe
follows CLEAR's reference: a first pass with the original weights and full attention at a long side of
1024 px, then img2img at the target with CLEAR (strength 0.7, 20 steps, guidance 7.5, sigmas
linspace(1, 1/steps, steps), static shift, NTK factor 10, proportional attention, VAE tiling).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .attention import apply_clear, remove_clear
from .device import resolve_device, resolve_dtype
from .errors import ConfigError, DeviceError, WeightsError
from .geometry import Geometry, image_geometry, needed_pairs
from .plan import (
    ClearChoice,
    GenerateOptions,
    Stage,
    clear_kwargs,
    image_seeds,
    options_from_record,  # noqa: F401  (re-exported for the CLI)
    plan_stages,
    resolve_clear,
)
from .positions import use_exact_positions
from .timing import StageTiming, StepClock, capture_transformer_call, time_full_attention


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
            "stages": [s.to_json() for s in self.stages],
        }


# ---------------------------------------------------------------- planning (pure)


# ---------------------------------------------------------------- loading


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
    with _quiet_loading():
        try:
            pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise WeightsError(
                f"{path} is not a complete FLUX.1 diffusers folder ({str(e).splitlines()[0][:160]}); "
                f"fetch one with `clear-gen download --base dev`"
            ) from e
        if opts.offload == "none":
            pipe.to(device)
        elif opts.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
    pipe.set_progress_bar_config(disable=True)
    use_exact_positions(pipe.transformer)  # RoPE sees integer positions in every stage and dtype
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


ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 16  # live activations at a step's peak, in units of tokens x hidden


def place_clear_weights(state_dict: dict, transformer, tokens: int) -> dict:
    """The checkpoint on the transformer's GPU, in its dtype, when it fits beside the largest stage's
    activations: apply_clear/remove_clear then swap parameters instead of copying 3.6 GB each way (twice
    per image with the SDEdit recipe). Otherwise in pinned CPU memory, copied in at full bus speed.

    The activation estimate (16 x tokens x hidden x element size, ~22 GB at 8K in bf16) is a rough
    bound on what one FLUX block keeps alive at once, plus a 2 GiB margin.
    """
    param = transformer.x_embedder.weight
    if param.device.type != "cuda":
        return state_dict
    size = sum(v.numel() for v in state_dict.values()) * param.element_size()
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    activations = ACTIVATION_BYTES_PER_TOKEN_CHANNEL * tokens * hidden * param.element_size()
    free, _ = torch.cuda.mem_get_info(param.device)
    if free > size + activations + 2 * 2**30:
        return {k: v.to(param.device, param.dtype) for k, v in state_dict.items()}
    return {k: v.pin_memory() for k, v in state_dict.items()}


# ---------------------------------------------------------------- generation


def _encode(pipe, prompts: list[str], device, max_len: int, offload: str) -> list[tuple]:
    """(prompt_embeds, pooled) per prompt; then text encoders leave the GPU for the transformer's room."""
    with torch.no_grad():
        out = [pipe.encode_prompt(p, None, device=device, max_sequence_length=max_len)[:2] for p in prompts]
    if device.type == "cuda" and offload == "none":  # with offload, accelerate moves them itself
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
    """FluxImg2ImgPipeline sharing pipe's modules as they are, with the recipe's static shift.

    Built directly rather than with `from_pipe`, which casts every shared module to float32 unless told
    a dtype (a bf16 run then crashes on mixed dtypes, and a 12B transformer doubles in size).
    """
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    wanted = inspect.signature(FluxImg2ImgPipeline.__init__).parameters
    img2img = FluxImg2ImgPipeline(**{k: v for k, v in pipe.components.items() if k in wanted})
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
    from .hub import check_run_weights

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
    check_run_weights(opts.model, choice.hub_variant)  # base, then CLEAR weights: all there or fetchable
    # 2. Load, then generate; GPU memory can run out anywhere in there.
    try:
        return _load_and_generate(opts, hooks, prompts, seeds, choice, stages, device, dtype)
    except torch.cuda.OutOfMemoryError as e:
        raise DeviceError("out of GPU memory: try --offload model or a smaller size") from e


def _load_and_generate(opts, hooks, prompts, seeds, choice, stages, device, dtype) -> list[ImageResult]:
    # 1. The CLEAR weights and the pipeline; every prompt encoded once.
    weights = clear_weights_file(choice, opts.token)
    state_dict = load_clear_weights(weights) if weights is not None else None
    pipe = load_pipeline(opts, device, dtype)
    if max(opts.width, opts.height) > 2048:
        pipe.vae.enable_tiling()
    max_len = opts.max_sequence_length or (256 if "schnell" in str(opts.model).lower() else 512)
    embeds = _encode(pipe, prompts, device, max_len, opts.offload)
    if state_dict is not None and opts.offload == "none":
        state_dict = place_clear_weights(state_dict, pipe.transformer, max(s.tokens for s in stages))
    img2img = _img2img(pipe) if len(stages) > 1 else None
    # 2. Every prompt and seed: its stages, then save (each image as soon as it is done).
    results = []
    try:
        for prompt, emb in zip(prompts, embeds, strict=True):
            for seed in seeds:
                result = _one_image(
                    pipe, img2img, stages, emb, prompt, seed, opts, choice, state_dict, device, hooks
                )
                results.append(result)
                hooks.image_done(result)
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
        kwargs = clear_kwargs(opts, choice, stage, state_dict)
        if stage.clear:
            apply_clear(transformer, **kwargs)
        else:
            remove_clear(transformer)
        # 2. Denoise, timing every step.
        hooks.stage_start(i, stage)
        clock = StepClock(device, hooks.step)
        with capture_transformer_call(transformer) as inputs:
            image = _run_stage(pipe, img2img, stage, emb, image, seed, opts, clock)
        geo = _geometry(stage, choice, len(emb[0][0])) if stage.clear else None  # emb[0]: (1, T, D)
        timing = _timing(stage, choice, clock, geo)
        if opts.compare_full and geo is not None:
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
    return image_geometry(text_len, stage.height // 16, stage.width // 16, choice.window, choice.down_factor)


def _timing(stage: Stage, choice: ClearChoice, clock: StepClock, geo: Geometry | None) -> StageTiming:
    timing = StageTiming(
        width=stage.width,
        height=stage.height,
        attention=_attention_label(choice, stage),
        steps=len(clock.stamps) - 1,
        seconds=clock.stamps[-1] - clock.stamps[0],
        step_s=clock.step_seconds(),
    )
    if geo is not None:  # a CLEAR stage
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
        timings={"stages": [t.to_json() for t in result.stages[: len(stages)]]},
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
