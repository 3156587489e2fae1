"""Token order: hooks that tile-order a model's image tokens (and their RoPE positions) at its input and
restore row-major order at its output, so every layer works on tiles with no per-layer gather. The
positions fed to RoPE are exact integers whatever dtype `img_ids` came in (core/positions.py). Under
torchrun's sequence mode the input hook also keeps this rank's slice of the sequence.

What a model's call looks like (argument names, a ControlNet's residuals and condition) comes from its
family's adapter (models/), kept in the state.
"""

from __future__ import annotations

from functools import lru_cache

from ..core import geometry as G
from ..core.positions import exact_ids
from ..errors import ConfigError
from .state import ClearState, Layout


@lru_cache(maxsize=8)
def device_layout(geo: G.Geometry, device: str) -> Layout:
    """The layout of a geometry with its permutations on the device, copied there once."""
    return Layout(geo, G.image_order(geo).to(device), G.image_inverse(geo).to(device))


def register(model, state: ClearState) -> None:
    """The input and output hooks on `model` (and on a ControlNet's condition embedder)."""
    state.hooks = [
        model.register_forward_pre_hook(lambda m, a, k: _pre_hook(state, m, a, k), with_kwargs=True),
        # first of the output hooks: any other (FLUX.1 Kontext's reference, models/flux1/kontext.py) sees
        # the model's output in row-major order
        model.register_forward_hook(lambda m, a, o: _post_hook(state, m, a, o), prepend=True),
    ]
    embedder = state.family.condition_embedder(model)
    if embedder is not None:
        state.hooks.append(embedder.register_forward_pre_hook(lambda m, a: _control_hook(state, m, a)))


def remove(state: ClearState) -> None:
    for handle in state.hooks:
        handle.remove()
    state.hooks = []


def _pre_hook(state: ClearState, module, args: tuple, kwargs: dict):
    """Tile-order hidden_states, exact img_ids and a ControlNet's residuals; record the layout for this
    forward."""
    family = state.family
    kwargs = family.forward_arguments(module, args, kwargs)  # positional arguments by name
    hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    ids = family.image_ids(kwargs)  # (N, axes)
    grid = state.grids(ids)  # found once per ids tensor, not at every step (no GPU sync)
    h, w, f, ref = grid.height, grid.width, state.config.down_factor, grid.reference
    for gh, gw in [(h, w)] + ([(ref.height, ref.width)] if ref is not None else []):
        if gh % f or gw % f:
            raise ConfigError(
                f"CLEAR with down factor {f} needs token grids divisible by {f}; got {gh} x {gw}"
            )
    if ref is not None and state.parallel is not None:
        raise ConfigError(
            "torchrun's sequence mode does not run a reference picture (an edit): use --parallel data"
        )
    reference = (ref.height, ref.width) if ref is not None else None
    geo = G.image_geometry(family.text_tokens(module, text), h, w, state.config.window, f, reference)
    state.layout = device_layout(geo, str(hidden.device))
    perm = state.layout.perm
    kwargs["hidden_states"] = hidden[:, perm]  # (B, N, C) tile order
    kwargs[family.IMAGE_IDS] = exact_ids(grid, hidden.device, ids.shape[-1])[
        perm
    ]  # positions move with tokens
    for name in family.RESIDUALS:  # a ControlNet's, added to the image tokens after each block: tile order
        if kwargs.get(name) is not None:
            kwargs[name] = [sample[:, perm] for sample in kwargs[name]]
    if state.parallel is not None:  # sequence mode: this rank's slice of [text ; image]
        kwargs = state.parallel.shard_inputs(kwargs)
    return (), kwargs


def _control_hook(state: ClearState, module, args: tuple):
    """A ControlNet's condition, packed (B, N, C) row-major as its embedder takes it (whether the pipeline
    packed it or its input_hint_block did): tile order, like the hidden_states it is added to."""
    return (args[0][:, state.layout.perm], *args[1:])


def _post_hook(state: ClearState, module, args, output):
    """Back to row-major order (in sequence mode, once every rank's image tokens are gathered): the model's
    sample, or every residual a ControlNet returns. The layout stays recorded: a gradient-checkpointed
    backward pass runs the blocks (and so the processors) again after the forward has returned."""
    inv = state.layout.inv
    family = state.family
    if family.is_controlnet(module):
        samples = output if isinstance(output, tuple) else [getattr(output, n) for n in family.RESIDUALS]
        rows = [None if s is None else [t[:, inv] for t in s] for s in samples]
        if isinstance(output, tuple):
            return tuple(rows)
        for name, row in zip(family.RESIDUALS, rows, strict=True):
            setattr(output, name, row)
        return output
    sample = output[0] if isinstance(output, tuple) else output.sample
    if state.parallel is not None:
        sample = state.parallel.gather_image(sample)  # (B, N, C): every rank's image tokens, tile order
    if isinstance(output, tuple):
        return (sample[:, inv], *output[1:])
    output.sample = sample[:, inv]
    return output
