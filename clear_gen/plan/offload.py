"""The offload decision: the first (offload, CLEAR placement, feed-forward chunk) that fits, fastest first
(none, model, sequential; with an asked offload, only it), and when nothing fits, the most frugal plan
with the largest size that would."""

from __future__ import annotations

import math
from dataclasses import replace

from ..core.device import dtype_name
from ..core.sizes import scaled_size
from . import gpus
from .estimate import timed
from .footprint import (
    GB,
    HEADROOM,
    RunInputs,
    RunPlan,
    StagePlan,
    encode_memory,
    full_step_memory,
    stage_memory,
    weights_on_gpu,
)

FF_CHUNK_TOKENS = 4096  # tokens per feed-forward slice when chunking


def candidate(
    run: RunInputs, gpu: gpus.Gpu | None, offload: str, chunk: int | None, clear_on: bool
) -> RunPlan:
    """The plan of one (offload, chunk, CLEAR placement) choice; its time is filled in later. On the CPU
    (gpu.unified: the CPU, a Mac) everything stays in the machine's memory: the offload is none."""
    w, note = weights_on_gpu(run, clear_on)
    cpu = gpu is not None and gpu.unified
    placed = "cpu" if cpu else offload  # what stage_memory counts as in memory
    stages, peaks = [], [encode_memory(w, placed)]
    unchunked = [stage_memory(run, w, placed, None, i) for i in range(len(run.stages))]
    for i, s in enumerate(run.stages):
        weights, act, vae, peak = stage_memory(run, w, placed, chunk, i)
        peaks.append(peak)
        stages.append(
            StagePlan(s.width, s.height, s.tokens, s.denoising_steps, run.labels[i], run.densities[i],
                      weights / GB, act / GB, unchunked[i][1] / GB, vae / GB, peak / GB, 0.0, s.vae_tiles)
        )  # fmt: skip
    free = gpu.free_bytes if gpu else None
    too_big = [
        (s.width, s.height)
        for i, s in enumerate(run.stages)
        if s.clear and free is not None and (1 + HEADROOM) * full_step_memory(run, w, placed, chunk, i) > free
    ]
    return RunPlan(
        device=gpu.name if gpu else "cpu",
        gpu=gpu is not None and gpu.kind != "cpu",
        unified=cpu,
        free_gb=free / GB if free is not None else None,
        rate_tflops=gpu.tflops if gpu else 0.0,
        rate_source=gpu.rate_source if gpu else "",
        dtype=dtype_name(run.dtype),
        model=run.shapes.source,
        quantize=run.spec.weights.quantize,
        quantize_text=run.spec.weights.quantize_text,
        transformer=run.spec.weights.transformer,
        transformer_gb=w.transformer / GB,
        text_encoders_gb=(w.text + w.text_small) / GB,
        controlnet_gb=w.controlnet / GB,
        lora_gb=w.lora / GB,
        offload=offload,
        offload_asked=run.spec.settings.offload,
        ff_chunk=chunk,
        clear_on_gpu=w.clear > 0 and offload != "sequential",
        encode_gb=peaks[0] / GB,
        peak_gb=max(peaks) / GB,
        unchunked_peak_gb=max([peaks[0]] + [u[3] for u in unchunked]) / GB,
        fits=free is None or max(peaks) * (1 + HEADROOM) <= free,
        stages=stages,
        notes=[note] if note else [],
        full_step_too_big=too_big,
        activation_bytes=max(max(a, v) for _, a, v, _ in (stage_memory(run, w, placed, chunk, i)
                                                           for i in range(len(run.stages)))),
    )  # fmt: skip


def chunks(run: RunInputs, offload: str) -> list[int | None]:
    """Feed-forward slices to try, fewest first. With sequential offload each slice copies the MLP's
    weights to the GPU again, so it tries 2, 4, then 8 slices; else FF_CHUNK_TOKENS-token slices."""
    longest = run.text_len + max(s.tokens for s in run.stages)
    if offload != "sequential":
        return [None, FF_CHUNK_TOKENS]
    return [None] + [256 * math.ceil(longest / k / 256) for k in (2, 4, 8)]


def decide(run: RunInputs, gpu: gpus.Gpu) -> RunPlan:
    """The first (offload, CLEAR placement, chunk) that fits, fastest first: none, model, sequential
    (with an asked offload, only it). When nothing fits, the most frugal plan, with fits_at and needs_gb."""
    if gpu.unified:
        return _on_cpu(run, gpu)
    asked = run.spec.settings.offload
    rejected = None  # the most frugal plan of the last offload that did not fit
    for offload in ("none", "model", "sequential") if asked == "auto" else (asked,):
        for clear_on in (True, False) if offload == "none" and run.clear_bytes else (False,):
            for chunk in chunks(run, offload):
                plan = candidate(run, gpu, offload, chunk, clear_on)
                if plan.fits:
                    plan.reason = _reason(run, plan, rejected)
                    plan = timed(run, plan)
                    plan.hint = _quantize_hint(run, gpu, plan)
                    return plan
        rejected = plan
    frugal = candidate(run, gpu, "sequential", chunks(run, "sequential")[-1], clear_on=False)
    plan = frugal if asked == "auto" else plan
    plan.fits_any = frugal.fits
    plan.needs_gb = frugal.peak_gb * (1 + HEADROOM)
    plan.fits_at = None if frugal.fits else fits_at(run, gpu)
    also = "; --offload sequential fits" if frugal.fits else ": does not fit even with --offload sequential"
    plan.reason = _reason(run, plan, None) + also
    return timed(run, plan)


