"""Generation: text-to-image at the first stage, then SDEdit stages with CLEAR, timed against full attention.

`generate(GenerateOptions(...))` is what `clear-gen PROMPT` calls. The default high-resolution recipe
follows CLEAR's reference: a first pass with the original weights and full attention at a long side of
1024 px, then img2img at the target with CLEAR (strength 0.7, 20 steps, guidance 7.5, sigmas
linspace(1, 1/steps, steps), static shift, NTK factor 10, proportional attention, VAE tiling).
At or below 1024 px the default is the original model alone: CLEAR is no faster there.

Here a run is checked (every argument, picture and weight file, and its memory plan) before anything
heavy loads, then loaded once and its jobs made one by one (under torchrun, spread over the ranks as
parallel.py says); render.py makes each image, its stages timed and its PNG saved.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import gpus, output, parallel
from . import quantize as Q
from .attention import remove_clear
from .chunking import chunk_feed_forward
from .control import (
    ControlSpec,
    check_base,
    check_cached_config,
    check_unchanged,
    control_record,
    parse_control,
    read_control_image,
)
from .device import resolve_dtype
from .errors import ClearGenError, ConfigError, DeviceError
from .loading import (
    check_transformer_file,
    clear_weights_file,
    img2img_pipeline,
    load_clear_weights,
    load_pipeline,
    place_clear_weights,
    prepared_pipeline,
)
from .lora import hub_files, parse_loras
from .memory import RunPlan, plan_run
from .plan import (
    MAX_SIDE,
    ClearChoice,
    GenerateOptions,
    Stage,
    image_seeds,
    plan_stages,
    plan_upscale,
    resolve_clear,
    size_multiple,
    text_tokens,
)
from .render import Hooks, ImageResult, Job, Run, make_image
from .source import Source, UpscaleTarget, check_larger, image_files, load_source
from .speed import compile_blocks
from .timing import RunTiming, now

# ---------------------------------------------------------------- generation


def _encode(pipe, prompts: list[str], device, max_len: int, offload: str) -> list[tuple]:
    """(prompt_embeds, pooled) per prompt; then text encoders leave the GPU for the transformer's room."""
    if device.type == "cuda" and offload == "none" and pipe.text_encoder.device != device:
        pipe.text_encoder.to(device)  # a reused pipeline (reuse_loaded): an earlier run sent them away
        pipe.text_encoder_2.to(device)
    with torch.no_grad():
        out = [pipe.encode_prompt(p, None, device=device, max_sequence_length=max_len)[:2] for p in prompts]
    if device.type == "cuda" and offload == "none":  # with offload, accelerate moves them itself
        pipe.text_encoder.to("cpu")
        pipe.text_encoder_2.to("cpu")
        torch.cuda.empty_cache()
    return out


def generate(opts: GenerateOptions, hooks: Hooks | None = None, pipe: Any = None) -> list[ImageResult]:
    """Generate one image per prompt and seed; each is saved as soon as it is done (see module docstring).

    `pipe`: a FluxPipeline already built on opts.device (`bench --what image`: random weights); nothing
    is then loaded, no weights are checked and no memory plan made; the rest is the same code path.
    Under torchrun every rank calls this (parallel.py says what each does): rank 0 returns every image's
    result, in data mode gathered from all ranks, and the other ranks return [].
    """
    started = time.perf_counter()
    hooks = hooks or Hooks()
    # 1. Check everything the user gave before loading gigabytes (under torchrun: every rank, agreed).
    world, device = parallel.start(opts.parallel, opts.device)
    jobs, choice, dtype, opts, plan, world = world.agree(lambda: _check(opts, world, device, hooks, pipe))
    return _run_jobs(opts, hooks, jobs, choice, device, dtype, started, plan, world, pipe)


def _check(opts: GenerateOptions, world: parallel.World, device, hooks: Hooks, pipe) -> tuple:
    """(jobs, attention choice, dtype, opts with the offload decided, memory plan, world with its mode
    decided), or a ClearGenError."""
    prompts = [p.strip() for p in opts.prompts]
    if not prompts or not all(prompts):
        raise ConfigError("the prompt is empty: give a PROMPT or a --prompts-file with one prompt a line")
    dtype = resolve_dtype(opts.dtype, device)
    choice = resolve_clear(opts)
    stages = plan_stages(opts, choice)
    seeds = image_seeds(opts.seeds, opts.count)
    control = parse_control(opts)
    picture = read_control_image(control.image, hooks.note) if control is not None else None
    if picture is not None:
        check_unchanged(picture, opts.control_sha256, hooks.note)
    info = control_record(control, picture) if control is not None else None
    world = world.decide(len(prompts) * len(seeds))
    if world.writes:
        probe = output.ImageRecord(prompt=prompts[0], seed=seeds[0], model=opts.model, steps=1, guidance=0.0,
                                   width=opts.width, height=opts.height)  # fmt: skip
        output.release(output.output_path(opts.out, probe))  # fails now, not after an hour, if unwritable
    if pipe is None:
        opts, plan = _prepare(opts, choice, device, hooks)
    else:
        plan = None
        if choice.note:
            hooks.note(choice.note)
    image = picture.image if picture is not None else None
    jobs = [Job(p, seed, stages, control=image, control_info=info) for p in prompts for seed in seeds]
    return jobs, choice, dtype, opts, plan, world


