"""Devices and dtypes as the user names them, shared by generation and benchmarks: which device `auto`
means (CUDA, then Apple's MPS, then the CPU), each one's default dtype, its name in every figure, and its
clock and memory readings (synchronising, peak memory)."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache

import torch

from ..errors import ConfigError, DeviceError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def mps_here() -> bool:
    """Apple silicon's GPU (MPS) is usable by this torch on this machine."""
    return torch.backends.mps.is_available()


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else MPS on a Mac, else the CPU; an asked-for device that is not
    here is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_here() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown --device {device!r}: use {DEVICES}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {device}: torch sees no CUDA GPU; use --device cpu or a CUDA build of torch"
        )
    if dev.type == "mps" and not mps_here():
        raise DeviceError(
            f"--device {device}: torch sees no Apple GPU (MPS); use --device cpu, or run on a Mac with Apple "
            "silicon (macOS 12.3+) and torch's macOS build"
        )
    return dev


def devices_here() -> list[torch.device]:
    """The kinds of device this machine offers torch: the CPU, and CUDA, MPS or XPU when present."""
    here = [torch.device("cpu")]
    if torch.cuda.is_available():
        here.append(torch.device("cuda"))
    if mps_here():
        here.append(torch.device("mps"))
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        here.append(torch.device("xpu"))
    return here


def check_dtype(dtype: str | None) -> None:
    """A --dtype name: bf16, fp16 or fp32 (or torch's names: bfloat16, ...); None is the device's default."""
    if dtype is not None and ALIASES.get(dtype, dtype) not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


@lru_cache(maxsize=1)
def mps_bf16() -> bool:
    """bf16 works on this machine's MPS (macOS 14+, a recent torch). Without MPS here, a plan assumes so."""
    if not mps_here():
        return True
    try:
        torch.ones(2, dtype=torch.bfloat16, device="mps").mul_(2).cpu()
        return True
    except (RuntimeError, TypeError):
        return False


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on MPS (fp16 on a Mac whose torch or macOS has no bf16 there), fp32 elsewhere by
    default; also takes torch's names (bfloat16, ...)."""
    if dtype is None:
        if device.type == "mps":
            return torch.bfloat16 if mps_bf16() else torch.float16
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    check_dtype(dtype)
    return DTYPES[ALIASES.get(dtype, dtype)]


def dtype_note(dtype: str | None, device: torch.device) -> str | None:
    """A line worth telling about the default dtype on this device, or None."""
    if dtype is None and device.type == "mps" and not mps_bf16():
        return (
            "this Mac's torch or macOS has no bf16 on MPS (macOS 14 and torch 2.3 have it): running in fp16; "
            "if an image comes out black or NaN, use --dtype fp32 (twice the memory)"
        )
    return None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16', as --dtype and the PNG record name it."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', 'mps: Apple M2 Max (64 GB unified memory)' or 'cpu: <model> (n threads)':
    printed with every figure."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        memory = _sysctl("hw.memsize")
        size = f" ({int(memory) / 2**30:.0f} GB unified memory)" if memory.isdigit() else ""  # Apple's GB
        return f"mps: {_sysctl('machdep.cpu.brand_string') or 'Apple silicon'}{size}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model} ({torch.get_num_threads()} threads)"


def _sysctl(name: str) -> str:
    """A macOS sysctl value ('' elsewhere)."""
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------- peak memory


def reset_peak_memory(device: torch.device) -> int:
    """Start a new memory high-water mark; returns the baseline a CPU reading is taken against (bytes
    resident now). CUDA: torch's peak statistics. MPS: its cache emptied, so that the driver's pool grows
    to the peak again. CPU: the process's resident high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        torch.mps.empty_cache()
    elif device.type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the resident size now
        except OSError:
            return -1
        return _status_bytes("VmRSS:")
    return 0


def peak_memory(device: torch.device, baseline: int = 0) -> tuple[float | None, float | None]:
    """(peak allocated GB, peak reserved GB) since reset_peak_memory; None where torch keeps no count.
    CUDA: torch's maxima. MPS: the driver's pool (its reserved high-water mark, as the cache was emptied at
    the reset; Metal keeps no allocated maximum). CPU: the resident high-water mark above `baseline`
    (Linux only), as allocated."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, torch.cuda.max_memory_reserved(device) / 1e9
    if device.type == "mps":
        return None, torch.mps.driver_allocated_memory() / 1e9
    if device.type == "cpu" and baseline >= 0:
        peak = _status_bytes("VmHWM:")
        return (max(peak - baseline, 0) / 1e9 if peak >= 0 else None), None
    return None, None


def _status_bytes(field: str) -> int:
    """A kB figure of /proc/self/status in bytes; -1 where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration, ValueError):
        return -1