OFFLOADS = ("none", "model", "sequential")  # fastest first


def _quantize_hint(run: RunInputs, gpu: gpus.Gpu, plan: RunPlan) -> str | None:
    """When an offload was chosen for unquantized weights and --quantize fp8 (half their bytes, any CUDA
    GPU) would offload less: that choice, with both time estimates. None otherwise."""
    weights = run.spec.weights
    if plan.offload == "none" or plan.offload_asked != "auto" or weights.quantize != "none" or weights.gguf:
        return None
    lighter = decide(replace(run, spec=replace(run.spec, weights=replace(weights, quantize="fp8"))), gpu)
    if not lighter.fits or OFFLOADS.index(lighter.offload) >= OFFLOADS.index(plan.offload):
        return None
    return (
        f"--quantize fp8 would run with --offload {lighter.offload} "
        f"(~{lighter.time_s:.0f} s instead of ~{plan.time_s:.0f} s of denoising)"
    )


def _on_cpu(run: RunInputs, cpu: gpus.Gpu) -> RunPlan:
    """A CPU run, or a Mac's GPU on its unified memory: everything in the machine's memory (no offload);
    feed-forward chunking when that is what fits. An asked --offload does nothing there: said in a note."""
    for chunk in (None, FF_CHUNK_TOKENS):
        plan = candidate(run, cpu, "none", chunk, clear_on=True)
        if plan.fits:
            break
    plan.fits_any = plan.fits
    plan.needs_gb = plan.peak_gb * (1 + HEADROOM)
    plan.fits_at = None if plan.fits else fits_at(run, cpu)
    sign = "<=" if plan.fits else ">"
    chunked = ", feed-forward chunked" if plan.ff_chunk else ""
    plan.reason = (
        f"{MEMORY_OF[cpu.kind]}: plan {plan.peak_gb:.1f} GB {sign} {_usable(plan)} of its memory{chunked}"
    )
    if run.spec.settings.offload not in ("auto", "none"):
        plan.notes.append(offload_on_cpu(run.spec.settings.offload, cpu.kind))
    return timed(run, plan)


MEMORY_OF = {"cpu": "the CPU", "mps": "the Mac (unified memory)"}  # where a unified plan runs


def offload_on_cpu(offload: str, kind: str = "cpu") -> str:
    """The note for an --offload that one memory for everything (the CPU's, a Mac's) makes pointless."""
    return f"--offload {offload} does nothing on {MEMORY_OF[kind]}: the weights stay in the machine's memory"


def _usable(plan: RunPlan) -> str:
    return f"{plan.free_gb / (1 + HEADROOM):.1f} GB usable of {plan.free_gb:.1f} GB free"


def _reason(run: RunInputs, plan: RunPlan, rejected: RunPlan | None) -> str:
    """Why this offload, for `offload_line`: 'none: plan 31.2 GB > 21.4 GB usable of 23.5 GB free; model:
    plan 18.1 GB'."""
    longest = run.text_len + max(s.tokens for s in run.stages)
    chunked = f", feed-forward in {math.ceil(longest / plan.ff_chunk)} slices" if plan.ff_chunk else ""
    sign = "<=" if plan.fits else ">"
    this = f"plan {plan.peak_gb:.1f} GB {sign} {_usable(plan)}{chunked}"
    if plan.offload_asked != "auto":
        return f"asked; {this}"
    if rejected is None:
        return this
    return f"{rejected.offload}: plan {rejected.peak_gb:.1f} GB > {_usable(rejected)}; {plan.offload}: {this}"


def fits_at(run: RunInputs, gpu: gpus.Gpu) -> tuple[int, int] | None:
    """The largest size of the same aspect whose last stage fits with sequential offload and chunking (on
    the CPU: in the machine's memory, chunked)."""
    multiple, last, asked_vae = run.multiple, run.stages[-1], run.spec.settings.vae_tiling
    w0, h0 = last.width, last.height
    lo, hi = 0, max(w0, h0) // multiple  # long side in multiples, lo fits (0: nothing does)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        w, h = scaled_size(w0, h0, mid * multiple, multiple)
        stage = replace(last, width=w, height=h, vae_tiling=run.spec.recipe.vae_tiling(asked_vae, w, h))
        trial = replace(run, stages=[stage])
        if gpu.unified:
            plan = candidate(trial, gpu, "none", FF_CHUNK_TOKENS, clear_on=True)
        else:
            plan = candidate(trial, gpu, "sequential", chunks(trial, "sequential")[-1], clear_on=False)
        lo, hi = (mid, hi) if plan.fits else (lo, mid)
    return scaled_size(w0, h0, lo * multiple, multiple) if lo else None
