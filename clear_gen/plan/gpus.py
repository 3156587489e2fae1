"""GPUs as a plan sees them: memory, compute capability and matmul rate, of this machine's GPU or of a
common card from a table; a Mac's GPU (MPS), which shares the machine's unified memory; and the CPU.

A plan made where there is a GPU measures its matmul rate (`probe_tflops`: a few large matmuls in the
run's dtype); without one it takes a card from `CARDS` (or a Mac from `MACS`: its data-sheet rate times
`TABLE_ACHIEVED`), and every time it prints is labelled an estimate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

TABLE_ACHIEVED = 0.7  # share of a data sheet's dense tensor rate that large bf16 matmuls reach in practice


@dataclass(frozen=True)
class Card:
    """A GPU model: data-sheet figures, dense (no sparsity), FP32 accumulation."""

    name: str
    pattern: str  # regex on torch.cuda.get_device_name()
    memory_gb: float
    tflops: float  # bf16 / fp16 tensor cores
    tflops_fp32: float  # plain float32 (torch does not use TF32 for matmuls by default)
    capability: tuple[int, int]


# Data-sheet rates (TFLOP/s). The first card of each memory size is the one a plan without a GPU assumes.
CARDS = (
    Card("H200", r"H200", 141, 989, 67, (9, 0)),
    Card("H100", r"H100", 80, 989, 67, (9, 0)),
    Card("A100", r"A100", 80, 312, 19.5, (8, 0)),
    Card("L40S", r"L40S", 48, 362, 91.6, (8, 9)),
    Card("RTX 6000 Ada", r"RTX 6000 Ada", 48, 364, 91.1, (8, 9)),
    Card("RTX A6000", r"A6000", 48, 155, 38.7, (8, 6)),
    Card("L40", r"L40\b", 48, 181, 90.5, (8, 9)),
    Card("A40", r"A40\b", 48, 150, 37.4, (8, 6)),
    Card("RTX 5090", r"5090", 32, 209, 105, (12, 0)),
    Card("RTX 4090", r"4090", 24, 165, 82.6, (8, 9)),
    Card("RTX 3090", r"3090", 24, 71, 35.6, (8, 6)),
    Card("L4", r"\bL4\b", 24, 121, 30.3, (8, 9)),
    Card("A10G", r"A10G", 24, 70, 31.2, (8, 6)),
    Card("A10", r"\bA10\b", 24, 125, 31.2, (8, 6)),
    Card("RTX 4080", r"4080", 16, 97.5, 48.7, (8, 9)),
)


@dataclass(frozen=True)
class Gpu:
    """The GPU a plan is for."""

    name: str
    free_bytes: int  # memory the run may use
    capability: tuple[int, int] | None  # None: unknown (a card assumed by memory size alone)
    tflops: float  # achievable matmul rate in the run's dtype
    rate_source: str  # how tflops was found, for the plan's labels
    detected: bool  # this machine's GPU (else a card from the table)
    unified: bool = False  # one memory for everything (the CPU's, a Mac's): nothing to offload
    kind: str = "cuda"  # the device type: cuda, mps or cpu


def cpu_machine(dtype: torch.dtype) -> Gpu:
    """The CPU as a plan sees it: the memory available now (less what the OS holds back) and its matmul
    rate, measured (small matmuls: a CPU plan must cost seconds, not minutes)."""
    from ..core.device import device_name

    cpu = torch.device("cpu")
    rate = probe_tflops(cpu, dtype, 512)
    return Gpu(
        device_name(cpu), available_memory(), None, rate, "measured by a matmul probe", True, True, "cpu"
    )


def available_memory() -> int:
    """Bytes of the machine's memory available now: Linux's MemAvailable, else the free pages, else (macOS,
    which has no count of them) all of it."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def card_named(name: str) -> Card | None:
    """The table's card whose pattern is in a device name ('NVIDIA GeForce RTX 4090' -> RTX 4090)."""
    return next((c for c in CARDS if re.search(c.pattern, name)), None)


NEAR_MEMORY = 0.25  # a table card within this share of the asked memory is taken for it


def card_for_memory(gb: float) -> Card:
    """The table's card closest in memory (the first of its size): what a plan without a GPU assumes."""
    return min(CARDS, key=lambda c: abs(c.memory_gb - gb))


def table_tflops(card: Card, dtype: torch.dtype) -> float:
    peak = card.tflops_fp32 if dtype == torch.float32 else card.tflops
    return peak * TABLE_ACHIEVED


