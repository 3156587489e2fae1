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
import functools
import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, DeviceError, WeightsError


@dataclass(frozen=True)
class Mode:
    """One --quantize / --quantize-text mode: the one table of them (the memory plan reads it too)."""

    name: str
    package: str  # the import (and pip) name of the library doing it
    cuda_only: bool
    fp8_matmul: bool  # needs fp8 tensor cores (gpus.FP8_CAPABILITY)
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
    from .gpus import FP8_CAPABILITY

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
    """torchao's config object for an fp8 / fp8dq / int8 mode."""
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
    return configs[mode]()


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
    if mode == "none":
        return
    if mode == "nf4":
        raise ConfigError("--quantize nf4 quantizes while loading real weights; bench --what image takes "
                          "fp8, fp8dq or int8")  # fmt: skip
    with quiet_imports():
        from torchao.quantization import quantize_

    quantize_(transformer, _torchao_config(mode))  # every Linear, as diffusers' TorchAoConfig does


def text_config(mode: str, dtype: torch.dtype):
    """The `quantization_config` for T5's `T5EncoderModel.from_pretrained` (transformers' classes)."""
    if mode == "none":
        return None
    if mode == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from transformers import TorchAoConfig

    return TorchAoConfig(_torchao_config(mode))


def gguf_config(dtype: torch.dtype):
    """The `quantization_config` for `FluxTransformer2DModel.from_single_file(FILE.gguf)`: blocks stay packed
    in memory and are unpacked to `dtype` layer by layer."""
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=dtype)


def label(quantize: str, quantize_text: str, transformer: str | None) -> str:
    """' (transformer int8, T5 int8)', ' (transformer flux1-dev-Q8_0.gguf)', or '' (nothing quantized)."""
    parts = [f"transformer {Path(transformer).name}"] if transformer else []
    parts += [f"transformer {quantize}"] if quantize != "none" else []
    parts += [f"T5 {quantize_text}"] if quantize_text != "none" else []
    return f" ({', '.join(parts)})" if parts else ""


# ---------------------------------------------------------------- GGUF files

BFL_KEY = "double_blocks.0.img_attn.qkv.weight"  # community files (city96, ...) keep the original names
DIFFUSERS_KEY = "transformer_blocks.0.attn.to_q.weight"
BFL_PREFIX = "model.diffusion_model."  # some files keep the full original checkpoint's prefix


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (GGML type, shape in torch's order) of a GGUF file's tensors, from its header: the data is
    memory-mapped, not read. A truncated or non-GGUF file is one WeightsError."""
    with quiet_imports():
        from gguf import GGUFReader
    try:
        reader = GGUFReader(path)
        return {t.name: (t.tensor_type.name, tuple(map(int, reversed(t.shape)))) for t in reader.tensors}
    except Exception as e:  # bad magic, short reads and views past the end come as several error types
        raise WeightsError(
            f"{path} is not a readable GGUF file, truncated or not GGUF ({str(e)[:120]}); download it again"
        ) from e


def check_gguf_file(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A GGUF file's tensors, refused unless it holds a FLUX.1 transformer in types diffusers can read."""
    tensors = gguf_tensors(path)
    names = {k.removeprefix(BFL_PREFIX) for k in tensors}
    if BFL_KEY not in names and DIFFUSERS_KEY not in names:
        first = ", ".join(sorted(tensors)[:3]) or "none"
        raise WeightsError(
            f"{path} is not a FLUX.1 transformer (its tensors: {first}); give a FLUX.1 transformer GGUF, "
            "e.g. city96/FLUX.1-dev-gguf/flux1-dev-Q8_0.gguf"
        )
    with quiet_imports():
        from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    readable = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | {"F32", "F16"}
    odd = sorted({kind for kind, _ in tensors.values()} - readable)
    if odd:
        raise WeightsError(
            f"{path} holds {', '.join(odd)} tensors, which diffusers cannot read; "
            "use a Q8_0, Q6_K, Q5_K or Q4_K file"
        )
    return tensors


def diffusers_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A FLUX.1 transformer file's tensor shapes under diffusers' names: a community file's original (BFL)
    names through diffusers' own key mapping, run on 'meta' tensors (names and shapes only: nothing is
    read or allocated); diffusers-named files as they are. KeyError: a tensor the mapping needs is missing."""
    names = {k.removeprefix(BFL_PREFIX): tuple(s) for k, s in shapes.items()}
    if BFL_KEY not in names:
        return names
    with quiet_imports():
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    meta = {k: torch.empty(s, device="meta") for k, s in names.items()}
    return {k: tuple(v.shape) for k, v in convert_flux_transformer_checkpoint_to_diffusers(meta).items()}


def parameter_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the FluxTransformer2DModel a config describes (built on 'meta')."""
    return dict(_parameter_shapes(json.dumps(dict(config), sort_keys=True)))


@functools.lru_cache(maxsize=4)
def _parameter_shapes(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with quiet_imports():
        from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(json.loads(config_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def check_gguf_transformer(path: Path, config: Mapping) -> None:
    """Refuse, in one line, a GGUF file that is not the transformer `config` (the base's) describes."""
    tensors = check_gguf_file(path)
    check_transformer_shapes(str(path), {k: shape for k, (_, shape) in tensors.items()}, config)


def check_transformer_shapes(what: str, shapes: Mapping[str, tuple[int, ...]], config: Mapping) -> None:
    """A transformer file's tensor shapes (original or diffusers names) against the model `config` describes:
    every parameter present, in its shape. `what` names the file in the error."""
    try:
        found = diffusers_shapes(shapes)
    except (KeyError, RuntimeError) as e:  # a tensor the mapping pops is absent, or splits do not add up
        raise WeightsError(f"{what} is not a whole FLUX.1 transformer ({e!s:.80}); download it again") from e
    expected = parameter_shapes(config)
    missing = sorted(expected.keys() - found.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if found[k] != expected[k])
    if missing:
        raise WeightsError(
            f"{what} lacks {len(missing)} tensors the base's transformer has ({', '.join(missing[:2])}): "
            "a FLUX.1 dev file needs --model dev, a schnell file --model schnell"
        )
    if wrong:
        k = wrong[0]
        raise WeightsError(
            f"{what} does not fit the base's transformer: {k} is {found[k]}, the base wants {expected[k]} "
            f"({len(wrong)} tensors differ)"
        )
