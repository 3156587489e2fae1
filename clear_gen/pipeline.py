"""Generation: text-to-image at the first stage, then SDEdit stages with CLEAR, timed against full attention.

`generate(GenerateOptions(...))` is what `clear-gen PROMPT` calls. The default high-resolution recipe
follows CLEAR's reference: a first pass with the original weights and full attention at a long side of
1024 px, then img2img at the target with CLEAR (strength 0.7, 20 steps, guidance 7.5, sigmas
linspace(1, 1/steps, steps), static shift, NTK factor 10, proportional attention, VAE tiling).
At or below 1024 px the default is the original model alone: CLEAR is no faster there.

The latents of each stage are decoded here rather than inside the diffusers call, so that the VAE's
time is reported apart; `RunTiming` records where every second of an image went.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import output, parallel
from .attention import apply_clear, remove_clear, resolve_backend
from .device import DTYPES, device_name, resolve_dtype
from .errors import ClearGenError, ConfigError, DeviceError
from .geometry import Geometry, image_geometry, needed_pairs
from .loading import (
    clear_weights_file,
    img2img_pipeline,
    load_clear_weights,
    load_pipeline,
    place_clear_weights,
)
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
from .timing import (
    RunTiming,
    StageTiming,
    StepClock,
    capture_transformer_call,
    now,
    time_full_attention,
    time_step,
)


@dataclass
class ImageResult:
    """One saved image: where it is, what made it (as stored in its PNG) and where the time went."""

    path: Path  # absolute
    record: output.ImageRecord
    timing: RunTiming
    stage_paths: list[Path] = field(default_factory=list)  # absolute; --keep-stages
    job: int | None = None  # under torchrun: the image's place in the run's (prompt, seed) jobs

    def to_json(self) -> dict[str, Any]:
        """The record as `clear-gen info --json` prints it, with the paths and the finished timing."""
        job = {} if self.job is None else {"job": self.job}
        return {
            **job,
            "path": str(self.path),
            "stage_paths": [str(p) for p in self.stage_paths],
            **self.record.to_dict(),
            "timings": self.timing.to_json(),
        }


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
    """One stage's diffusion; returns its packed latents (B, (H/16)(W/16), 64), not yet decoded."""
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
        output_type="latent",
    )
    if not stage.sdedit:
        return pipe(**common).images
    from PIL import Image

    resized = image.resize((stage.width, stage.height), Image.LANCZOS)
    sigmas = np.linspace(1.0, 1.0 / stage.steps, stage.steps).tolist()
    return img2img(image=resized, strength=opts.strength, sigmas=sigmas, **common).images


