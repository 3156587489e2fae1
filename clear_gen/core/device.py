"""Devices and dtypes as the user names them, shared by generation and benchmarks."""

from __future__ import annotations

import platform

import torch

from ..errors import ConfigError, DeviceError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else the CPU; CUDA asked for but absent is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {device}: torch sees no CUDA GPU; use --device cpu or a CUDA build of torch"
        )
    return dev


def check_dtype(dtype: str | None) -> None:
    """A --dtype name: bf16, fp16 or fp32 (or torch's names: bfloat16, ...); None is the device's default."""
    if dtype is not None and ALIASES.get(dtype, dtype) not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 elsewhere by default; also takes torch's names (bfloat16, ...)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    check_dtype(dtype)
    return DTYPES[ALIASES.get(dtype, dtype)]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16', as --dtype and the PNG record name it."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'cpu: <model> (n threads)': printed with every figure."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