def upscale(
    opts: GenerateOptions,
    inputs: list[str | Path],
    target: UpscaleTarget | None = None,
    hooks: Hooks | None = None,
) -> list[ImageResult]:
    """Take existing pictures to a larger size with CLEAR's SDEdit stages: generate's code path, the first
    stage starting from each picture instead of a text-to-image pass. `opts.prompts`: [] (each picture's
    own prompt from its metadata, else none) or [prompt]; `opts.stages`: long sides after the picture."""
    started = time.perf_counter()
    hooks = hooks or Hooks()
    world, device = parallel.start(opts.parallel, opts.device)
    return _run_jobs(
        *world.agree(lambda: _check_upscale(opts, inputs, target, world, device, hooks, started))
    )


def _check_upscale(
    opts, inputs, target, world: parallel.World, device, hooks: Hooks, started: float
) -> tuple:
    """Read every picture, then plan every image, before loading gigabytes: _run_jobs' arguments."""
    dtype = resolve_dtype(opts.dtype, device)
    jobs, choice = upscale_jobs(opts, inputs, target, hooks)
    world = world.decide(len(jobs))
    largest = max(jobs, key=lambda job: job.stages[-1].tokens)
    last = largest.stages[-1]
    probe = output.ImageRecord(prompt=largest.prompt, seed=largest.seed, model=opts.model, steps=1,
                               guidance=0.0, width=last.width, height=last.height)  # fmt: skip
    if world.writes:
        output.release(output.output_path(opts.out, probe))  # fails now, not after an hour, if unwritable
    planned = replace(opts, width=last.width, height=last.height)  # the largest picture's plan
    opts, plan = _prepare(opts, choice, device, hooks, planned, largest.stages)
    return opts, hooks, jobs, choice, device, dtype, started, plan, world


def upscale_jobs(
    opts: GenerateOptions, inputs: list[str | Path], target: UpscaleTarget | None, hooks: Hooks | None = None
) -> tuple[list[Job], ClearChoice]:
    """The jobs of an upscale (every picture read, every size and stage checked) and its attention."""
    hooks, target = hooks or Hooks(), target or UpscaleTarget()
    if opts.stages and target == UpscaleTarget():  # no size given: the last stage is the target
        target = UpscaleTarget(res=opts.stages[-1])
    sources = _read_sources([Path(p) for p in inputs], hooks)
    control = parse_control(opts, own_picture=True)
    picture = read_control_image(control.image, hooks.note) if control is not None and control.image else None
    control_info = control_record(control, picture) if control is not None else None
    choice = resolve_clear(replace(opts, width=MAX_SIDE, height=MAX_SIDE))  # the variant, if any
    sized = [(src, *target.size(src.size, size_multiple(choice.down_factor))) for src in sources]
    largest = max(sized, key=lambda s: s[1] * s[2])
    choice = resolve_clear(replace(opts, width=largest[1], height=largest[2]))  # none at <= 1024 px
    seeds = image_seeds(opts.seeds, opts.count)
    jobs = []
    for src, w, h, note in sized:
        check_larger(src.size, (w, h), src.path)
        stages = plan_upscale(replace(opts, width=w, height=h), choice)
        prompt = _source_prompt(opts, src, hooks)
        for text in [*src.notes, note]:
            if text:
                hooks.note(f"{src.path.name}: {text}")
        info = {"file": src.path.name, "sha256": src.sha256, "width": src.size[0], "height": src.size[1]}
        own = (picture.image if picture is not None else src.image) if control is not None else None
        jobs += [Job(prompt, seed, stages, src.image, info, own, control_info) for seed in seeds]
    return jobs, choice


def upscale_plans(opts: GenerateOptions, inputs: list[str | Path], target: UpscaleTarget | None) -> list:
    """`upscale --dry-run`: (picture, memory plan) per picture, loading no weights."""
    from .memory import plan_run

    jobs, _ = upscale_jobs(replace(opts, seeds=[0], count=1), inputs, target)
    return [(job.source["file"], plan_run(replace(opts, width=job.stages[-1].width,
             height=job.stages[-1].height), stages=job.stages)) for job in jobs]  # fmt: skip


