"""The clock: synchronised wall time of work on a device (the queued GPU work finished before a reading),
and a function's calls timed as a benchmark does (a warm-up, then the median of repeats)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .device import peak_memory, reset_peak_memory, synchronize


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
    """timeit plus the peak MB of the timed calls (the warm-up's, with repeats = 0), counting what earlier
    calls left allocated: CUDA's allocated maximum, MPS's driver pool, a CPU's resident memory above its
    level before the first call (Linux); None where none can be read."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = reset_peak_memory(device)
    first = samples(fn, device, 1)[0]
    median = first
    if repeats > 0:
        reset_peak_memory(device)  # the warm calls' peak, not the compiler's
        median = statistics.median(samples(fn, device, repeats))
    allocated, reserved = peak_memory(device, before)
    peak = allocated if allocated is not None else reserved
    return median, first, None if peak is None else peak * 1e9 / 2**20


def now(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()
