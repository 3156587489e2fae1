"""Quantized weights: `--quantize` (the transformer), `--quantize-text` (T5) and GGUF transformer files.

Everything goes through diffusers' and transformers' own quantization configs; nothing here computes.

mode    weights stored as                  library (config)                                 runs on
fp8     fp8 e4m3, upcast for each matmul   torchao Float8WeightOnlyConfig                   any GPU, CPU
fp8dq   fp8, activations scaled to fp8     torchao Float8DynamicActivationFloat8WeightConfig CUDA >= 8.9
        too: fp8 matmuls
int8    int8, upcast for each matmul       torchao Int8WeightOnlyConfig                     any GPU, CPU
nf4     4-bit NormalFloat                  bitsandbytes (optional) BitsAndBytesConfig       CUDA
GGUF    the file's blocks (Q8_0, Q4_K...)  diffusers GGUFQuantizationConfig                 any GPU, CPU

Only the Linear layers' weights are quantized (norms, biases and embeddings stay in the compute dtype).
A GGUF file is already quantized: `--transformer FILE.gguf` replaces the base's transformer, and
`--quantize` does not apply to it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DeviceError

FP8_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (RTX 40xx, L4, L40S) and Hopper onwards


@dataclass(frozen=True)
class Mode:
    """One --quantize / --quantize-text mode: the one table of them (the memory plan reads it too)."""

    name: str
    package: str  # the import (and pip) name of the library doing it
    cuda_only: bool
    fp8_matmul: bool  # needs fp8 tensor cores (FP8_CAPABILITY)
    bytes_per_weight: float  # of a quantized Linear weight, its scales aside (bf16: 2)
    bytes_per_row: int  # its scale per output row (0: scales counted in bytes_per_weight)
    text: bool  # also for T5 (--quantize-text)


MODES = {
    # torchao Float8WeightOnlyConfig: float8 e4m3 weights, a float32 scale per row
    "fp8": Mode("fp8", "torchao", False, False, 1.0, 4, text=True),
    # torchao Float8DynamicActivationFloat8WeightConfig: the same storage, fp8 matmuls
    "fp8dq": Mode("fp8dq", "torchao", True, True, 1.0, 4, text=False),
    # torchao Int8WeightOnlyConfig: int8 weights, a scale per row
    "int8": Mode("int8", "torchao", False, False, 1.0, 4, text=True),
    # bitsandbytes NF4: 4 bits a weight, a float32 absmax per 64 weights
    "nf4": Mode("nf4", "bitsandbytes", True, False, 0.5 + 4 / 64, 0, text=True),
}
TRANSFORMER_MODES = ("none", "fp8", "fp8dq", "int8", "nf4")
TEXT_MODES = ("none", *(name for name in ("int8", "fp8", "nf4") if MODES[name].text))
CPU_MODES = "int8 or fp8"  # what runs without CUDA


@dataclass(frozen=True)
class Target:
    """The device a quantization must run on: this machine's, or the GPU a dry run plans for."""

    name: str  # "cpu" or the card's name
    cuda: bool  # a CUDA GPU
    capability: tuple[int, int] | None = None  # None: unknown
    cuda_here: bool = True  # this machine has CUDA (bitsandbytes loads only there)

    @classmethod
    def of(cls, device: torch.device) -> Target:
        if device.type != "cuda":
            return cls(device.type, False, None, torch.cuda.is_available())
        try:
            return cls(torch.cuda.get_device_name(device), True, torch.cuda.get_device_capability(device))
        except (AssertionError, RuntimeError):  # a CPU build of torch: the run fails later, and says so
            return cls("cuda", True, None)


# ---------------------------------------------------------------- checks


def check_names(quantize: str, quantize_text: str, transformer: str | None) -> None:
    """The arguments alone: known modes, a .gguf --transformer, and no --quantize on top of a GGUF file."""
    for flag, mode, choices in (
        ("--quantize", quantize, TRANSFORMER_MODES),
        ("--quantize-text", quantize_text, TEXT_MODES),
    ):
        if mode not in choices:
            raise ConfigError(f"unknown {flag} {mode!r}; choose {', '.join(choices[:-1])} or {choices[-1]}")
    if transformer is not None and not transformer.lower().endswith(".gguf"):
        raise ConfigError(
            "--transformer takes a FLUX.1 transformer .gguf file (local, or owner/repo/file.gguf on the "
            f"Hub); got {transformer}"
        )
    if transformer is not None and quantize != "none":
        raise ConfigError(
            f"--transformer {Path(transformer).name} is quantized already (GGUF); "
            f"leave out --quantize {quantize}"
        )


