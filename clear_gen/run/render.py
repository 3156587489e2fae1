"""Making one image of a run: its stages (each denoised with its attention, every step timed, then
decoded: the next stage starts from its picture), then its PNG and the record that re-makes it.

The latents of each stage are decoded here rather than inside the diffusers call, so that the VAE's
time is reported apart; `RunTiming` records where every second of an image went.

pipeline.py checks and loads a run and hands each job to `make_image` with the `Run` they all share.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import models
from ..attention import apply_clear, remove_clear
from ..attention.backends import choose
from ..core.clock import now
from ..core.device import device_name, dtype_name
from ..core.geometry import Geometry, needed_pairs
from ..errors import ComputeError
from ..files import output
from ..files.record import ImageRecord, RunTiming, StageTiming
from ..plan.footprint import RunPlan
from ..plan.records import image_record
from ..plan.spec import ClearChoice, RunSpec, Stage
from ..weights.spec import ControlSpec
from . import world as parallel
from .dype import dynamic_rope
from .guide import projected_flow
from .measure import (
    StepCall,
    StepClock,
    StockSteps,
    capture_transformer_call,
    record_peak_memory,
    reset_peak_memory,
    time_step,
)
from .speed import BlockCount, step_cache


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
    stage_done: Callable[[int, StageTiming], None] = lambda i, timing: None  # stage i, decoded


@dataclass
class ImageResult:
    """One saved image: where it is, what made it (as stored in its PNG) and where the time went."""

    path: Path  # absolute
    record: ImageRecord
    timing: RunTiming
    stage_paths: list[Path] = field(default_factory=list)  # absolute; --keep-stages
    job: int | None = None  # under torchrun: the image's place in the run's jobs

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


@dataclass
class Job:
    """One image to make: its prompt, seed and stages, and the picture its first stage starts from."""

    prompt: str
    seed: int
    stages: list[Stage]
    first: Any = None  # PIL image (upscale); None: the first stage is text-to-image
    source: dict[str, Any] | None = None  # the picture's file, sha256 and size, recorded in the PNG
    control: Any = None  # the ControlNet's picture (PIL), with --controlnet
    control_info: dict[str, Any] | None = None  # what the PNG records of the ControlNet (control.py)
    reference: Any = None  # the picture an edit changes (PIL): its tokens join every stage's calls


@dataclass
class Run:
    """What every image of a run shares."""

    spec: RunSpec
    pipe: Any  # the family's pipeline (FluxPipeline; FluxControlNetPipeline with --controlnet)
    img2img: Any  # FluxImg2ImgPipeline sharing pipe's modules; None with one stage
    state_dict: dict[str, torch.Tensor] | None  # the CLEAR checkpoint, placed
    device: torch.device
    hooks: Hooks
    plan: RunPlan | None  # None: a pipeline built elsewhere (bench --what image), no plan
    offload: str = "none"  # decided: none | model | sequential
    world: parallel.World = field(default_factory=parallel.World)
    shards: parallel.SequenceShards | None = None  # sequence mode: head-parallel CLEAR over the ranks
    setup_s: tuple[float, float] = (0.0, 0.0)  # loading and encoding: the rank's first image carries them
    mark: float = 0.0  # where the next image's wall time begins
    made: int = 0  # images this rank has made
    names: output.Names = field(default_factory=output.Names)  # its PNGs' names, reserved until saved
    stock_steps: StockSteps = field(default_factory=StockSteps)  # full attention's step, timed once a size


def make_image(run: Run, job: Job, emb, timing: RunTiming, started: float) -> ImageResult | None:
    """Every stage of one image (each decoded: the next starts from its image), then its PNG (None on the
    ranks that do not save it).

    `started`: where this image's wall time begins (the run's start for the first image).
    """
    image, stage_paths, save_s, hooks, n = job.first, [], 0.0, run.hooks, len(job.stages)
    reference = _reference(run, job)
    for i, stage in enumerate(job.stages):
        hooks.stage_start(i, n, stage)
        with _reference_tokens(run.pipe.transformer, reference):  # an edit: its picture joins every call
            latents, stage_timing = _stage(run, stage, emb, image, job.seed, job.control)
        _finite(latents, run, stage, f"stage {i + 1}/{n}'s latents")
        if i == n - 1 and not run.world.writes:
            timing.stages.append(stage_timing)
            timing.total_s = time.perf_counter() - started
            return None  # sequence mode: rank 0 alone decodes and saves the image
        hooks.phase("decode", _decode_detail(stage))
        t0 = now(run.device)
        image = _decode(run, latents, stage, f"stage {i + 1}/{n}'s decoded image")
        stage_timing.decode_s = now(run.device) - t0
        record_peak_memory(stage_timing, run.device)  # denoising and decoding, not timing full attention
        hooks.phase_done("decode", stage_timing.decode_s)
        timing.stages.append(stage_timing)
        hooks.stage_done(i, stage_timing)
        if run.spec.output.keep_stages and i < n - 1 and run.world.writes:
            record = _record(run, job, job.stages[: i + 1], timing, started)
            path, seconds = _save(image, record, run, stage=i + 1)
            stage_paths.append(path)
            save_s += seconds
    record = _record(run, job, job.stages, timing, started)
    path, seconds = _save(image, record, run)
    timing.save_s = save_s + seconds
    timing.total_s = time.perf_counter() - started
    return ImageResult(path, record, timing, stage_paths)


def _reference(run: Run, job: Job):
    """An edit's reference tokens and their grid, encoded once for all its stages (the VAE untiled: the
    reference is about a megapixel); None for any other job."""
    if job.reference is None:
        return None
    family, width_height = models.of(run.pipe.transformer), job.stages[0].reference
    family.set_vae_tiling(run.pipe.vae, "off", job.stages[0].vae_tile)  # each stage sets its own after
    return family.reference_latents(run.pipe, job.reference, *width_height)


def clear_kwargs(choice: ClearChoice, stage: Stage, state_dict, backend: str) -> dict:
    """apply_clear's arguments for a CLEAR stage: the attention chosen, the stage's NTK and scale."""
    return dict(
        window=choice.window,
        down_factor=choice.down_factor,
        state_dict=state_dict,
        proportional_attention=stage.proportional,
        ntk_factor=stage.ntk_factor,
        backend=backend,
    )


def _stage(run: Run, stage: Stage, emb, image, seed: int, picture) -> tuple[torch.Tensor, StageTiming]:
    """One stage's denoising, every step timed: (packed latents, its StageTiming). `picture`: the
    ControlNet's (with --controlnet)."""
    transformer, spec, device, hooks = run.pipe.transformer, run.spec, run.device, run.hooks
    choice, settings = spec.attention, spec.settings
    # 1. Attention for this stage: the original model, or CLEAR with the stage's NTK and scale; the
    #    ControlNet's blocks too above 1024 px (control.py).
    kwargs = {**clear_kwargs(choice, stage, run.state_dict, settings.backend), "parallel": run.shards}
    kwargs["note"] = hooks.note  # a kernel that fails to compile and is replaced (backends.clear_attention)
    if stage.clear:
        apply_clear(transformer, **kwargs)
    else:
        remove_clear(transformer)
    control_spec = spec.weights.controlnet
    controlnet = run.pipe.controlnet if control_spec is not None else None
    net_kwargs = {**kwargs, "state_dict": None, "down_factor": 1, "parallel": None}  # training-free
    if controlnet is not None and stage.controlnet_clear:
        apply_clear(controlnet, **net_kwargs)
    elif controlnet is not None:
        remove_clear(controlnet)
    control = _control_kwargs(control_spec, picture) if controlnet is not None else {}
    _vae_tiling(run, stage)
    text_len = emb["prompt_embeds"].shape[1]  # (1, T, D)
    reference = stage.reference  # an edit's reference tokens' size, or None
    geo = choice.geometry(stage.width, stage.height, text_len, reference=reference) if stage.clear else None
    compiling = _first_run(geo, settings.backend, device, transformer.dtype)
    # 2. Denoise, timing every step (and the GPU memory's high-water mark).
    if compiling:
        hooks.phase("compile", f"{stage.width}x{stage.height}")
    clock = StepClock(device, _on_step(hooks, stage.denoising_steps, compiling))
    reset_peak_memory(device)
    cache = step_cache(transformer, settings.cache)  # --cache: this stage's denoising only
    control_call = capture_transformer_call(controlnet) if controlnet is not None else nullcontext({})
    with capture_transformer_call(transformer) as inputs, control_call as control_inputs:
        with clock.watching(controlnet if controlnet is not None else transformer), cache as blocks:
            with dynamic_rope(_rope_models(transformer, controlnet, stage), stage):  # --dype
                latents = _run_stage(run, stage, emb, image, seed, clock, control)
    timing = _timing(stage, choice, clock, geo, blocks)
    timing.gpus = run.world.size if run.shards is not None and stage.clear else 1  # stock stages: replicated
    record_peak_memory(timing, device)
    # 3. Full attention at this size, warm (and a warm CLEAR step when the stage had only one).
    if settings.compare_full and geo is not None:
        hooks.phase("compare", f"{stage.width}x{stage.height}")
        t0 = now(device)
        step = StepCall(transformer, inputs, controlnet, control_inputs)
        if timing.step_s is None:
            timing.step_s = time_step(step, device)
        fits = run.plan is None or (stage.width, stage.height) not in run.plan.full_step_too_big

        def reapply():
            apply_clear(transformer, **kwargs)
            if controlnet is not None and stage.controlnet_clear:
                apply_clear(controlnet, **net_kwargs)

        run.stock_steps.time(step, timing, geo, device, reapply, fits)
        timing.compare_s = now(device) - t0
        hooks.phase_done("compare", timing.compare_s)
        reset_peak_memory(device)  # the stage's peak leaves out timing full attention
    elif not stage.clear:
        timing.full_step_s = timing.step_s
    return run.world.share(latents), timing  # sequence mode: rank 0's latents, so the ranks never drift


