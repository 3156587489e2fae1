"""LoRAs on the FLUX.1 transformer: `--lora PATH_OR_REPO[:SCALE]`, through diffusers' load_lora_weights.

Every LoRA stays a separate adapter beside the projection it wraps (peft's LoraLayer, the projection as its
`base_layer`), not fused into the weights: CLEAR's checkpoints replace the attention projections, so a fused
LoRA would be lost on them in every CLEAR stage, while a separate one adds its low-rank term to whichever
weights are under it (the base's in the full-attention first pass, CLEAR's after). Its cost is two rank-r
matmuls per wrapped layer, about 2r / 3072 of that layer's (1% at r = 16); the attention dominates at 2K-8K.

peft wraps every transformer clear-gen loads: plain, torchao's (--quantize int8, fp8, fp8dq), bitsandbytes'
(nf4) and GGUF (--transformer); CLEAR's plain Linear goes under the wrapper in all of them (attention.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import ClearGenError, ConfigError, WeightsError
from .hub import HUB_FILE, REPO_ID
from .spec import LoraSpec

DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes
_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "alpha")


def parse_loras(loras: Sequence[str], files: Sequence[str] = ()) -> list[LoraSpec]:
    """Every --lora PATH_OR_REPO[:SCALE]; each --lora-file, in order, names the file of the next --lora that
    is a bare owner/repo (else the repo's pytorch_lora_weights.safetensors)."""
    pending, specs = list(files), []
    for given in loras:
        where, scale = _split_scale(given)
        path = Path(where).expanduser()
        if path.is_file():
            specs.append(LoraSpec(str(path.resolve()), None, scale))
        elif (
            (match := HUB_FILE.match(where))
            and where.endswith(".safetensors")
            and not where.startswith((".", "/", "~"))
        ):
            specs.append(LoraSpec(match.group(1), match.group(2), scale))
        elif REPO_ID.match(where) and not path.exists():
            specs.append(LoraSpec(where, pending.pop(0) if pending else DEFAULT_FILE, scale))
        else:
            raise ConfigError(
                f"--lora {given}: no such file, nor a Hub owner/repo or owner/repo/file.safetensors"
            )
    if pending:
        raise ConfigError(f"--lora-file {pending[0]}: no --lora owner/repo left for it to name a file of")
    return specs


def _split_scale(given: str) -> tuple[str, float]:
    """'style.safetensors:0.8' -> ('style.safetensors', 0.8); no ':' -> scale 1. A colon followed by a path
    (Windows' C:/loras/x.safetensors) is part of the path."""
    where, colon, tail = given.rpartition(":")
    if not colon or "/" in tail or "\\" in tail:
        return given, 1.0
    try:
        scale = float(tail)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise ConfigError(f"--lora {given}: the scale {tail!r} is not a number; write PATH_OR_REPO:0.8")
    return where, scale


def hub_files(specs: Sequence[LoraSpec]) -> list[tuple[str, str]]:
    """(repo, file) of every LoRA from the Hub."""
    return [(s.source, s.file) for s in specs if s.file is not None]


def lora_file(spec: LoraSpec, token: str | None = None) -> Path:
    """A LoRA's file: a local one as is, a Hub one from the cache or the Hub (cache only when offline)."""
    from .hub import hub_file

    return Path(spec.source) if spec.file is None else hub_file(spec.source, spec.file, "LoRA", token)


def check_flux_lora(state_dict: dict, transformer, file: Path) -> None:
    """A LoRA (diffusers' format, as lora_state_dict converts it) fits this transformer, else one error naming
    its first key that does not: a layer the transformer lacks, or one of another size."""
    for key, value in state_dict.items():
        if key.startswith("text_encoder."):
            continue  # a CLIP LoRA beside the transformer's: diffusers loads it too
        name, suffix = _module_and_suffix(key)
        module = _linear(transformer, name)
        if module is None or suffix is None:
            raise WeightsError(f"{file.name} is not a LoRA for this FLUX.1 transformer: it has {key}")
        wanted = module.in_features if suffix == "lora_A.weight" else module.out_features
        got = value.shape[1] if suffix == "lora_A.weight" else value.shape[0]
        if suffix != "alpha" and got != wanted:
            raise WeightsError(
                f"{file.name} is a LoRA for another model: {key} is {tuple(value.shape)}, "
                f"this FLUX.1 transformer's {name} takes {module.in_features} -> {module.out_features}"
            )


def _module_and_suffix(key: str) -> tuple[str, str | None]:
    """'transformer.x.attn.to_q.lora_A.weight' -> ('x.attn.to_q', 'lora_A.weight')."""
    name = key.removeprefix("transformer.")
    for suffix in _SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, None


def _linear(transformer, name: str):
    try:
        module = transformer.get_submodule(name)
    except AttributeError:
        return None
    return module if hasattr(module, "in_features") and hasattr(module, "out_features") else None


def load_loras(pipe, specs: Sequence[LoraSpec], token: str | None = None) -> None:
    """Every LoRA into pipe's transformer as its own adapter, checked first, each at its scale."""
    if not specs:
        return
    names = []
    for i, spec in enumerate(specs):
        file = lora_file(spec, token)
        with _converter_errors(file, "read"):
            state_dict = pipe.lora_state_dict(str(file))
        check_flux_lora(state_dict, pipe.transformer, file)
        names.append(f"lora{i}_{spec.name}")
        with _converter_errors(file, "load"):
            pipe.load_lora_weights(str(file), adapter_name=names[-1])  # again from the file: with its alphas
    pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])


@contextlib.contextmanager
def _converter_errors(file: Path, verb: str) -> Iterator[None]:
    """Whatever diffusers' LoRA converters raise on a file they do not understand (ValueError, KeyError,
    an AssertionError in a format converter, ...) as one line naming the file; running out of memory is
    not the file's fault and passes through."""
    import torch

    try:
        yield
    except (ClearGenError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        said = str(e).strip().splitlines()[0].split(":")[0].strip()[:80] if str(e).strip() else ""
        raise WeightsError(
            f"{file.name} is not a FLUX.1 LoRA diffusers can {verb} ({_first_key(file)}: "
            f"{said or f'diffusers stopped with {type(e).__name__}'})"
        ) from e


def _first_key(file: Path) -> str:
    """A file's first tensor name, for an error message."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            keys = sorted(f.keys())
    except Exception:  # safetensors raises its own error types for a corrupt header
        return "not a readable .safetensors file"
    return f"its first key is {keys[0]}" if keys else "it holds no tensors"
