"""Peak bytes of the tensors a piece of code keeps alive, counted op by op: runs on the 'meta' device,
so a full-width FLUX block at 8K costs no memory and no compute.

A storage counts from the op that creates it until it is freed; storages that exist before (weights,
inputs) and views of them count nothing. This is what torch's caching allocator reports as
max_memory_allocated on a GPU, less its 512-byte rounding.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> counted bytes
        self.current = self.peak = 0

    def _free(self, n: int) -> None:
        self.current -= n

    def _storages(self, tree):
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                yield t.untyped_storage()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for storage in self._storages((args, kwargs)):
            self.seen.setdefault(storage, 0)  # existing before: not counted
        out = func(*args, **(kwargs or {}))
        for storage in self._storages(out):
            if storage not in self.seen:
                n = storage.nbytes()
                self.seen[storage] = n
                self.current += n
                weakref.finalize(storage, self._free, n)
                self.peak = max(self.peak, self.current)
        return out


def flash_like_sdpa(query, key, value, *args, **kwargs):
    """What a fused attention kernel keeps: its output, in the layout of its (B, L, H, D) inputs, and
    its float32 log-sum-exp; no score matrix."""
    b, h, length, d = query.shape
    torch.empty(b, h, length, dtype=torch.float32, device=query.device)  # log-sum-exp
    return torch.empty(b, length, h, d, dtype=query.dtype, device=query.device).transpose(1, 2)


def flash_like_clear(query, key, value, geo, scale, backend="auto", note=None):
    """The same for CLEAR's FlexAttention call: its output like the query, and a log-sum-exp."""
    torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
    return torch.empty_like(query)