def _reference_tokens(transformer, reference):
    """While on, the transformer's calls carry an edit's reference tokens (the family's reference_tokens)."""
    if reference is None:
        return nullcontext()
    return models.of(transformer).reference_tokens(transformer, *reference)


def _rope_models(transformer, controlnet, stage: Stage) -> list:
    """The models whose RoPE DyPE sets in a stage: those running CLEAR (where the NTK factor applies)."""
    return [transformer] + ([controlnet] if controlnet is not None and stage.controlnet_clear else [])


def _control_kwargs(spec: ControlSpec, picture) -> dict[str, Any]:
    """What a ControlNet pipeline call takes besides the usual: the picture (the pipeline resizes it to the
    stage), the mode and the scale."""
    return {"control_image": picture, "control_mode": spec.mode, "controlnet_conditioning_scale": spec.scale}


def _run_stage(run: Run, stage: Stage, embeds, image, seed: int, clock, control):
    """One stage's diffusion; returns its latents as the pipeline gives them (FLUX.1: packed tokens), not
    yet decoded. `control`: the ControlNet pipelines' own arguments (_control_kwargs), or {}."""
    common = dict(
        **control,
        **models.of(run.pipe.transformer).prompt_arguments(embeds),
        width=stage.width,
        height=stage.height,
        num_inference_steps=stage.steps,
        guidance_scale=stage.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=clock,
        output_type="latent",
    )
    if not stage.sdedit:
        return run.pipe(**common).images
    from PIL import Image

    resized = image.resize((stage.width, stage.height), Image.LANCZOS)
    sigmas = run.spec.recipe.sigmas(stage.steps)
    with projected_flow(run.img2img, stage):  # --guide: towards the picture the stage starts from
        return run.img2img(image=resized, strength=stage.strength, sigmas=sigmas, **common).images


