"""Speed past attention: compiled transformer blocks (--compile) and step caching (--cache).

Both come from diffusers and compose with CLEAR's hooks (attention.py: processors and transformer
pre/post hooks; positions.py: a transformer pre-hook), which they do not touch:
- `compile_blocks`: regional compilation, `transformer.compile_repeated_blocks()`: each repeated block
  class (FLUX's double and single blocks) compiles once and serves all 57 blocks, so compilation takes
  seconds, not minutes. Not `fullgraph`: CLEAR's attention call is kept out of the block graphs
  (`attention.clear_attention` is `torch.compiler.disable`d) and its FlexAttention kernel is compiled
  on its own, with static shapes, as without --compile.
- `step_cache`: diffusers' cache hooks for one stage's denoising. First-block caching (`fbc[:T]`) runs
  the first block at every step and skips the other blocks when its output changed by less than T
  (relative mean absolute change) since the last full step, reusing their last residual; TaylorSeer
  (`taylorseer[:N]`, its lite form) runs every block on a schedule (the first 3 steps, then one step in
  N) and predicts the transformer's output in between from a first-order Taylor expansion. Either way
  the transformer is still called at every step: what is skipped is block evaluations, counted here.

The default is neither. `--compile`: CLEAR's step on the CPU was no faster compiled (and the stock step
slower); on a GPU at 8K the linear layers' matmuls dominate a step and compilation fuses only the
element-wise work around them (a few per cent by a bandwidth estimate) while costing its compile time
once per block class, size and attention, so it is off until `scripts/gpu_bench.sh`'s compile-8k
part shows it pays (BENCHMARKS.md). `--cache` changes the image, so it is the user's choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import models
from ..errors import ConfigError
from ..plan.spec import CacheChoice

_COUNT_HOOK = "clear_gen_block_count"


# ---------------------------------------------------------------- compilation


def compile_blocks(transformer) -> None:
    """Regional compilation of the transformer's repeated blocks (see module docstring); idempotent."""
    if getattr(transformer, "_clear_gen_compiled", False):
        return
    if not hasattr(transformer, "compile_repeated_blocks"):
        raise ConfigError("--compile needs a newer diffusers: pip install -U diffusers")
    transformer.compile_repeated_blocks()  # dynamic=None: a second size compiles once with dynamic shapes
    transformer._clear_gen_compiled = True


# ---------------------------------------------------------------- step caching


def _blocks(transformer) -> list[torch.nn.Module]:
    return models.of(transformer).blocks(transformer)


class _CountHook:
    """A diffusers ModelHook (duck-typed) that counts real evaluations of its block. Registered before
    the cache's hooks, it is the innermost forward: a block the cache skips never reaches it."""

    _is_stateful = False

    def __init__(self, counter: BlockCount):
        self.counter, self.fn_ref = counter, None

    def initialize_hook(self, module):
        return module

    def deinitalize_hook(self, module):  # sic: diffusers' spelling
        return module

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output

    def new_forward(self, module, *args, **kwargs):
        self.counter.evaluated += 1
        return self.fn_ref.original_forward(*args, **kwargs)


@dataclass
class BlockCount:
    """Block evaluations of one stage: those that ran, out of blocks x transformer calls."""

    blocks: int
    calls: int = 0  # transformer calls
    evaluated: int = 0

    @property
    def skipped(self) -> int:
        return self.blocks * self.calls - self.evaluated


def _cache_config(choice: CacheChoice):
    try:
        if choice.kind == "fbc":
            from diffusers.hooks import FirstBlockCacheConfig

            return FirstBlockCacheConfig(threshold=choice.value)
        from diffusers.hooks import TaylorSeerCacheConfig
    except ImportError:
        hint = "pip install -U diffusers"
        raise ConfigError(f"--cache {choice.kind} needs a newer diffusers: {hint}") from None
    # Lite: Taylor factors of the output projection alone (the full form keeps two per attention layer:
    # ~180 GB at 8K), every block skipped on predicted steps. float32 factors: they are small.
    return TaylorSeerCacheConfig(
        cache_interval=int(choice.value), use_lite_mode=True, taylor_factors_dtype=torch.float32
    )


@contextmanager
def step_cache(transformer, choice: CacheChoice) -> Iterator[BlockCount | None]:
    """diffusers' cache hooks on `transformer` for one stage's denoising, counting block evaluations;
    None (and nothing installed) for --cache none. Inside, every transformer call runs in a cache
    context (FluxImg2ImgPipeline sets none of its own); on exit the hooks are gone."""
    if choice.kind == "none":
        yield None
        return
    from diffusers.hooks import HookRegistry

    config = _cache_config(choice)
    count = BlockCount(len(_blocks(transformer)))
    for block in _blocks(transformer):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_CountHook(count), _COUNT_HOOK)
    calls = transformer.register_forward_pre_hook(lambda m, a: setattr(count, "calls", count.calls + 1))
    try:
        transformer.enable_cache(config)
        with transformer.cache_context("cond"):
            yield count
    finally:
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        calls.remove()
        for block in _blocks(transformer):
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(_COUNT_HOOK, recurse=False)
