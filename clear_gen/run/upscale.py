"""`upscale`: existing pictures taken to a larger size by CLEAR's SDEdit stages, through generate's code
path (run.generate: the checks, the memory plan, the job runner); here only what differs: the pictures
read, each one's size, prompt and stages, and the largest one's plan.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..core.sizes import MAX_SIDE, size_multiple
from ..errors import ConfigError
from ..files.source import Source, UpscaleTarget, check_larger, image_files, load_source
from ..plan.memory import plan_run
from ..plan.parse import at_size, note_full_window, parse, upscale_stages
from ..plan.spec import GenerateOptions, RunSpec
from ..weights.control import control_record
from . import world as parallel
from .generate import LoadedPipelines, Prepared, check_sequence, prepare, probe_output, run_dtype, run_jobs
from .render import Hooks, ImageResult, Job


def upscale(
    opts: GenerateOptions,
    inputs: list[str | Path],
    target: UpscaleTarget | None = None,
    hooks: Hooks | None = None,
    pipelines: LoadedPipelines | None = None,
) -> list[ImageResult]:
    """Take existing pictures to a larger size with CLEAR's SDEdit stages: generate's code path, the first
    stage starting from each picture instead of a text-to-image pass. `opts.prompts`: [] (each picture's
    own prompt from its metadata, else none) or [prompt]; `opts.stages`: long sides after the picture."""
    started = time.perf_counter()
    hooks = hooks or Hooks()
    world, device = parallel.start(opts.parallel, opts.device)
    prepared = world.agree(lambda: _check_upscale(opts, inputs, target, world, device, hooks))
    return run_jobs(prepared, hooks, started, None, pipelines)


def _check_upscale(opts, inputs, target, world: parallel.World, device, hooks: Hooks) -> Prepared:
    """Read every picture, then plan every image, before loading gigabytes."""
    spec = parse(opts, hooks.note, upscale=True)
    dtype = run_dtype(spec, device, hooks)
    jobs, spec = upscale_jobs(spec, inputs, target, hooks)
    world = world.decide(len(jobs))
    largest = max(jobs, key=lambda job: job.stages[-1].tokens)
    check_sequence(spec, world, largest.stages)
    last = largest.stages[-1]
    if world.writes:
        probe_output(spec, largest.prompt, largest.seed, last.width, last.height)
    plan, offload = prepare(spec, device, hooks, largest.stages)  # the largest picture's plan
    return Prepared(spec, jobs, device, dtype, world, plan, offload)


def upscale_jobs(
    spec: RunSpec, inputs: list[str | Path], target: UpscaleTarget | None, hooks: Hooks | None = None
) -> tuple[list[Job], RunSpec]:
    """The jobs of an upscale (every picture read, every size and stage checked), and the spec with its
    attention at the largest picture's size."""
    hooks, target = hooks or Hooks(), target or UpscaleTarget()
    if spec.asked.stages and target == UpscaleTarget():  # no size given: the last stage is the target
        target = UpscaleTarget(res=spec.asked.stages[-1])
    sources = _read_sources([Path(p) for p in inputs], hooks)
    control = spec.weights.controlnet
    control_info = control_record(control) if control is not None else None
    multiple = size_multiple(at_size(spec.attention, MAX_SIDE, MAX_SIDE, spec.recipe).down_factor)
    sized = [(src, *target.size(src.size, multiple)) for src in sources]
    largest = max(sized, key=lambda s: s[1] * s[2])
    spec = replace(spec, attention=at_size(spec.attention, largest[1], largest[2], spec.recipe))
    note_full_window(spec.attention, largest[1], largest[2], hooks.note)
    jobs = []
    for src, w, h, note in sized:
        check_larger(src.size, (w, h), src.path)
        stages = upscale_stages(spec, spec.attention, w, h)
        prompt = _source_prompt(spec, src, hooks)
        for text in [*src.notes, note]:
            if text:
                hooks.note(f"{src.path.name}: {text}")
        info = {"file": src.path.name, "sha256": src.sha256, "width": src.size[0], "height": src.size[1]}
        own = _control_picture(control, src) if control is not None else None
        jobs += [Job(prompt, seed, stages, src.image, info, own, control_info) for seed in spec.seeds]
    return jobs, spec


def _control_picture(control, src: Source):
    """The ControlNet's picture for one upscaled picture: --control's, else the picture itself."""
    return control.picture.image if control.picture is not None else src.image


def upscale_plans(opts: GenerateOptions, inputs: list[str | Path], target: UpscaleTarget | None) -> list:
    """`upscale --dry-run`: (picture, memory plan) per picture, loading no weights."""
    spec = parse(replace(opts, seeds=[0], count=1), upscale=True)
    jobs, spec = upscale_jobs(spec, inputs, target)
    return [(job.source["file"], plan_run(spec, stages=job.stages)) for job in jobs]


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


def _source_prompt(spec: RunSpec, src: Source, hooks: Hooks) -> str:
    """The prompt given, else the one the picture's metadata holds, else none (said once per picture)."""
    if spec.prompts:
        return spec.prompts[0]
    if src.prompt:
        hooks.note(f"{src.path.name}: prompt from its {src.prompt_from} metadata: {src.prompt[:60]!r}")
        return src.prompt
    hooks.note(
        f"{src.path.name}: no prompt given or found in it; a prompt describing the picture usually helps"
    )
    return ""