def _finite(tensor: torch.Tensor, run: Run, stage: Stage, what: str) -> None:
    """Stop the run, saving nothing, when a stage computed NaN or inf: one line naming the stage, its
    attention kernel and the dtype (a black or noise PNG saved with exit 0 helps nobody)."""
    if bool(torch.isfinite(tensor).all()):
        return
    spec, dtype = run.spec, dtype_name(run.pipe.transformer.dtype)
    if stage.clear:
        geo = spec.attention.geometry(stage.width, stage.height, spec.text_len, reference=stage.reference)
        kernel = f"CLEAR on the {choose(spec.settings.backend, run.device, geo).name} backend"
    else:
        kernel = "stock attention"
    raise ComputeError(
        f"{what} at {stage.width}x{stage.height} hold NaN or inf ({kernel}, {dtype} on {run.device.type}): "
        "nothing saved; try --dtype fp32, or another --backend"
    )


def _decode(run: Run, latents: torch.Tensor, stage: Stage, what: str) -> Any:
    """The model's latents into a PIL image, as diffusers' pipelines do after their last step."""
    pipe = run.pipe
    vae = pipe.vae
    latents = models.of(pipe.transformer).vae_latents(vae, latents, stage.width, stage.height)  # (B, C, h, w)
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]  # (B, 3, H, W)
    _finite(image, run, stage, what)
    pipe.maybe_free_model_hooks()  # with --offload, the VAE leaves the GPU as after a pipeline call
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _vae_tiling(run: Run, stage: Stage) -> None:
    """This stage's VAE tiling (exact, fast or off) for its encodes (img2img, a ControlNet's picture) and
    its decode. Exact tiling parks its tiles in the machine's memory with sequential offload, as the plan
    counts them."""
    store = torch.device("cpu") if run.offload == "sequential" else None
    models.of(run.pipe.transformer).set_vae_tiling(run.pipe.vae, stage.vae_tiling, stage.vae_tile, store)


