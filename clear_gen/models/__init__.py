"""One adapter per DiT family: every fact about a model's layout lives in its module here, and nowhere else:
its forward's arguments, blocks and attention modules (and what they compute around the attention),
RoPE, latent packing, pipeline classes, text encoders and length, shapes for the memory plan (`shapes`),
a random full-size builder for benchmarks (`random`, FLUX.1's), its VAE's exact tiled decode and encode
(`vae`, installed per stage by `set_vae_tiling`), and the reference picture of a model that edits
(`EDIT_PIPELINES`: FLUX.1 Kontext's `reference_size`, `reference_latents`, `reference_tokens`). `flux1`
is FLUX.1 [dev], [schnell] and their fine-tunes (Krea [dev], Kontext [dev]); `flux2` is FLUX.2 [klein].
What families share is in `attention` (joint attention), `layout` (diffusers' FLUX block lists) and
`shapes` (the memory plan's contract). May import `core` and `errors` only.

A family is chosen by name (weights.toml's `family` field of a base: `family(name)`), by the model in
hand (`of(module)`: its diffusers class), by a diffusers folder (`folder_family`: its transformer's
class) or by a CLEAR checkpoint's keys (`checkpoint_family`). A new family is a new module here that
defines what `flux1` defines (FAMILY_API) and one more entry in FAMILIES.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError

FAMILIES = {"flux1": "clear_gen.models.flux1", "flux2": "clear_gen.models.flux2"}
DEFAULT = "flux1"
FAMILY_API = (  # what every family module defines (tests hold each family to it)
    "NAME", "LABEL", "TOKEN_PX", "SDEDIT", "MODEL_CLASSES", "RESIDUALS", "IMAGE_IDS", "TEXT_ENCODER",
    "SAMPLE_EMBEDDINGS", "CONTROLNET_CONFIG_FIELDS", "is_controlnet", "forward_arguments", "text_tokens",
    "condition_embedder", "image_ids", "attention_modules", "attention_call", "attention_parts",
    "attention_output", "blocks", "single_blocks", "clear_projections", "is_clear_key", "flop_shape",
    "rope_theta", "set_rope_theta", "rope_axes", "set_rope", "compute_device", "text_length", "encode_prompt",
    "prompt_arguments", "pack_latents", "unpack_latents", "vae_latents", "model_latents", "forward_inputs",
    "use_exact_positions", "chunk_feed_forward", "pipeline_class", "transformer_class", "controlnet_class",
    "text_encoder_class", "shapes", "activations", "ORIGINAL_KEY", "DIFFUSERS_KEY", "ORIGINAL_PREFIX",
    "convert_original", "prompt_cut", "set_vae_tiling", "EDIT_PIPELINES", "reference_size",
    "reference_latents", "reference_tokens",
)  # fmt: skip


def family(name: str = DEFAULT) -> ModuleType:
    """The adapter of a family named in weights.toml; an unknown name lists the known ones."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; clear-gen knows {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def of(model) -> ModuleType:
    """The adapter of a model in hand (a diffusers transformer or ControlNet), by its class."""
    kind = type(model).__name__
    for name in FAMILIES:
        adapter = family(name)
        if kind in adapter.MODEL_CLASSES:
            return adapter
    raise ConfigError(f"CLEAR does not know {kind}; it runs on {', '.join(_classes())}")


def folder_family(folder: Path) -> str | None:
    """The family of a diffusers model folder, by its transformer/config.json's class; None when it has
    none, or one no family knows."""
    try:
        kind = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((name for name in FAMILIES if kind in family(name).MODEL_CLASSES), None)


def checkpoint_family(keys: Iterable[str]) -> str | None:
    """The family whose CLEAR checkpoint format has every one of `keys`; None when none has (or no keys)."""
    keys = list(keys)
    fits = [name for name in FAMILIES if keys and all(family(name).is_clear_key(k) for k in keys)]
    return fits[0] if fits else None


def _classes() -> list[str]:
    return [c for name in FAMILIES for c in family(name).MODEL_CLASSES]