def _prepare(
    opts: GenerateOptions,
    choice: ClearChoice,
    device,
    hooks: Hooks,
    planned: GenerateOptions | None = None,
    stages: list[Stage] | None = None,
) -> tuple[GenerateOptions, RunPlan]:
    """Before loading: the memory plan (offload decided, what cannot fit refused; `planned` and `stages`:
    what it plans for, if not generate's run of opts), the device can run the quantization, every weight
    file is there or fetchable. Returns opts with the offload decided, and the plan."""
    from .hub import check_run_weights

    plan = _memory_plan(planned or opts, device, hooks, stages)  # offload, chunking; refuses what cannot fit
    opts = replace(opts, offload=plan.offload)
    Q.check_device(opts.quantize, opts.quantize_text, device, opts.offload, gguf=opts.transformer is not None)
    loras = hub_files(parse_loras(opts.loras or [], opts.lora_files or []))  # (repo, file) from the Hub
    control = parse_control(opts, own_picture=True)  # the run checked --control itself
    if control is not None:
        check_base(control, opts.model)
    hub_net = control.net if control is not None and control.folder is None else None
    check_run_weights(
        opts.model, choice.hub_variant, transformer=opts.transformer, loras=loras, controlnet=hub_net
    )  # or fetchable
    check_transformer_file(opts)  # a GGUF --transformer on disk: whole, and a transformer of this base
    if control is not None:  # its config against the base's, when both are on disk
        check_cached_config(control, _transformer_config(opts.model))
    if choice.note:
        hooks.note(choice.note)
    return opts, plan


def _transformer_config(model: str) -> dict:
    """The base's transformer config as far as a ControlNet must match it (shapes.py: no weights read)."""
    from dataclasses import asdict

    from .shapes import model_shapes

    return asdict(model_shapes(model).transformer)


def _read_sources(inputs: list[Path], hooks: Hooks) -> list[Source]:
    """Every input picture; one a folder holds that cannot be read is skipped with a note."""
    files, notes = image_files(inputs)
    sources = []
    for path, from_folder in files:
        try:
            sources.append(load_source(path))
        except ConfigError as e:
            if not from_folder:
                raise
            notes.append(f"skipped: {e}")
    for note in notes:
        hooks.note(note)
    if not sources:
        raise ConfigError(f"no image to upscale in {', '.join(map(str, inputs))} (PNG, JPEG or WebP)")
    return sources


def _source_prompt(opts: GenerateOptions, src: Source, hooks: Hooks) -> str:
    """The prompt given, else the one the picture's metadata holds, else none (said once per picture)."""
    if opts.prompts and opts.prompts[0].strip():
        return opts.prompts[0].strip()
    if src.prompt:
        hooks.note(f"{src.path.name}: prompt from its {src.prompt_from} metadata: {src.prompt[:60]!r}")
        return src.prompt
    hooks.note(
        f"{src.path.name}: no prompt given or found in it; a prompt describing the picture usually helps"
    )
    return ""


def _run_jobs(
    opts, hooks, jobs: list[Job], choice, device, dtype, started, plan, world, pipe=None
) -> list[ImageResult]:
    """Load once (unless given `pipe`), then make every job's image; GPU memory can run out anywhere."""
    note = world.describe(len(jobs))
    if note:
        hooks.note(note)
    seeds = world.from_rank0([job.seed for job in jobs])  # random seeds: rank 0's
    jobs = [replace(job, seed=seed) for job, seed in zip(jobs, seeds, strict=True)]
    try:
        return _load_and_generate(opts, hooks, jobs, choice, device, dtype, started, plan, world, pipe)
    except torch.cuda.OutOfMemoryError as e:
        raise world.own(_out_of_memory(plan)) from e


def _out_of_memory(plan: RunPlan | None) -> DeviceError:
    planned = f" (planned peak {plan.peak_gb:.1f} GB with --offload {plan.offload})" if plan else ""
    return DeviceError(f"out of GPU memory{planned}: try --offload model or sequential, or a smaller size")


def _memory_plan(opts: GenerateOptions, device: torch.device, hooks: Hooks, stages=None) -> RunPlan:
    """The run's memory plan (memory.py), before loading: a device problem or a run that cannot fit even
    with sequential offload is refused now; on a GPU the offload decision is announced in one line."""
    plan = plan_run(opts, assume_gpu=False, stages=stages)
    if plan.problems:
        raise DeviceError(plan.problems[0])
    if not plan.fits_any:
        raise DeviceError(plan.cannot_fit_line())
    if plan.gpu:
        if opts.gpu_memory is not None:
            gpus.limit_memory(device, opts.gpu_memory)
        hooks.note(plan.offload_line())
    return plan