def _decode_detail(stage: Stage) -> str:
    """'8192x8192 in exact tiles of 1024 px': what the decode phase says."""
    size = f"{stage.width}x{stage.height}"
    return size if stage.vae_tiles == "off" else f"{size} in {stage.vae_tiles} tiles of {stage.vae_tile} px"


def _first_run(geo: Geometry | None, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """True when this stage compiles attention kernels: a compiling backend, at a geometry new to this
    process (the backend keeps count)."""
    return geo is not None and choose(backend, device, geo).first_use(geo, device, dtype)


def _on_step(hooks: Hooks, total: int, compiling: bool) -> Callable[[int, float], None]:
    def on_step(done: int, seconds: float) -> None:
        if compiling and done == 1:
            hooks.phase_done("compile", seconds)
        hooks.step(done, total, seconds)

    return on_step


def _timing(
    stage: Stage, choice: ClearChoice, clock: StepClock, geo: Geometry | None, blocks: BlockCount | None
) -> StageTiming:
    steps = clock.durations()
    timing = StageTiming(
        width=stage.width,
        height=stage.height,
        attention=choice.attention_label if stage.clear else "full",
        steps=len(steps),
        seconds=clock.stamps[-1] - clock.started,
        step_s=clock.warm_step_seconds(),
        first_step_s=steps[0],
    )
    if geo is not None:  # a CLEAR stage
        timing.density = needed_pairs(geo) / (geo.q_len * geo.kv_len)
    if blocks is not None:  # --cache: steps differ by design, so the mean warm step, not the median
        timing.step_s = sum(steps[1:]) / (len(steps) - 1) if len(steps) > 1 else None
        timing.block_evals, timing.blocks_skipped = blocks.evaluated, blocks.skipped
    return timing


def _save(image, record: ImageRecord, run: Run, stage: int | None = None) -> tuple[Path, float]:
    """Write the PNG (`stage`: a kept earlier stage's); (its absolute path, seconds)."""
    t0 = time.perf_counter()
    path = output.output_path(run.spec.output.out, record, names=run.names, stage=stage)
    path = Path(os.path.abspath(output.save_png(image, path, record, run.names)))
    seconds = time.perf_counter() - t0
    run.hooks.saved(path, seconds)
    return path, seconds


def _record(run: Run, job: Job, stages: list[Stage], timing: RunTiming, started: float) -> ImageRecord:
    """What made the image of `stages` (all, or the first few for a kept stage): `--from` re-makes it.

    Its timings end where its own save begins: no save_s, and total_s up to there.
    """
    timings = replace(
        timing, stages=timing.stages[: len(stages)], save_s=None, total_s=time.perf_counter() - started
    ).to_json()
    dtype = dtype_name(run.pipe.transformer.dtype)
    clear = [s for s in stages if s.clear]
    backend = None
    if clear:  # the kernel CLEAR ran with (auto's choice) at the largest CLEAR stage
        last = clear[-1]
        geo = run.spec.attention.geometry(
            last.width, last.height, run.spec.text_len, reference=last.reference
        )
        backend = choose(run.spec.settings.backend, run.device, geo).name
    return image_record(run.spec, job, stages, timings, dtype, device_name(run.device), backend)
