"""CLEAR attention for any DiT family models/ knows, and its public API.

`apply_clear` does four things to a model (a transformer or a ControlNet), all undone by `remove_clear`:
1. a `ClearAttnProcessor` on every attention module (processor.py; it takes the stock processor's arguments);
2. RoPE theta multiplied by `ntk_factor`;
3. hooks that tile-order the image tokens and their RoPE positions at the model's input and restore
   row-major order at its output (hooks.py); under torchrun's sequence mode they also keep this rank's
   slice of the sequence, and the processors trade it for every token of this rank's heads around
   attention (run.world.SequenceShards);
4. optionally, a CLEAR checkpoint's projections and spatial weights (weights.py). On a quantized
   transformer (torchao, GGUF, bitsandbytes) the projections come in as plain Linear layers in the compute
   dtype, and remove_clear puts the quantized ones back.
The kernels are a registry (backends.py; the plain-torch block-sparse one in gather.py). May import
`core`, `models` and `errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

from .. import models
from ..errors import ConfigError
from . import hooks
from .backends import check_backend
from .processor import ClearAttnProcessor
from .state import ClearConfig, ClearState
from .weights import base_name, check_checkpoint, expected_checkpoint, load, restore

__all__ = [
    "ClearConfig",
    "apply_clear",
    "clear_config",
    "expected_checkpoint",
    "original_attention",
    "remove_clear",
]


def check_window(window, down_factor, flags: bool = False) -> None:
    """A CLEAR window and down factor: positive integers (the one check, for flags and library calls)."""
    for name, value in (("window", window), ("down_factor", down_factor)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            shown = f"--{name.replace('_', '-')}" if flags else name
            raise ConfigError(f"{shown} must be a positive integer, got {value!r}")


def _validate(config: ClearConfig) -> None:
    check_window(config.window, config.down_factor)
    if not config.ntk_factor > 0:
        raise ConfigError(f"ntk_factor must be positive, got {config.ntk_factor!r}")
    check_backend(config.backend)


def apply_clear(
    model,
    *,
    window: int,
    down_factor: int = 1,
    state_dict: Mapping[str, Tensor] | None = None,
    proportional_attention: bool = False,
    ntk_factor: float = 1.0,
    backend: str = "auto",
    parallel: object | None = None,
    note: Callable[[str], None] | None = None,
) -> None:
    """Turn a diffusers model (a transformer or ControlNet of a family models/ knows) into its CLEAR
    version, in place (see the package docstring).

    Applying again first removes the previous CLEAR. A checkpoint that does not fit is refused
    before anything changes. `parallel`: a run.world.SequenceShards for torchrun's sequence mode. `note`
    hears a line worth telling while the model runs (a kernel that failed to compile and was replaced);
    without it, a warning.
    """
    config = ClearConfig(window, down_factor, proportional_attention, ntk_factor, backend)
    _validate(config)
    family = models.of(model)
    modules = family.attention_modules(model)
    if any(getattr(a, "fused_projections", False) for a in modules.values()):
        raise ConfigError("CLEAR needs separate q/k/v projections: call transformer.unfuse_qkv_projections()")
    if state_dict is not None:
        check_checkpoint(model, state_dict, down_factor)
    remove_clear(model)
    state = ClearState(config, family, theta=family.rope_theta(model), parallel=parallel, note=note)
    like = torch.empty(0, dtype=model.dtype, device=family.compute_device(model))  # not GGUF's uint8
    for name, attn in modules.items():
        state.processors[name] = attn.processor
        attn.set_processor(ClearAttnProcessor(state, like))
    if state_dict is not None:
        load(model, state, state_dict)
    family.set_rope_theta(model, state.theta * ntk_factor)
    hooks.register(model, state)
    model._clear_state = state


def remove_clear(model) -> None:
    """Back to the stock attention: processors, RoPE theta, token order and replaced weights restored."""
    state: ClearState | None = getattr(model, "_clear_state", None)
    if state is None:
        return
    hooks.remove(state)
    modules = state.family.attention_modules(model)
    for name, processor in state.processors.items():
        modules[name].set_processor(processor)
    for name, module in state.modules.items():
        model.set_submodule(base_name(model, name), module)
    restore(model, state.originals)
    state.family.set_rope_theta(model, state.theta)
    del model._clear_state


def clear_config(model) -> ClearConfig | None:
    """The CLEAR settings of a model, or None when it runs stock attention."""
    state = getattr(model, "_clear_state", None)
    return None if state is None else state.config


@contextmanager
def original_attention(model) -> Iterator[None]:
    """Inside: the stock model that CLEAR was applied to (its processors, RoPE theta, row-major tokens
    and the projections a checkpoint replaced); outside: CLEAR exactly as before.

    The replaced projections are swapped back by pointer, not copied, so they must be on the same device
    as the CLEAR ones: this is how a distillation's full-attention teacher shares every weight with its
    CLEAR student (clear_gen.distill). Do not step an optimiser inside.
    """
    state: ClearState | None = getattr(model, "_clear_state", None)
    assert state is not None, "original_attention needs a model with CLEAR applied"
    family = state.family
    modules = family.attention_modules(model)
    clear_processors = {name: modules[name].processor for name in state.processors}
    clear_data = {key: model.get_parameter(key).data for key in state.originals}
    assert all(value.device == clear_data[key].device for key, value in state.originals.items()), (
        "original_attention swaps projections by pointer: keep the originals on the model's device"
    )
    hooks.remove(state)
    for name, processor in state.processors.items():
        modules[name].set_processor(processor)
    restore(model, state.originals)
    family.set_rope_theta(model, state.theta)
    try:
        yield
    finally:
        restore(model, clear_data)
        for name, processor in clear_processors.items():
            modules[name].set_processor(processor)
        family.set_rope_theta(model, state.theta * state.config.ntk_factor)
        hooks.register(model, state)