def _load_and_generate(
    opts, hooks, jobs: list[Job], choice, device, dtype, started, plan, world, pipe=None
) -> list[ImageResult]:
    # 1. The pipeline, its CLEAR weights and this rank's prompts encoded (agreed: a failure ends every rank).
    mine = [jobs[i] for i in world.my_jobs(len(jobs)) if i is not None]
    run, embeds = world.agree(
        lambda: _load(opts, hooks, jobs, mine, choice, device, dtype, plan, world, pipe)
    )
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
        if run.control is not None:
            remove_clear(run.pipe.controlnet)
    return results


def _load(opts, hooks, jobs, mine, choice, device, dtype, plan, world, pipe) -> tuple[Run, dict[str, tuple]]:
    """The pipeline and CLEAR weights (as Run) and the embeddings of this rank's prompts (`mine`: its jobs).
    No collectives in here: it runs inside World.agree, whose own collective follows it on every rank."""
    clear = f" with CLEAR {choice.label if choice.label != 'custom' else f'r={choice.window}'}"
    quantized = Q.label(opts.quantize, opts.quantize_text, opts.transformer)
    control = parse_control(opts, own_picture=True)
    net = f", ControlNet {control.source}" if control is not None else ""
    hooks.phase("load", f"FLUX.1 {opts.model}{quantized}" + (clear if choice.window else "") + net)
    t0 = now(device)
    weights = clear_weights_file(choice, opts.token)
    state_dict = load_clear_weights(weights) if weights is not None else None
    pipe = _pipeline(opts, device, dtype, control) if pipe is None else prepared_pipeline(pipe, opts)
    chunk_feed_forward(pipe.transformer, plan.ff_chunk if plan else None)  # the plan's slices (None: whole)
    if opts.compile:
        compile_blocks(pipe.transformer)  # compiles lazily: the first step of each stage pays
    img2img = img2img_pipeline(pipe) if any(s.sdedit for job in jobs for s in job.stages) else None
    load_s = now(device) - t0
    hooks.phase_done("load", load_s)
    prompts = list(dict.fromkeys(job.prompt for job in mine)) or [jobs[0].prompt]
    heads = pipe.transformer.config.num_attention_heads
    shards = parallel.SequenceShards(world, heads) if world.sequence and choice.window else None
    hooks.phase("encode", f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}")
    t0 = now(device)
    embeds = dict(zip(prompts, _encode(pipe, prompts, device, text_tokens(opts), opts.offload), strict=True))
    encode_s = now(device) - t0
    hooks.phase_done("encode", encode_s)
    if state_dict is not None and opts.offload == "none":  # once the text encoders have left the GPU
        t0 = now(device)
        activations = plan.activation_bytes if plan else 0
        state_dict = place_clear_weights(state_dict, pipe.transformer, activations)
        load_s += now(device) - t0
    run = Run(pipe, img2img, opts, choice, state_dict, device, hooks, plan, world, shards, (load_s, encode_s))
    run.control = control
    return run, embeds


_REUSED: dict[tuple, Any] | None = None  # inside reuse_loaded: loading options -> the pipeline loaded


@contextmanager
def reuse_loaded() -> Iterator[None]:
    """Inside, a run keeps the pipeline it loads, and a later run with the same loading options (base,
    device, dtype, quantization, GGUF file, LoRAs, ControlNet, offload) uses it again instead of loading it
    from disk: `compare` loads once for all its variants. Every run leaves the pipeline as loaded (CLEAR
    removed, its weights restored); on exit the pipelines are let go."""
    global _REUSED
    outer, _REUSED = _REUSED, {}
    try:
        yield
    finally:
        _REUSED = outer


def _pipeline(opts: GenerateOptions, device, dtype, control: ControlSpec | None):
    """load_pipeline, or inside reuse_loaded the pipeline an earlier run loaded with the same options."""
    if _REUSED is None:
        return load_pipeline(opts, device, dtype, control)
    loras = tuple(opts.loras or ()), tuple(opts.lora_files or ())
    key = (opts.model, str(device), dtype, opts.quantize, opts.quantize_text, opts.transformer, *loras,
           control, opts.offload, opts.token)  # fmt: skip
    if key not in _REUSED:
        _REUSED[key] = load_pipeline(opts, device, dtype, control)
    return _REUSED[key]


def _job(run: Run, jobs: list[Job], embeds: dict, index: int | None) -> ImageResult | None:
    """Job `index` (None: this rank has none this round): its image, or None on a rank that does not save it.

    The first image a rank makes carries that rank's load and encode times."""
    if index is None:
        return None
    job = jobs[index]
    timing = RunTiming(*run.setup_s) if run.made == 0 else RunTiming()
    timing.gpus, timing.parallel = run.world.size, run.world.mode
    try:
        result = make_image(run, job, embeds[job.prompt], timing, run.mark)
    except torch.cuda.OutOfMemoryError as e:
        raise _out_of_memory(run.plan) from e
    run.mark += timing.total_s  # the next image's time starts where this one's ended
    run.made += 1
    if result is not None and run.world.mode != "none":
        result.job = index
    return result
