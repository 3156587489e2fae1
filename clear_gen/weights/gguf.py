"""GGUF transformer files (`--transformer FILE.gguf`): reading a file's tensor names, types and shapes
from its header, and refusing one that is not a whole transformer of the base, or holds types diffusers
cannot read, before anything loads. The model family says what its files are named (models/): FLUX.1's
community files keep BFL's original names (`double_blocks.0.img_attn.qkv.weight`), mapped onto
diffusers' by diffusers' own converter."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import models
from ..errors import WeightsError
from .quantize import quiet_imports


def gguf_config(dtype: torch.dtype):
    """The `quantization_config` for `FluxTransformer2DModel.from_single_file(FILE.gguf)`: blocks stay packed
    in memory and are unpacked to `dtype` layer by layer."""
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=dtype)


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


def check_gguf_file(path: Path, family: str = models.DEFAULT) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A GGUF file's tensors, refused unless it holds a FLUX.1 transformer in types diffusers can read."""
    tensors = gguf_tensors(path)
    fam = models.family(family)
    names = {k.removeprefix(fam.ORIGINAL_PREFIX) for k in tensors}
    if fam.ORIGINAL_KEY not in names and fam.DIFFUSERS_KEY not in names:
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


def diffusers_shapes(
    shapes: Mapping[str, tuple[int, ...]], family: str = models.DEFAULT
) -> dict[str, tuple[int, ...]]:
    """A transformer file's tensor shapes under diffusers' names: a community file's original names
    through diffusers' own key mapping (the family's), run on 'meta' tensors (names and shapes only:
    nothing is read or allocated); diffusers-named files as they are. KeyError: a tensor the mapping needs
    is missing."""
    fam = models.family(family)
    names = {k.removeprefix(fam.ORIGINAL_PREFIX): tuple(s) for k, s in shapes.items()}
    if fam.ORIGINAL_KEY not in names:
        return names
    meta = {k: torch.empty(s, device="meta") for k, s in names.items()}
    with quiet_imports():
        return {k: tuple(v.shape) for k, v in fam.convert_original(meta).items()}


def parameter_shapes(config: Mapping, family: str = models.DEFAULT) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the family's transformer a config describes (built on 'meta')."""
    return dict(_parameter_shapes(json.dumps(dict(config), sort_keys=True), family))


@functools.lru_cache(maxsize=4)
def _parameter_shapes(config_json: str, family: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with quiet_imports():
        kind = models.family(family).transformer_class()
    with torch.device("meta"):
        model = kind.from_config(json.loads(config_json))
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