def probe_tflops(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Achieved TFLOP/s of n x n x n matmuls on the device (one warm-up, the median of `repeats`)."""
    from ..core.clock import samples

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = sorted(samples(lambda: a @ b, device, repeats + 1)[1:])
    return 2 * n**3 / (times[len(times) // 2] / 1e3) / 1e12


def detected_gpu(device: torch.device, dtype: torch.dtype, probe: bool = True) -> Gpu:
    """This machine's CUDA GPU: free memory now, its capability and its measured (or table) matmul rate."""
    free, _ = torch.cuda.mem_get_info(device)
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    if probe:
        rate, source = probe_tflops(device, dtype), "measured by a matmul probe"
    else:
        card = card_named(name)
        rate = table_tflops(card, dtype) if card else 100.0
        source = f"table: {card.name}" if card else "unknown card: 100 TFLOP/s assumed"
    return Gpu(name, free, capability, rate, source, detected=True)


def assumed_gpu(gb: float, dtype: torch.dtype) -> Gpu:
    """A card with `gb` GB free (no GPU here): the table's card of that memory size gives the rate."""
    card = card_for_memory(gb)
    source = f"table: {card.name}, {card.tflops:g} TFLOP/s peak x {TABLE_ACHIEVED}"
    if abs(card.memory_gb - gb) > NEAR_MEMORY * gb:  # e.g. 4 GB: no such card, the rate is a guess
        source = (
            f"no {gb:g} GB card in the table: {card.name}'s rate assumed ({card.memory_gb:g} GB, "
            f"{card.tflops:g} TFLOP/s peak x {TABLE_ACHIEVED})"
        )
    return Gpu(f"a {gb:g} GB GPU", int(gb * 1e9), card.capability, table_tflops(card, dtype), source, False)


def limit_memory(device: torch.device, gb: float) -> None:
    """Hold this process to `gb` GB of the GPU (--gpu-memory on a GPU; on a Mac, what a `gb` GB Mac would let
    the GPU use): a larger card rehearses a smaller one, and the plan's promise is kept. Nothing when that
    is at least what this GPU has."""
    if device.type == "mps":
        total = torch.mps.recommended_max_memory()
        if mac_usable(gb) < total:
            torch.mps.set_per_process_memory_fraction(mac_usable(gb) / total)
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if gb * 1e9 < total:
        torch.cuda.set_per_process_memory_fraction(gb * 1e9 / total, device)


# ---------------------------------------------------------------- a Mac


@dataclass(frozen=True)
class Mac:
    """An Apple silicon chip as a plan assumes it, by memory: its GPU's data-sheet FP32 rate (Apple's GPUs
    run bf16 and fp16 matmuls at about the same rate)."""

    name: str
    memory_gb: float
    tflops: float


MACS = (  # the plan's guess of the chip a Mac of that memory has
    Mac("M4", 16, 4.3),
    Mac("M4 Pro", 24, 9.2),
    Mac("M4 Max", 36, 14.7),
    Mac("M4 Max", 64, 18.4),
    Mac("M4 Max", 128, 18.4),
    Mac("M2 Ultra", 192, 27.2),
    Mac("M3 Ultra", 512, 28.4),
)
MAC_ACHIEVED = 0.5  # share of the data-sheet rate assumed for large matmuls through MPS (not measured here)
MAC_GPU_SHARE = 0.75  # of a Mac's memory that Metal lets the GPU use (its recommended working set) ...
MAC_GPU_SHARE_SMALL = 2 / 3  # ... on Macs below 36 GB
MAC_SMALL_GB = 36


def mac_usable(gb: float) -> float:
    """Bytes a `gb` GB Mac's GPU may use: Metal's recommended working set, the memory less what macOS and
    other programs keep (3/4 of it from 36 GB, 2/3 below)."""
    return gb * 1e9 * (MAC_GPU_SHARE if gb >= MAC_SMALL_GB else MAC_GPU_SHARE_SMALL)


def mac(gb: float | None, dtype: torch.dtype, default_gb: float) -> Gpu:
    """The Mac a plan on MPS is for: this one (Metal's recommended working set, its matmul rate measured)
    or, without MPS here, a `gb` GB one (`default_gb` when not given) with a table chip's rate. With `gb`
    on a Mac, what a Mac of that memory would let its GPU use."""
    from ..core.device import device_name, mps_here

    if mps_here():
        device = torch.device("mps")
        free = int(mac_usable(gb)) if gb is not None else torch.mps.recommended_max_memory()
        rate = probe_tflops(device, dtype)
        return Gpu(device_name(device), free, None, rate, "measured by a matmul probe", True, True, "mps")
    gb = gb or default_gb
    chip = min(MACS, key=lambda m: abs(m.memory_gb - gb))
    source = f"table: an {chip.name}'s, {chip.tflops:g} TFLOP/s peak x {MAC_ACHIEVED} (assumed)"
    return Gpu(
        f"a {gb:g} GB Mac", int(mac_usable(gb)), None, chip.tflops * MAC_ACHIEVED, source, False, True, "mps"
    )
