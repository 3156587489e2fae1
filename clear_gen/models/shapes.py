"""What the memory plan (plan/) asks of a model family's shapes, and what every family's shapes share: a
component's parameter counts (`Params`), counting them from a diffusers folder's safetensors headers
(no weights read), and the `ModelShapes` contract each family's shapes.py fills in.

The plan never asks which family it plans: it calls a `ModelShapes`'s methods (the transformer's
parameters, CLEAR's, one step's activations, the VAE's), which run the formulas of the family whose
shapes.py made it (its functions of the same names, and its activations.py's). May import `core` and
`errors` only.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, fields
from math import prod
from pathlib import Path
from types import ModuleType
from typing import Any

from ..core.tensorfile import file_shapes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Params:
    """One component's parameters as a quantizer sees them."""

    linear: int  # weights of nn.Linear layers: what quantization stores in fewer bits
    rows: int  # their output features, summed: one scale per row when quantized
    other: int  # biases, norms, embeddings: kept in the compute dtype
    largest: int  # the largest Linear weight: quantized layers dequantize one at a time

    @property
    def total(self) -> int:
        return self.linear + self.other


NO_PARAMS = Params(0, 0, 0, 0)  # a component the model does not have


class TransformerFields:
    """What the plan reads of a family's TransformerConfig (a frozen dataclass of the config.json fields
    that size its transformer, subclassing this): hidden size, text length, the FLOP model's shape."""

    attention_head_dim: int
    num_attention_heads: int

    @property
    def hidden(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    @property
    def text_len(self) -> int:
        return _family_of(self).text_length(self)

    @property
    def flux_shape(self):
        return _family_of(self).flop_shape(self)

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _family_of(thing, module: str = "") -> ModuleType:
    """The family package a shapes object's class is defined in (models.<family>), or its `module`."""
    package = type(thing).__module__.rpartition(".")[0]
    return importlib.import_module(f"{package}.{module}" if module else package)


@dataclass(frozen=True)
class ModelShapes:
    """A model's shapes without its weights. Each family's shapes.py subclasses it (with its
    TransformerConfig) and defines the formulas its methods run: transformer_params(cfg),
    clear_params(cfg, f), controlnet_params(cfg, ...), mlp_params(cfg), and in activations.py
    step_activations(T, N, cfg, e, chunk, attention) and vae_activations(...)."""

    transformer: Any  # the family's TransformerConfig: hidden, text_len, flux_shape, attention_head_dim
    text: Params  # the text encoder --quantize-text quantizes (FLUX.1's T5)
    text_small: Params  # the one kept in the compute dtype (FLUX.1's CLIP); NO_PARAMS when there is none
    vae: int  # parameters
    vae_tile: int  # px: the VAE's sample_size, its tile side when tiling
    source: str  # where the shapes come from, for the plan's header
    note: str | None = None  # an assumption worth telling

    @property
    def text_len(self) -> int:
        return self.transformer.text_len

    def transformer_params(self) -> Params:
        return _family_of(self, "shapes").transformer_params(self.transformer)

    def clear_params(self, down_factor: int) -> int:
        """Parameters a CLEAR checkpoint of this model replaces (and its f x f spatial weights)."""
        return _family_of(self, "shapes").clear_params(self.transformer, down_factor)

    def controlnet_params(self, num_layers: int, num_single_layers: int, num_mode: int) -> Params:
        formula = _family_of(self, "shapes").controlnet_params
        return formula(self.transformer, num_layers, num_single_layers, num_mode)

    def mlp_params(self) -> int:
        """Parameters of the feed-forward layers that chunking runs slice by slice (each slice streams
        them again under sequential offload)."""
        return _family_of(self, "shapes").mlp_params(self.transformer)

    def step_activations(
        self, text_len: int, image_len: int, e: int, chunk: int | None, attention: int | None = None
    ) -> int:
        """Peak bytes of one transformer call on T + N tokens at e bytes an element; `chunk`: the
        feed-forward slice; `attention`: another processor's attention-phase bytes (CLEAR's)."""
        formula = _family_of(self, "activations").step_activations
        return formula(text_len, image_len, self.transformer, e, chunk, attention)

    def vae_activations(
        self, width: int, height: int, e: int, tiling: str, tile: int, encode: bool, parked: bool = True
    ) -> int:
        return _family_of(self, "activations").vae_activations(width, height, e, tiling, tile, encode, parked)


def read_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def shipped_params(table: dict) -> Params:
    """Params from a shapes.toml table: parameters, linear, rows, largest."""
    return Params(table["linear"], table["rows"], table["parameters"] - table["linear"], table["largest"])


def shipped(kind, config, data: dict, base: str, source: str, note: str | None, text: str, text_small=None):
    """A family's ModelShapes (`kind`, its TransformerConfig `config`) of `base` from its shapes.toml
    `data`; `text`, `text_small`: the tables of its text encoders (None: it has one)."""
    return kind(
        transformer=config.from_dict(data["transformer"][base]),
        text=shipped_params(data[text]),
        text_small=shipped_params(data[text_small]) if text_small else NO_PARAMS,
        vae=data["vae"]["parameters"],
        vae_tile=data["vae"]["sample_size"],
        source=source,
        note=note,
    )


def _header_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from every .safetensors file in a folder (headers only, no weights read)."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update(file_shapes(path))
    return shapes


def folder_params(folder: Path) -> Params | None:
    """A component's parameters from its safetensors headers: 2-D weights other than embeddings count
    as Linear. None when the folder has no safetensors files."""
    shapes = _header_shapes(folder)
    if not shapes:
        return None
    linear = {k: s for k, s in shapes.items() if len(s) == 2 and k.endswith(".weight") and "embed" not in k}
    total = sum(prod(s) for s in shapes.values())
    sizes = [prod(s) for s in linear.values()] or [0]
    return Params(sum(sizes), sum(s[0] for s in linear.values()), total - sum(sizes), max(sizes))
