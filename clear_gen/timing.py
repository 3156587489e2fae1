"""Timing: CLEAR's steps as they run, and full attention at the same size (measured, or estimated)."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attention import remove_clear
from .device import synchronize
from .flops import FluxShape, speedup_bound, step_flops
from .geometry import Geometry, build_block_lists

FULL_MEASURE_BUDGET_S = 60.0  # measure full attention when a warm + timed step costs less than this


def samples(fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
    """Milliseconds of n synchronised calls."""
    times = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def timeit(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median_ms, first_call_ms): one warm-up call (compilation lands here), then `repeats` timed calls.

    With repeats = 0 the warm-up call is the only measurement (for calls too slow to repeat).
    """
    times = samples(fn, device, 1 + max(repeats, 0))
    return (statistics.median(times[1:]) if repeats > 0 else times[0]), times[0]


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float, float | None]:
    """timeit plus the peak allocated MB over those calls (CUDA); None on the CPU (torch keeps no count)."""
    if device.type != "cuda":
        return (*timeit(fn, device, repeats), None)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    median_ms, first_ms = timeit(fn, device, repeats)
    return median_ms, first_ms, torch.cuda.max_memory_allocated(device) / 2**20


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

    def to_json(self) -> dict:
        return {**vars(self), "speedup": self.speedup}


class StepClock:
    """Times denoising steps through the pipeline's step-end callback (synchronising CUDA)."""

    def __init__(self, device: torch.device, on_step: Callable[[], None] | None = None):
        self.device, self.on_step, self.stamps = device, on_step, [time.perf_counter()]

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        synchronize(self.device)
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


def _shape(config) -> FluxShape:
    return FluxShape(
        heads=config.num_attention_heads,
        head_dim=config.attention_head_dim,
        double=config.num_layers,
        single=config.num_single_layers,
        in_channels=config.in_channels,
        joint_dim=config.joint_attention_dim,
    )


_FULL_STEP_S: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformer -> {key: seconds}


def _full_step_key(inputs: dict, geo: Geometry, device) -> tuple:
    """What a stock step's time depends on: sizes, batch, dtype and device (not CLEAR's window)."""
    hidden = inputs["hidden_states"]
    return (geo.text_len, geo.height, geo.width, hidden.shape[0], hidden.dtype, str(device))


def time_full_attention(
    transformer, inputs: dict, timing: StageTiming, geo: Geometry, device, reapply
) -> None:
    """timing.full_step_s: one warm step with stock attention when that is cheap, else the FLOP model.

    A measured time is kept per transformer and size, so a batch of images measures it once. The
    estimate scales the measured CLEAR step by the FLOP ratio (linear + full attention) /
    (linear + computed CLEAR attention), so it assumes both run at the same FLOP rate.
    """
    cache = _FULL_STEP_S.setdefault(transformer, {})
    key = _full_step_key(inputs, geo, device) if inputs else None
    if key in cache:
        timing.full_step_s = cache[key]
        return
    computed = build_block_lists(geo).computed_pairs()
    estimate = timing.step_s * speedup_bound(step_flops(_shape(transformer.config), geo, computed))
    if 2 * estimate > FULL_MEASURE_BUDGET_S or not inputs:
        timing.full_step_s, timing.full_estimated = estimate, True
        return
    remove_clear(transformer)
    try:
        with torch.no_grad():
            median_ms, _ = timeit(lambda: transformer(**inputs), device, repeats=1)  # one warm-up, one timed
        timing.full_step_s = cache[key] = median_ms / 1e3
    finally:
        reapply()
