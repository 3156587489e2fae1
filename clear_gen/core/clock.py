"""The clock: synchronised wall time of work on a device (the queued GPU work finished before a reading),
and a function's calls timed as a benchmark does (a warm-up, then the median of repeats)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .device import synchronize


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


def now(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()