def _decode(pipe, latents: torch.Tensor, stage: Stage) -> Any:
    """Packed latents into a PIL image, as diffusers' Flux pipelines do after their last step."""
    vae, f = pipe.vae, pipe.vae_scale_factor
    b, _, c = latents.shape  # (B, (H/16)(W/16), 64): 2 x 2 patches of 16 channels
    h, w = 2 * (stage.height // (f * 2)), 2 * (stage.width // (f * 2))
    latents = latents.view(b, h // 2, w // 2, c // 4, 2, 2)  # (B, H/16, W/16, 16, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)  # (B, 16, H/16, 2, W/16, 2)
    latents = latents.reshape(b, c // 4, h, w)  # (B, 16, H/8, W/8)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]  # (B, 3, H, W)
    pipe.maybe_free_model_hooks()  # with --offload, the VAE leaves the GPU as after a pipeline call
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


@dataclass
class Hooks:
    """What a caller sees while generating; clear_gen itself prints nothing (the CLI renders these).

    Phases: "load", "encode", "compile" (attention kernels, the first time a size runs in this
    process; it ends with the stage's first step), "compare" (timing full attention), "decode".
    """

    note: Callable[[str], None] = lambda text: None  # one line worth telling, e.g. why full attention
    phase: Callable[[str, str], None] = lambda name, detail: None  # a phase begins
    phase_done: Callable[[str, float], None] = lambda name, seconds: None
    stage_start: Callable[[int, int, Stage], None] = lambda i, n, stage: None  # stage i (from 0) of n
    step: Callable[[int, int, float], None] = lambda done, total, seconds: None  # a step ended
    saved: Callable[[Path, float], None] = lambda path, seconds: None  # a PNG was written
    image_done: Callable[[ImageResult], None] = lambda result: None


def generate(opts: GenerateOptions, hooks: Hooks | None = None) -> list[ImageResult]:
    """Generate one image per prompt and seed; each is saved as soon as it is done (see module docstring).

    Under torchrun every rank calls this (parallel.py says what each does): rank 0 returns every image's
    result, in data mode gathered from all ranks, and the other ranks return [].
    """
    started = time.perf_counter()
    hooks = hooks or Hooks()
    # 1. Check everything the user gave before loading gigabytes (under torchrun: every rank, agreed).
    world, device = parallel.start(opts.parallel, opts.device)
    prompts, seeds, dtype, choice, stages, world = world.agree(lambda: _check(opts, world, device))
    seeds = world.from_rank0(seeds)  # random seeds: rank 0's
    for note in (choice.note, world.describe(len(prompts) * len(seeds))):
        if note:
            hooks.note(note)
    # 2. Load, then generate; GPU memory can run out anywhere in there.
    try:
        return _load_and_generate(opts, hooks, prompts, seeds, choice, stages, device, dtype, started, world)
    except torch.cuda.OutOfMemoryError as e:
        raise world.own(_out_of_memory()) from e


def _out_of_memory() -> DeviceError:
    return DeviceError("out of GPU memory: try --offload model or a smaller size")


def _check(opts: GenerateOptions, world: parallel.World, device: torch.device) -> tuple:
    """(prompts, seeds, dtype, attention choice, stages, world with its mode decided), or a ClearGenError."""
    from .hub import check_run_weights

    prompts = [p.strip() for p in opts.prompts]
    if not prompts or not all(prompts):
        raise ConfigError("the prompt is empty: give a PROMPT or a --prompts-file with one prompt a line")
    dtype = resolve_dtype(opts.dtype, device)
    choice = resolve_clear(opts)
    stages = plan_stages(opts, choice)
    seeds = image_seeds(opts.seeds, opts.count)
    world = world.decide(len(prompts) * len(seeds))
    if world.writes:
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
    return prompts, seeds, dtype, choice, stages, world


def _load_and_generate(
    opts, hooks, prompts, seeds, choice, stages, device, dtype, started, world
) -> list[ImageResult]:
    # 1. The pipeline, its CLEAR weights and this rank's prompts encoded (agreed: a failure ends every rank).
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    mine = list(dict.fromkeys(jobs[i][0] for i in world.my_jobs(len(jobs)) if i is not None))
    run, embeds = world.agree(lambda: _load(opts, hooks, mine, choice, stages, device, dtype, world))
    embeds = {p: tuple(world.share(t) for t in e) for p, e in embeds.items()}  # sequence mode: rank 0's
    run.mark = started
    # 2. Every job of this rank: its stages, then save (each image as soon as it is done); in data mode
    #    rank 0 reports every rank's images, a round at a time, in job order.
    results = []
    try:
        for index in world.my_jobs(len(jobs)):
            for result in world.collect(lambda i=index: _job(run, jobs, embeds, i)):
                results.append(result)
                hooks.image_done(result)
    except ClearGenError as e:
        failure = world.own(e)  # sequence mode: this rank's alone, named by rank
        if failure is e:
            raise
        raise failure from e
    finally:
        remove_clear(run.pipe.transformer)
    return results


def _load(opts, hooks, prompts, choice, stages, device, dtype, world) -> tuple[_Run, dict[str, tuple]]:
    """The pipeline and CLEAR weights (as _Run) and each prompt's embeddings. No collectives in here: it
    runs inside World.agree, whose own collective follows it on every rank."""
    clear = f" with CLEAR {choice.label if choice.label != 'custom' else f'r={choice.window}'}"
    hooks.phase("load", f"FLUX.1 {opts.model}" + (clear if choice.window else ""))
    t0 = now(device)
    weights = clear_weights_file(choice, opts.token)
    state_dict = load_clear_weights(weights) if weights is not None else None
    pipe = load_pipeline(opts, device, dtype)
    if max(opts.width, opts.height) > 2048:
        pipe.vae.enable_tiling()
    img2img = img2img_pipeline(pipe) if len(stages) > 1 else None
    heads = pipe.transformer.config.num_attention_heads
    shards = parallel.SequenceShards(world, heads) if world.sequence and choice.window else None
    load_s = now(device) - t0
    hooks.phase_done("load", load_s)
    max_len = opts.max_sequence_length or (256 if "schnell" in str(opts.model).lower() else 512)
    hooks.phase("encode", f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}")
    t0 = now(device)
    embeds = dict(zip(prompts, _encode(pipe, prompts, device, max_len, opts.offload), strict=True))
    encode_s = now(device) - t0
    hooks.phase_done("encode", encode_s)
    if state_dict is not None and opts.offload == "none":  # once the text encoders have left the GPU
        t0 = now(device)
        state_dict = place_clear_weights(state_dict, pipe.transformer, max(s.tokens for s in stages))
        load_s += now(device) - t0
    setup_s = (load_s, encode_s)
    run = _Run(pipe, img2img, opts, choice, stages, state_dict, device, hooks, world, shards, setup_s)
    return run, embeds


def _job(run: _Run, jobs: list[tuple[str, int]], embeds: dict, index: int | None) -> ImageResult | None:
    """Job `index` (None: this rank has none this round): its image, or None on a rank that does not save it.

    The first image a rank makes carries that rank's load and encode times."""
    if index is None:
        return None
    prompt, seed = jobs[index]
    timing = RunTiming(*run.setup_s) if run.made == 0 else RunTiming()
    timing.gpus, timing.parallel = run.world.size, run.world.mode
    try:
        result = _one_image(run, embeds[prompt], prompt, seed, timing, run.mark)
    except torch.cuda.OutOfMemoryError as e:
        raise _out_of_memory() from e
    run.mark += timing.total_s  # the next image's time starts where this one's ended
    run.made += 1
    if result is not None and run.world.mode != "none":
        result.job = index
    return result


def _attention_label(choice: ClearChoice, stage: Stage) -> str:
    if not stage.clear:
        return "full"
    return f"CLEAR r={choice.window}" + (f" f={choice.down_factor}" if choice.down_factor > 1 else "")


@dataclass
class _Run:
    """What every image of a run shares."""

    pipe: Any  # FluxPipeline
    img2img: Any  # FluxImg2ImgPipeline sharing pipe's modules; None with one stage
    opts: GenerateOptions
    choice: ClearChoice
    stages: list[Stage]
    state_dict: dict[str, torch.Tensor] | None
    device: torch.device
    hooks: Hooks
    world: parallel.World = field(default_factory=parallel.World)
    shards: parallel.SequenceShards | None = None  # sequence mode: head-parallel CLEAR over the ranks
    setup_s: tuple[float, float] = (0.0, 0.0)  # loading and encoding: the rank's first image carries them
    mark: float = 0.0  # where the next image's wall time begins
    made: int = 0  # images this rank has made


def _one_image(
    run: _Run, emb, prompt: str, seed: int, timing: RunTiming, started: float
) -> ImageResult | None:
    """Every stage of one image (each decoded: the next starts from its image), then its PNG (None on the
    ranks that do not save it).

    `started`: where this image's wall time begins (the run's start for the first image).
    """
    image, stage_paths, save_s, hooks, n = None, [], 0.0, run.hooks, len(run.stages)
    for i, stage in enumerate(run.stages):
        hooks.stage_start(i, n, stage)
        latents, stage_timing = _stage(run, stage, emb, image, seed)
        timing.stages.append(stage_timing)
        if i == n - 1 and not run.world.writes:
            timing.total_s = time.perf_counter() - started
            return None  # sequence mode: rank 0 alone decodes and saves the image
        hooks.phase("decode", f"{stage.width}x{stage.height}")
        t0 = now(run.device)
        image = _decode(run.pipe, latents, stage)
        stage_timing.decode_s = now(run.device) - t0
        hooks.phase_done("decode", stage_timing.decode_s)
        if run.opts.keep_stages and i < n - 1 and run.world.writes:
            record = _record(run, prompt, seed, run.stages[: i + 1], timing, started)
            path, seconds = _save(image, record, run)
            stage_paths.append(path)
            save_s += seconds
    record = _record(run, prompt, seed, run.stages, timing, started)
    path, seconds = _save(image, record, run)
    timing.save_s = save_s + seconds
    timing.total_s = time.perf_counter() - started
    return ImageResult(path, record, timing, stage_paths)


def _stage(run: _Run, stage: Stage, emb, image, seed: int) -> tuple[torch.Tensor, StageTiming]:
    """One stage's denoising, every step timed: (packed latents, its StageTiming)."""
    transformer, opts, device, hooks = run.pipe.transformer, run.opts, run.device, run.hooks
    choice = run.choice
    # 1. Attention for this stage: the original model, or CLEAR with the stage's NTK and scale.
    kwargs = {**clear_kwargs(opts, choice, stage, run.state_dict), "parallel": run.shards}
    if stage.clear:
        apply_clear(transformer, **kwargs)
    else:
        remove_clear(transformer)
    geo = _geometry(stage, choice, emb[0].shape[1]) if stage.clear else None  # emb[0]: (1, T, D)
    compiling = _first_run(geo, opts.backend, device, transformer.dtype)
    # 2. Denoise, timing every step.
    if compiling:
        hooks.phase("compile", f"{stage.width}x{stage.height}")
    clock = StepClock(device, _on_step(hooks, stage.denoising_steps, compiling))
    with capture_transformer_call(transformer) as inputs, clock.watching(transformer):
        latents = _run_stage(run.pipe, run.img2img, stage, emb, image, seed, opts, clock)
    timing = _timing(stage, choice, clock, geo)
    timing.gpus = run.world.size if run.shards is not None and stage.clear else 1  # stock stages: replicated
    # 3. Full attention at this size, warm (and a warm CLEAR step when the stage had only one).
    if opts.compare_full and geo is not None:
        hooks.phase("compare", f"{stage.width}x{stage.height}")
        t0 = now(device)
        if timing.step_s is None:
            timing.step_s = time_step(transformer, inputs, device)
        time_full_attention(
            transformer, inputs, timing, geo, device, lambda kw=kwargs: apply_clear(transformer, **kw)
        )
        timing.compare_s = now(device) - t0
        hooks.phase_done("compare", timing.compare_s)
    elif not stage.clear:
        timing.full_step_s = timing.step_s
    return run.world.share(latents), timing  # sequence mode: rank 0's latents, so the ranks never drift


_FIRST_RUNS: set[tuple] = set()  # (geometry, device, dtype) whose flex kernels this process has compiled


def _first_run(geo: Geometry | None, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """True when this stage compiles attention kernels: flex, at a geometry new to this process."""
    if geo is None or resolve_backend(backend, device) != "flex":
        return False
    key = (geo, str(device), dtype)
    new = key not in _FIRST_RUNS
    _FIRST_RUNS.add(key)
    return new


def _on_step(hooks: Hooks, total: int, compiling: bool) -> Callable[[int, float], None]:
    def on_step(done: int, seconds: float) -> None:
        if compiling and done == 1:
            hooks.phase_done("compile", seconds)
        hooks.step(done, total, seconds)

    return on_step


def _geometry(stage: Stage, choice: ClearChoice, text_len: int) -> Geometry:
    return image_geometry(text_len, stage.height // 16, stage.width // 16, choice.window, choice.down_factor)


def _timing(stage: Stage, choice: ClearChoice, clock: StepClock, geo: Geometry | None) -> StageTiming:
    steps = clock.durations()
    timing = StageTiming(
        width=stage.width,
        height=stage.height,
        attention=_attention_label(choice, stage),
        steps=len(steps),
        seconds=clock.stamps[-1] - clock.started,
        step_s=clock.warm_step_seconds(),
        first_step_s=steps[0],
    )
    if geo is not None:  # a CLEAR stage
        timing.density = needed_pairs(geo) / (geo.q_len * geo.kv_len)
    return timing


def _save(image, record: output.ImageRecord, run: _Run) -> tuple[Path, float]:
    """Write the PNG; (its absolute path, seconds)."""
    t0 = time.perf_counter()
    path = Path(os.path.abspath(output.save_png(image, output.output_path(run.opts.out, record), record)))
    seconds = time.perf_counter() - t0
    run.hooks.saved(path, seconds)
    return path, seconds


def _record(
    run: _Run, prompt: str, seed: int, stages: list[Stage], timing: RunTiming, started: float
) -> output.ImageRecord:
    """What made the image of `stages` (all, or the first few for a kept stage): `--from` re-makes it.

    Its timings end where its own save begins: no save_s, and total_s up to there.
    """
    opts, choice = run.opts, run.choice
    last, clear, several = stages[-1], any(s.clear for s in stages), len(stages) > 1
    extra = {
        "first_steps": opts.first_steps if several else None,
        "first_guidance": opts.first_guidance if several else None,
        "ntk_factor": opts.ntk_factor,
        "proportional_attention": opts.proportional_attention,
        "max_sequence_length": opts.max_sequence_length,
        "clear_weights": os.path.abspath(opts.clear_weights) if clear and opts.clear_weights else None,
        "dtype": next(name for name, d in DTYPES.items() if d == run.pipe.transformer.dtype),
        "backend": opts.backend,
        "device": device_name(run.device),
    }
    model = Path(opts.model).expanduser()
    return output.ImageRecord(
        prompt=prompt,
        seed=seed,
        model=os.path.abspath(model) if model.is_dir() else opts.model,
        variant=choice.label if clear else "none",
        window=choice.window if clear else None,
        down_factor=choice.down_factor if clear else None,
        steps=last.steps,
        guidance=last.guidance,
        width=last.width,
        height=last.height,
        stages=[max(s.width, s.height) for s in stages],
        strength=opts.strength if several else None,
        timings=replace(
            timing, stages=timing.stages[: len(stages)], save_s=None, total_s=time.perf_counter() - started
        ).to_json(),
        extra={k: v for k, v in extra.items() if v is not None},
    )
