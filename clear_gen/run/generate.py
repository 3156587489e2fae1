"""Generation: text-to-image at the first stage, then SDEdit stages with CLEAR, timed against full attention.

`generate(GenerateOptions(...))` is what `clear-gen PROMPT` calls. The default high-resolution recipe
follows CLEAR's reference (recipe.py): a first pass with the original weights and full attention at a
long side of 1024 px, then img2img at the target with CLEAR. At or below 1024 px the default is the
original model alone: CLEAR is no faster there.

Here a run is parsed once (plan.parse), checked (every picture and weight file, and its memory plan)
before anything heavy loads, then loaded once and its jobs made one by one (under torchrun, spread over
the ranks as parallel.py says); render.py makes each image, its stages timed and its PNG saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from .. import models
from ..attention import remove_clear
from ..attention.weights import cpu_copies
from ..core.clock import now
from ..core.device import dtype_note, resolve_dtype
from ..errors import ClearGenError, ConfigError, DeviceError
from ..files import output
from ..files.record import ImageRecord, RunTiming
from ..plan import gpus
from ..plan.footprint import HEADROOM, RunPlan
from ..plan.memory import plan_run
from ..plan.offload import offload_on_cpu
from ..plan.parse import parse
from ..plan.spec import GenerateOptions, RunSpec
from ..weights import quantize as Q
from ..weights.control import check_base, check_cached_config, control_record
from ..weights.loading import (
    check_transformer_file,
    clear_weights_file,
    img2img_pipeline,
    load_clear_weights,
    load_pipeline,
    prepared_pipeline,
)
from ..weights.spec import WeightsSpec
from . import world as parallel
from .measure import StockSteps
from .render import Hooks, ImageResult, Job, Run, make_image
from .speed import compile_blocks


@dataclass(frozen=True)
class Prepared:
    """A run checked before loading: its spec, jobs, where it runs and its memory plan."""

    spec: RunSpec
    jobs: list[Job]
    device: torch.device
    dtype: torch.dtype
    world: parallel.World  # its mode decided
    plan: RunPlan | None  # None: a pipeline built elsewhere (bench --what image)
    offload: str  # decided: none | model | sequential


class LoadedPipelines:
    """Pipelines kept loaded for several runs: a run given one loads through it, and a later run with the
    same weights, device, dtype and offload gets the pipeline loaded before instead of reading it from disk
    again (`compare` loads once for all its variants), and the full-attention steps timed on it. Every run
    leaves a pipeline as loaded: CLEAR removed, its weights restored. Let it go to free them."""

    def __init__(self) -> None:
        self._loaded: dict[tuple, tuple[Any, StockSteps]] = {}

    def get(self, weights: WeightsSpec, device: torch.device, dtype: torch.dtype, offload: str):
        """(pipeline, its StockSteps)."""
        key = (weights, str(device), dtype, offload)
        if key not in self._loaded:
            self._loaded[key] = load_pipeline(weights, offload, device, dtype), StockSteps()
        return self._loaded[key]


# ---------------------------------------------------------------- generation


def generate(
    opts: GenerateOptions | RunSpec,
    hooks: Hooks | None = None,
    pipe: Any = None,
    pipelines: LoadedPipelines | None = None,
) -> list[ImageResult]:
    """Generate one image per prompt and seed; each is saved as soon as it is done (see module docstring).

    `opts`: what is asked, parsed here, or a spec parsed already (compare's variants).

    `pipe`: a FluxPipeline already built on opts.device (`bench --what image`: random weights); nothing
    is then loaded, no weights are checked and no memory plan made; the rest is the same code path.
    `pipelines`: load through it (and reuse what it holds). Under torchrun every rank calls this
    (parallel.py says what each does): rank 0 returns every image's result, in data mode gathered from all
    ranks, and the other ranks return [].
    """
    started = time.perf_counter()
    hooks = hooks or Hooks()
    # 1. Check everything the user gave before loading gigabytes (under torchrun: every rank, agreed).
    settings = opts.settings if isinstance(opts, RunSpec) else opts
    world, device = parallel.start(settings.parallel, settings.device)
    prepared = world.agree(lambda: _check(opts, world, device, hooks, pipe))
    return run_jobs(prepared, hooks, started, pipe, pipelines)


def _check(opts: GenerateOptions | RunSpec, world: parallel.World, device, hooks: Hooks, pipe) -> Prepared:
    """The run parsed and checked, or a ClearGenError."""
    spec = opts if isinstance(opts, RunSpec) else parse(opts, hooks.note)
    dtype = run_dtype(spec, device, hooks)
    control = spec.weights.controlnet
    info = control_record(control) if control is not None else None
    picture = control.picture.image if control is not None and control.picture is not None else None
    world = world.decide(len(spec.prompts) * len(spec.seeds))
    check_sequence(spec, world, spec.stages)
    if world.writes:
        probe_output(spec, spec.prompts[0], spec.seeds[0], spec.width, spec.height)
    if pipe is None:
        plan, offload = prepare(spec, device, hooks)
    else:
        plan, offload = None, "none"  # placed by whoever built it
        if spec.attention.note:
            hooks.note(spec.attention.note)
    reference = spec.edit.source.image if spec.edit is not None else None  # an edit's picture
    jobs = [
        Job(p, seed, spec.stages, control=picture, control_info=info, reference=reference)
        for p in spec.prompts
        for seed in spec.seeds
    ]
    return Prepared(spec, jobs, device, dtype, world, plan, offload)


def run_dtype(spec: RunSpec, device: torch.device, hooks: Hooks) -> torch.dtype:
    """The run's dtype on this device, with a note when the device's default had to change (MPS without
    bf16)."""
    note = dtype_note(spec.settings.dtype, device)
    if note:
        hooks.note(note)
    return resolve_dtype(spec.settings.dtype, device)


def check_sequence(spec: RunSpec, world: parallel.World, stages) -> None:
    """Sequence mode: the ranks split the model's heads (its config, read before loading); it runs no edit."""
    from ..weights.shapes import model_shapes

    if world.sequence and any(s.reference for s in stages):
        raise ConfigError("torchrun's sequence mode does not run an edit yet: use --parallel data")
    if world.sequence and any(s.clear for s in stages):
        config = model_shapes(spec.weights.model).transformer
        parallel.check_heads(world, models.family(spec.weights.family).flop_shape(config).heads)


def probe_output(spec: RunSpec, prompt: str, seed: int, width: int, height: int) -> None:
    """Fail now, not after an hour, if the output cannot be written."""
    probe = ImageRecord(prompt=prompt, seed=seed, model=spec.weights.model, steps=1, guidance=0.0,
                               width=width, height=height)  # fmt: skip
    output.output_path(spec.output.out, probe)  # reserved nowhere: nothing to release


def prepare(spec: RunSpec, device, hooks: Hooks, stages=None) -> tuple[RunPlan, str]:
    """Before loading: the memory plan (offload decided, what cannot fit refused; `stages`: what it plans
    for, if not generate's), the device can run the quantization, every weight file is there or
    fetchable. Returns the plan and the decided offload."""
    from ..weights.download import check_run_weights
    from ..weights.hub import check_model_folder, local_model

    weights, control = spec.weights, spec.weights.controlnet
    local = local_model(weights.model)
    if local is not None:  # a folder that is not a model: planning it would be planning FLUX.1-dev
        check_model_folder(local)
    if control is not None:
        check_base(control, weights.model)
    plan = _memory_plan(spec, device, hooks, stages)  # offload, chunking; refuses what cannot fit
    Q.check_device(weights.quantize, weights.quantize_text, device, plan.offload, gguf=weights.gguf)
    hub_net = control.net if control is not None and control.folder is None else None
    loras = [(s.source, s.file) for s in weights.loras if s.file is not None]  # from the Hub
    check_run_weights(
        weights.model,
        spec.attention.hub_variant,
        transformer=weights.transformer,
        loras=loras,
        controlnet=hub_net,
    )  # or fetchable
    check_transformer_file(weights)  # a GGUF --transformer on disk: whole, and a transformer of this base
    if control is not None:  # its config against the base's, when both are on disk
        check_cached_config(control, _transformer_config(weights.model), weights.family)
    if spec.attention.note:
        hooks.note(spec.attention.note)
    return plan, plan.offload


def _transformer_config(model: str) -> dict:
    """The base's transformer config as far as a ControlNet must match it (shapes.py: no weights read)."""
    from dataclasses import asdict

    from ..weights.shapes import model_shapes

    return asdict(model_shapes(model).transformer)


def run_jobs(
    prepared: Prepared, hooks: Hooks, started: float, pipe=None, pipelines: LoadedPipelines | None = None
) -> list[ImageResult]:
    """Load once (unless given `pipe`), then make every job's image; GPU memory can run out anywhere."""
    world = prepared.world
    note = world.describe(len(prepared.jobs))
    if note:
        hooks.note(note)
    seeds = world.from_rank0([job.seed for job in prepared.jobs])  # random seeds: rank 0's
    jobs = [replace(job, seed=seed) for job, seed in zip(prepared.jobs, seeds, strict=True)]
    prepared = replace(prepared, jobs=jobs)
    try:
        return _load_and_generate(prepared, hooks, started, pipe, pipelines)
    except torch.cuda.OutOfMemoryError as e:
        raise world.own(_out_of_memory(prepared.plan)) from e


def _out_of_memory(plan: RunPlan | None) -> DeviceError:
    planned = f" (planned peak {plan.peak_gb:.1f} GB with --offload {plan.offload})" if plan else ""
    return DeviceError(f"out of GPU memory{planned}: try --offload model or sequential, or a smaller size")


def _memory_plan(spec: RunSpec, device: torch.device, hooks: Hooks, stages=None) -> RunPlan:
    """The run's memory plan (memory.py), before loading: a device problem or a run that cannot fit even
    with sequential offload is refused now; on a GPU the offload decision is announced in one line."""
    plan = plan_run(spec, assume_gpu=False, stages=stages)
    if plan.problems:
        raise DeviceError(plan.problems[0])
    if not plan.fits_any:
        raise DeviceError(plan.cannot_fit_line())
    if plan.gpu:
        if spec.settings.gpu_memory is not None:
            gpus.limit_memory(device, spec.settings.gpu_memory)
        hooks.note(plan.offload_line())
    if plan.unified and spec.settings.offload not in ("auto", "none"):
        hooks.note(offload_on_cpu(spec.settings.offload, device.type))
    return plan


def _load_and_generate(
    prepared: Prepared, hooks: Hooks, started: float, pipe, pipelines: LoadedPipelines | None
) -> list[ImageResult]:
    # 1. The pipeline, its CLEAR weights and this rank's prompts encoded (agreed: a failure ends every rank).
    world, jobs = prepared.world, prepared.jobs
    mine = [jobs[i] for i in world.my_jobs(len(jobs)) if i is not None]
    run, embeds = world.agree(lambda: _load(prepared, hooks, mine, pipe, pipelines))
    embeds = {p: {k: world.share(t) for k, t in e.items()} for p, e in embeds.items()}  # sequence: rank 0's
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
        if run.spec.weights.controlnet is not None:
            remove_clear(run.pipe.controlnet)
    return results


def _load(
    prepared: Prepared, hooks: Hooks, mine: list[Job], pipe, pipelines: LoadedPipelines | None
) -> tuple[Run, dict[str, tuple]]:
    """The pipeline and CLEAR weights (as Run) and the embeddings of this rank's prompts (`mine`: its jobs).
    No collectives in here: it runs inside World.agree, whose own collective follows it on every rank."""
    spec, device, dtype, plan, offload = (
        prepared.spec, prepared.device, prepared.dtype, prepared.plan, prepared.offload
    )  # fmt: skip
    choice, weights = spec.attention, spec.weights
    hooks.phase("load", _load_label(spec))
    t0 = now(device)
    file = clear_weights_file(choice.hub_variant, choice.weights, weights.token)
    state_dict = load_clear_weights(file) if file is not None else None
    stock_steps = StockSteps()
    if pipe is not None:
        pipe = prepared_pipeline(pipe, weights.quantize)
    elif pipelines is not None:
        pipe, stock_steps = pipelines.get(weights, device, dtype, offload)
    else:
        pipe = load_pipeline(weights, offload, device, dtype)
    family = models.of(pipe.transformer)
    family.chunk_feed_forward(pipe.transformer, plan.ff_chunk if plan else None)  # the plan's (None: whole)
    if spec.settings.compile:
        compile_blocks(pipe.transformer)  # compiles lazily: the first step of each stage pays
    img2img = img2img_pipeline(pipe) if any(s.sdedit for job in prepared.jobs for s in job.stages) else None
    load_s = now(device) - t0
    hooks.phase_done("load", load_s)
    prompts = list(dict.fromkeys(job.prompt for job in mine)) or [prepared.jobs[0].prompt]
    world = prepared.world
    heads = family.flop_shape(pipe.transformer.config).heads
    shards = parallel.SequenceShards(world, heads, family) if world.sequence and choice.window else None
    _note_cut_prompts(family, pipe, prompts, spec.text_len, hooks)
    hooks.phase("encode", f"{len(prompts)} prompt{'s' if len(prompts) > 1 else ''}")
    t0 = now(device)
    embeds = dict(zip(prompts, _encode(family, pipe, prompts, device, spec.text_len, offload), strict=True))
    encode_s = now(device) - t0
    hooks.phase_done("encode", encode_s)
    if state_dict is not None and offload == "none":  # once the text encoders have left the GPU
        t0 = now(device)
        state_dict = place_clear_weights(state_dict, pipe.transformer, plan.activation_bytes if plan else 0)
        load_s += now(device) - t0
    run = Run(
        spec, pipe, img2img, state_dict, device, hooks, plan, offload, world, shards, (load_s, encode_s)
    )
    run.stock_steps = stock_steps
    return run, embeds


def _load_label(spec: RunSpec) -> str:
    """'FLUX.1 dev (transformer int8) with CLEAR r8-down4, ControlNet union': what the load phase loads."""
    label = models.family(spec.weights.family).LABEL
    choice, weights = spec.attention, spec.weights
    clear = f" with CLEAR {choice.label if choice.label != 'custom' else f'r={choice.window}'}"
    quantized = Q.label(weights.quantize, weights.quantize_text, weights.transformer)
    control = weights.controlnet
    net = f", ControlNet {control.source}" if control is not None else ""
    return f"{label} {weights.model}{quantized}" + (clear if choice.window else "") + net


def _note_cut_prompts(family, pipe, prompts: list[str], max_len: int, hooks: Hooks) -> None:
    """One note when a prompt is longer than the text encoders read (diffusers cuts it silently)."""
    cuts = [(p, cut) for p in prompts if (cut := family.prompt_cut(pipe, p, max_len))]
    if cuts:
        prompt, cut = cuts[0]
        more = f" (and {len(cuts) - 1} more prompts)" if len(cuts) > 1 else ""
        shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
        hooks.note(f"prompt {shown!r}{more} is cut: {cut} read; the rest does not reach the model")


def _encode(family, pipe, prompts: list[str], device, max_len: int, offload: str) -> list[dict]:
    """Each prompt's embeddings by name (the family's encode_prompt); then the text encoders leave the GPU
    for the transformer's room."""
    encoders = [m for name, m in pipe.components.items() if name.startswith("text_encoder") and m is not None]
    if device.type == "cuda" and offload == "none" and encoders and encoders[0].device != device:
        for encoder in encoders:  # a reused pipeline (LoadedPipelines): an earlier run sent them away
            encoder.to(device)
    with torch.no_grad():
        out = [family.encode_prompt(pipe, p, device, max_len) for p in prompts]
    if device.type == "cuda" and offload == "none":  # with offload, accelerate moves them itself
        for encoder in encoders:
            encoder.to("cpu")
        torch.cuda.empty_cache()
    return out


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


def place_clear_weights(state_dict: dict, transformer, activation_bytes: int) -> dict:
    """The checkpoint on the transformer's GPU, in its dtype, when it fits beside what the memory plan
    says the largest stage needs (`activation_bytes`: a step's activations or the VAE's, memory.py) with
    its headroom: apply_clear/remove_clear then swap parameters instead of copying 3.6 GB each way
    (twice per image with the SDEdit recipe). Otherwise in pinned CPU memory, copied in at full bus speed:
    one page-locked buffer holding every tensor (attention.weights.cpu_copies), not one pinned allocation
    each.
    """
    device, dtype = models.of(transformer).compute_device(transformer), transformer.dtype  # not GGUF's uint8
    if device.type != "cuda":
        return state_dict
    size = sum(v.numel() for v in state_dict.values()) * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    if free > (size + activation_bytes) * (1 + HEADROOM):
        return {k: v.to(device, dtype) for k, v in state_dict.items()}
    return cpu_copies(state_dict, pin=True)