def device_problems(
    quantize: str,
    quantize_text: str,
    device: torch.device | Target,
    offload: str = "none",
    gguf: bool = False,
) -> list[str]:
    """What stops these choices on this device (or the GPU a plan is for), one line each (empty: nothing).
    `--dry-run` lists them; a run raises the first (`check_device`)."""

    target = device if isinstance(device, Target) else Target.of(device)
    problems = []
    for flag, name in (("--quantize", quantize), ("--quantize-text", quantize_text)):
        mode = MODES.get(name)
        if mode is None:
            continue
        cuda = target.cuda and (target.cuda_here or mode.package != "bitsandbytes")
        if mode.cuda_only and not cuda:
            where = target.name if not target.cuda else "this machine (no CUDA)"
            problems.append(f"{flag} {name} needs a CUDA GPU; on {where} use {flag} {CPU_MODES}")
        elif mode.fp8_matmul and target.capability is not None and target.capability < FP8_CAPABILITY:
            major, minor = target.capability
            problems.append(
                f"{flag} {name} needs fp8 matmuls (compute capability 8.9+: RTX 40xx, L4, H100); "
                f"{target.name} is {major}.{minor}: use {flag} fp8 (same memory) or int8"
            )
        elif not _importable(mode.package):
            problems.append(f"{flag} {name} needs {mode.package}: pip install {mode.package}")
    if gguf and not _importable("gguf"):
        problems.append("a GGUF --transformer needs gguf: pip install gguf")
    if gguf and offload == "sequential":
        problems.append(
            "a GGUF --transformer does not run with --offload sequential (accelerate drops its quantization "
            "types); use --offload model"
        )
    return problems


def check_device(
    quantize: str, quantize_text: str, device: torch.device, offload: str = "none", gguf: bool = False
) -> None:
    """Raise the first of `device_problems`, before anything loads."""
    problems = device_problems(quantize, quantize_text, device, offload, gguf)
    if problems:
        raise DeviceError(problems[0])


def _importable(package: str) -> bool:
    try:
        with quiet_imports():
            importlib.import_module(package)
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Import-time notes stay unsaid: torchao's (CUDA extensions a CPU build cannot load, torch deprecations)
    and diffusers' (torchao classes it no longer finds, for checkpoints saved by torchao: not ours)."""
    from diffusers.utils import logging as diffusers_logging  # sets its level when first used: set it now

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers], diffusers_logging.get_verbosity()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels[0], strict=True):
            logger.setLevel(level)
        diffusers_logging.set_verbosity(levels[1])


# ---------------------------------------------------------------- configs


def _torchao_config(mode: str):
    """torchao's config object for an fp8 / fp8dq / int8 mode.

    `set_inductor_config=False`: torchao's default (True) switches on coordinate-descent tuning and other
    inductor settings for the whole process, never undone, so every later compile (FlexAttention's, the
    blocks' with --compile, in this run and in later runs of the same process) would be autotuned."""
    with quiet_imports():
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
        )
    configs = {
        "fp8": Float8WeightOnlyConfig,
        "fp8dq": Float8DynamicActivationFloat8WeightConfig,  # per-tensor scales: fp8 matmuls on sm 8.9 too
        "int8": Int8WeightOnlyConfig,
    }
    return configs[mode](set_inductor_config=False)


def transformer_config(mode: str, dtype: torch.dtype):
    """The `quantization_config` for `FluxTransformer2DModel.from_pretrained`; None for "none"."""
    if mode == "none":
        return None
    if mode == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from diffusers import TorchAoConfig

    return TorchAoConfig(_torchao_config(mode))


def quantize_built(transformer, mode: str) -> None:
    """Quantize a transformer built in memory (bench --what image's random weights) with the same torchao
    config as `transformer_config` gives from_pretrained: the benchmark measures the same layers. nf4
    (bitsandbytes) quantizes only while loading, so it is refused here."""
    check_built(mode)
    if mode == "none":
        return
    with quiet_imports():
        from torchao.quantization import quantize_

    quantize_(transformer, _torchao_config(mode))  # every Linear, as diffusers' TorchAoConfig does


def check_built(mode: str) -> None:
    """quantize_built's modes: nf4 (bitsandbytes) quantizes only while loading real weights."""
    if mode == "nf4":
        raise ConfigError("--quantize nf4 quantizes while loading real weights; bench (random weights) takes "
                          "fp8, fp8dq or int8")  # fmt: skip


def text_config(mode: str, dtype: torch.dtype):
    """The `quantization_config` for T5's `T5EncoderModel.from_pretrained` (transformers' classes)."""
    if mode == "none":
        return None
    if mode == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from transformers import TorchAoConfig

    return TorchAoConfig(_torchao_config(mode))


def label(quantize: str, quantize_text: str, transformer: str | None) -> str:
    """' (transformer int8, T5 int8)', ' (transformer flux1-dev-Q8_0.gguf)', or '' (nothing quantized)."""
    parts = [f"transformer {Path(transformer).name}"] if transformer else []
    parts += [f"transformer {quantize}"] if quantize != "none" else []
    parts += [f"T5 {quantize_text}"] if quantize_text != "none" else []
    return f" ({', '.join(parts)})" if parts else ""


# ---------------------------------------------------------------- GGUF files
