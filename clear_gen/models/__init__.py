"""One adapter per DiT family: every fact about a model's layout lives in its module here, and nowhere else:
its forward's arguments, blocks and attention modules, RoPE, latent packing, pipeline classes, text
length, shapes for the memory plan (`shapes`), a random full-size builder for benchmarks (`random`), its
VAE's exact tiled decode and encode (`vae`, installed per stage by `set_vae_tiling`).
`flux1` is FLUX.1 [dev], [schnell] and their fine-tunes. May import `core` and `errors` only.

A family is chosen by name (weights.toml's `family` field of a base: `family(name)`) or by the model in
hand (`of(module)`: its diffusers class). A new family is a new module here that defines what `flux1`
defines (FAMILY_API) and one more entry in FAMILIES.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

FAMILIES = {"flux1": "clear_gen.models.flux1"}
DEFAULT = "flux1"
FAMILY_API = (  # what every family module defines (tests hold each family to it)
    "NAME", "TOKEN_PX", "MODEL_CLASSES", "RESIDUALS", "IMAGE_IDS", "CONTROLNET_CONFIG_FIELDS",
    "is_controlnet", "forward_arguments", "text_tokens", "condition_embedder", "image_ids",
    "attention_modules", "blocks", "single_blocks", "clear_projections", "is_clear_key", "flop_shape",
    "rope_theta", "set_rope_theta", "compute_device", "text_length", "pack_latents", "unpack_latents",
    "use_exact_positions", "pipeline_class", "transformer_class", "controlnet_class", "text_encoder_class",
    "shapes", "activations", "ORIGINAL_KEY", "DIFFUSERS_KEY", "ORIGINAL_PREFIX", "convert_original",
    "prompt_cut", "set_vae_tiling",
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


def _classes() -> list[str]:
    return [c for name in FAMILIES for c in family(name).MODEL_CLASSES]
