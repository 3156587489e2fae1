"""CLEAR's checkpoints on a model: which keys a published checkpoint has (the model's family says which
projections it replaces), refusing one that does not fit, swapping its tensors in and the originals back.

A tensor already on its parameter's device and in its dtype is swapped in without a copy; any other is
copied in, the originals kept in CPU memory as views of one buffer (pinned on a CUDA machine: cpu_copies).
A quantized or sequentially offloaded projection is replaced as a module (a plain Linear holding the
checkpoint's tensors), and the original module waits in the state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import models
from ..errors import CheckpointError
from .state import ClearState


def expected_checkpoint(model, down_factor: int) -> dict[str, torch.Size]:
    """Keys and shapes of a published CLEAR checkpoint for this model."""
    family, shapes = models.of(model), {}
    for name, attn in family.attention_modules(model).items():
        for layer in family.clear_projections(name):
            module = _base(attn.get_submodule(layer))
            shapes[f"{name}.{layer}.weight"] = torch.Size((module.out_features, module.in_features))
            if module.bias is not None:
                shapes[f"{name}.{layer}.bias"] = module.bias.shape
        if down_factor > 1:
            shapes[f"{name}.processor.spatial_weight"] = torch.Size((1, 1, 1, down_factor, 1, down_factor, 1))
    return shapes


def _first(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_checkpoint(transformer, state_dict: Mapping[str, Tensor], down_factor: int) -> None:
    """Refuse a checkpoint that does not fit, naming its first offending keys."""
    expected = expected_checkpoint(transformer, down_factor)
    spatial = [k for k in state_dict if k.endswith("processor.spatial_weight")]
    if spatial and down_factor == 1:
        f = state_dict[spatial[0]].shape[3] if state_dict[spatial[0]].dim() == 7 else "?"
        raise CheckpointError(
            f"this CLEAR checkpoint is down-sampled (f = {f}: {_first(spatial, 1)}) but down_factor=1; "
            f"pass down_factor={f}"
        )
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing:
        raise CheckpointError(
            f"CLEAR checkpoint lacks {len(missing)} keys the model needs: {_first(missing)}"
        )
    if unexpected:
        raise CheckpointError(f"CLEAR checkpoint has {len(unexpected)} unexpected keys: {_first(unexpected)}")
    wrong = [k for k, shape in expected.items() if tuple(state_dict[k].shape) != tuple(shape)]
    if wrong:
        k = sorted(wrong)[0]
        raise CheckpointError(
            f"CLEAR checkpoint does not fit this model: {k} is {tuple(state_dict[k].shape)}, "
            f"the model wants {tuple(expected[k])} ({len(wrong)} keys differ)"
        )


def load(transformer, state: ClearState, state_dict: Mapping[str, Tensor]) -> None:
    """Put the checkpoint's tensors in place, keeping the replaced originals for remove_clear.

    A tensor already on its parameter's device and in its dtype is swapped in without a copy (the
    parameter then shares the checkpoint's storage, and the original stays where it was): with both
    sets on the GPU, apply and remove cost nothing. Any other is copied in, the originals going to CPU
    memory (`cpu_copies`: one buffer, pinned on a CUDA machine). A quantized projection is never written
    into, and a sequentially offloaded one holds no data to write into (`_swapped_whole`): a plain Linear
    holding the checkpoint's tensors takes its place, and the original module waits in `state.modules`.
    """
    swapped: dict[str, dict[str, Tensor]] = {}  # module name -> {"weight": ..., "bias": ...}
    copied: dict[str, tuple[torch.nn.Parameter, Tensor]] = {}  # key -> (parameter, checkpoint tensor)
    with torch.no_grad():
        for key, value in state_dict.items():
            name, _, kind = key.rpartition(".")
            if kind != "spatial_weight" and _swapped_whole(_base(transformer.get_submodule(name))):
                swapped.setdefault(name, {})[kind] = value
                continue
            param = transformer.get_parameter(_base_key(transformer, key))
            if kind == "spatial_weight":
                param.copy_(value)
            elif value.device == param.device and value.dtype == param.dtype:
                state.originals.setdefault(key, param.data)
                param.data = value
            else:
                copied[key] = (param, value)
        pin = any(param.is_cuda for param, _ in copied.values())  # page-locked: copies back at full bus speed
        originals = cpu_copies({key: param for key, (param, _) in copied.items()}, pin)
        for key, (param, value) in copied.items():
            state.originals.setdefault(key, originals[key])
            param.copy_(value)
        for name, tensors in swapped.items():
            original = _base(transformer.get_submodule(name))
            state.modules.setdefault(name, original)
            transformer.set_submodule(
                base_name(transformer, name), _plain_linear(original, tensors, transformer.dtype)
            )


def _base(module: torch.nn.Module) -> torch.nn.Module:
    """The projection itself: under a LoRA (peft's LoraLayer wraps it as `base_layer`), the wrapped one."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def base_name(transformer, name: str) -> str:
    """`name`, or `name.base_layer` when a LoRA wraps that projection now: CLEAR's weights and the originals
    it keeps always belong to the projection under the LoRA, whether the LoRA came before CLEAR or after."""
    module = transformer.get_submodule(name)
    return f"{name}.base_layer" if hasattr(module, "get_base_layer") and module is not _base(module) else name


def _base_key(transformer, key: str) -> str:
    """A parameter key of the checkpoint's format ('...attn.to_q.weight') as it is named now."""
    name, _, kind = key.rpartition(".")
    return f"{base_name(transformer, name)}.{kind}" if kind != "spatial_weight" else key


def _swapped_whole(module: torch.nn.Module) -> bool:
    """A projection replaced as a module rather than in its parameters: one in quantized storage (a torchao
    tensor-subclass weight, a GGUFLinear holding a GGUFParameter, a bitsandbytes Linear4bit; anything
    but a plain Linear with a plain Parameter, so nothing is ever copied into packed bytes), or one under
    accelerate's sequential offload (its weight is on 'meta', the data in the hook's CPU map)."""
    quantized = type(module) is not torch.nn.Linear or type(module.weight) is not torch.nn.Parameter
    return quantized or getattr(getattr(module, "_hf_hook", None), "offload", False)


def _plain_linear(original: torch.nn.Module, tensors: dict, dtype: torch.dtype) -> torch.nn.Linear:
    """A Linear of `original`'s size holding the checkpoint's tensors in the compute dtype, on `original`'s
    device (no copy when a tensor is already there in that dtype). Under sequential offload (an accelerate
    hook that offloads `original`) it is offloaded alike, to run on the hook's device."""
    hook = getattr(original, "_hf_hook", None)
    offloaded = getattr(hook, "offload", False)
    device = torch.device("cpu") if offloaded else original.weight.device
    linear = torch.nn.Linear(original.in_features, original.out_features, "bias" in tensors, device="meta")
    for kind, value in tensors.items():
        setattr(linear, kind, torch.nn.Parameter(value.to(device, dtype), requires_grad=False))
    if offloaded:
        from accelerate import cpu_offload

        cpu_offload(linear, hook.execution_device)
    return linear


def cpu_copies(tensors: Mapping[str, Tensor], pin: bool) -> dict[str, Tensor]:
    """CPU copies of `tensors` (same names, shapes and dtypes): views of one flat buffer, page-locked when
    `pin` (copies to the GPU then run at full bus speed).

    One buffer, not one per tensor: torch's pinned allocator rounds each allocation up to a power of two,
    so a FLUX projection's 18.9 MB took 32 MiB and a checkpoint's copies ~1.8x their size. Laid out by
    element size, largest first, every view starts aligned to its dtype with no padding: the buffer holds
    exactly the tensors' bytes (`flat_bytes`)."""
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    buffer = torch.empty(flat_bytes(tensors.values()), dtype=torch.uint8, pin_memory=pin)
    copies, offset = {}, 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        copies[name] = buffer[offset : offset + size].view(t.dtype).view(t.shape).copy_(t.detach())
        offset += size
    return {name: copies[name] for name in tensors}


def flat_bytes(tensors) -> int:
    """Bytes of `cpu_copies`' buffer for these tensors: their own bytes, nothing more."""
    return sum(t.numel() * t.element_size() for t in tensors)


def restore(transformer, originals: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in originals.items():
            param = transformer.get_parameter(_base_key(transformer, key))
            if value.device == param.device:
                param.data = value
            else:
                param.copy_(value, non_blocking=True)  # from pinned memory: asynchronous
