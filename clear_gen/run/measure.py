"""Measuring a run: its steps as they run (StepClock), its peak GPU memory, and full attention at the same
size (one warm stock step; composed from timed attention ops when the step is too large to run; or the FLOP
model); what is measured goes into files.record's RunTiming."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from .. import models
from ..attention import clear_config, remove_clear
from ..attention.backends import clear_attention
from ..core import device as D
from ..core.clock import samples, timeit
from ..core.device import synchronize
from ..core.flops import FluxShape, speedup_bound, step_flops
from ..core.geometry import Geometry, build_block_lists
from ..files.record import StageTiming

FULL_MEASURE_BUDGET_S = 60.0  # measure full attention when a warm + timed step costs less than this


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU memory high-water mark (CUDA, MPS; nothing on the CPU). CUDA's cached blocks are
    released first: the reserved mark restarts from what is in use, not from what an earlier phase (a stock
    step timed for the comparison, the last stage's decode) left in torch's cache."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if device.type != "cpu":
        D.reset_peak_memory(device)


def record_peak_memory(timing: StageTiming, device: torch.device) -> None:
    """Raise the stage's peak figures to the high-water marks since the last reset: CUDA's allocated and
    reserved, MPS's driver pool as reserved; None on the CPU (the process's memory is not the stage's)."""
    if device.type == "cpu":
        return
    allocated, reserved = D.peak_memory(device)
    if allocated is not None:
        timing.peak_allocated_gb = max(timing.peak_allocated_gb or 0.0, allocated)
    if reserved is not None:
        timing.peak_reserved_gb = max(timing.peak_reserved_gb or 0.0, reserved)


class StepClock:
    """Times a stage's denoising steps: from the transformer's first call, then at each step's end.

    Use it as the pipeline's `callback_on_step_end` inside `with clock.watching(transformer):`.
    `on_step(done, seconds)` is called after each step with the seconds of that step.
    """

    def __init__(self, device: torch.device, on_step: Callable[[int, float], None] | None = None):
        self.device, self.on_step = device, on_step
        self.started = time.perf_counter()  # the stage's start
        self.stamps: list[float] = []  # [first transformer call, end of step 1, end of step 2, ...]

    @contextmanager
    def watching(self, transformer) -> Iterator[None]:
        def first_call(module, args, kwargs):
            if not self.stamps:
                synchronize(self.device)
                self.stamps.append(time.perf_counter())

        handle = transformer.register_forward_pre_hook(first_call, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.on_step:
            self.on_step(len(self.stamps) - 1, self.stamps[-1] - self.stamps[-2])
        return kwargs

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]

    def warm_step_seconds(self) -> float | None:
        """Median of the steps after the first (which holds compilation); None with one step."""
        d = self.durations()[1:]
        return sorted(d)[len(d) // 2] if d else None


@dataclass
class StepCall:
    """One denoising step's model calls with the inputs of their last calls (capture_transformer_call):
    the ControlNet's, when there is one (its residuals then feed the transformer, as in diffusers'
    ControlNet pipelines), then the transformer's."""

    transformer: torch.nn.Module
    inputs: dict
    controlnet: torch.nn.Module | None = None
    control_inputs: dict | None = None

    def __call__(self):
        if self.controlnet is None:
            return self.transformer(**self.inputs)
        outputs = self.controlnet(**{**self.control_inputs, "return_dict": False})
        residuals = dict(zip(models.of(self.transformer).RESIDUALS, outputs, strict=True))
        return self.transformer(**{**self.inputs, **residuals})

    @property
    def complete(self) -> bool:
        """Both calls were seen (a stage that never ran a step has nothing to repeat)."""
        return bool(self.inputs) and (self.controlnet is None or bool(self.control_inputs))


def time_step(step: StepCall, device: torch.device) -> float:
    """Seconds of one more (warm) step with the inputs of the last."""
    with torch.no_grad():
        return samples(step, device, 1)[0] / 1e3


@contextmanager
def capture_transformer_call(transformer) -> Iterator[dict]:
    """Keep the last call's inputs, seen before any CLEAR hook changes them."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen.clear()
        seen.update(kwargs)

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield seen
    finally:
        handle.remove()


class StockSteps:
    """Full attention's warm step at each size, measured (or composed) once: a run keeps one, and
    LoadedPipelines one per pipeline, so that a batch of images (and compare's variants) measure each size
    once. The key is what a stock step's time depends on: sizes, batch, dtype, device, whether a ControlNet
    runs in it."""

    def __init__(self) -> None:
        self.seconds: dict[tuple, tuple[float, bool]] = {}  # key -> (seconds, composed)

    def time(
        self, step: StepCall, timing: StageTiming, geo: Geometry, device, reapply, fits: bool = True
    ) -> None:
        """timing.full_step_s: one warm step with stock attention when that is cheap (and `fits`: the memory
        plan says its activations fit); else composed from one timed stock attention op and one CLEAR op at
        this size (composed_full_step, `full_composed`) when those are cheap; else the FLOP model
        (`full_estimated`). With a ControlNet the step is the ControlNet's call and the transformer's, both
        with stock attention, as the stage's steps were both of them with CLEAR; `reapply` puts CLEAR back
        after.

        The FLOP-model estimate scales the measured CLEAR step by the FLOP ratio (linear + full attention)
        / (linear + computed CLEAR attention), so it assumes both run at the same FLOP rate (at 8K on an
        H200 that overstated full attention's step by ~40%); a ControlNet's blocks are counted as more
        transformer blocks. Each is one GPU's: in sequence mode the stock step runs whole on each GPU, and
        the estimate starts from the CLEAR step's GPU-seconds (step_s x gpus, as if the step scaled
        perfectly).
        """
        key = _stock_key(step, geo, device) if step.inputs else None
        if key in self.seconds:
            timing.full_step_s, timing.full_composed = self.seconds[key]
            return
        gpu_seconds = timing.step_s * timing.gpus
        estimate = gpu_seconds * speedup_bound(_step_flops(step, geo))
        if 2 * estimate > FULL_MEASURE_BUDGET_S or not step.complete or not fits:
            shape, layers = _clear_layers(step)
            if 2 * estimate / layers > FULL_MEASURE_BUDGET_S:  # more than a stock op costs (FLOP model)
                timing.full_step_s, timing.full_estimated = estimate, True
                return
            dtype = step.inputs["hidden_states"].dtype if step.inputs else step.transformer.dtype
            backend = clear_config(step.transformer).backend
            stock_ms, clear_ms = attention_ops_ms(geo, shape.heads, shape.head_dim, device, dtype, backend)
            timing.full_step_s = composed_full_step(gpu_seconds, layers, stock_ms / 1e3, clear_ms / 1e3)
            timing.full_composed = True
            if key is not None:
                self.seconds[key] = (timing.full_step_s, True)
            return
        remove_clear(step.transformer)
        if step.controlnet is not None:
            remove_clear(step.controlnet)
        try:
            with torch.no_grad():  # one warm-up, one timed
                median_ms, _ = timeit(step, device, repeats=1)
            timing.full_step_s = median_ms / 1e3
            self.seconds[key] = (timing.full_step_s, False)
        finally:
            reapply()


def _stock_key(step: StepCall, geo: Geometry, device) -> tuple:
    hidden = step.inputs["hidden_states"]
    return (
        geo.text_len,
        geo.height,
        geo.width,
        geo.ref_height,  # an edit's reference picture (FLUX.1 Kontext): more tokens
        geo.ref_width,
        hidden.shape[0],
        hidden.dtype,
        str(device),
        step.controlnet is None,
    )


def _step_flops(step: StepCall, geo: Geometry) -> dict[str, float]:
    """The FLOP model of the step's calls at this geometry (a ControlNet's blocks as more blocks)."""
    family = models.of(step.transformer)
    shape = family.flop_shape(step.transformer.config)
    if step.controlnet is not None:
        net = family.flop_shape(step.controlnet.config)
        shape = replace(shape, double=shape.double + net.double, single=shape.single + net.single)
    return step_flops(shape, geo, build_block_lists(geo).computed_pairs())


def _clear_layers(step: StepCall) -> tuple[FluxShape, int]:
    """(the transformer's FLOP shape, the blocks whose attention CLEAR ran in the stage's steps): the
    transformer's, and the ControlNet's when CLEAR ran on it too."""
    family = models.of(step.transformer)
    shape = family.flop_shape(step.transformer.config)
    layers = shape.layers
    if step.controlnet is not None and clear_config(step.controlnet) is not None:
        layers += family.flop_shape(step.controlnet.config).layers
    return shape, layers


# ---------------------------------------------------------------- full attention from its parts


def random_qkv(
    geo: Geometry, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (1, H, q_len, D) and k, v (1, H, kv_len, D), with the strides the model passes:
    (B, L, H, D) transposed, so that an op timed on them reuses the model's compiled kernel."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda n: torch.randn(1, n, heads, head_dim, generator=g, device=device, dtype=dtype)  # noqa: E731
    return rand(geo.q_len).transpose(1, 2), rand(geo.kv_len).transpose(1, 2), rand(geo.kv_len).transpose(1, 2)


def attention_ops_ms(
    geo: Geometry,
    heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str = "auto",
    repeats: int = 1,
) -> tuple[float, float]:
    """(stock, CLEAR) milliseconds of one attention op at `geo`: full SDPA over the text + image tokens (the
    stock model has no pooled keys) and CLEAR's kernel, each the median of `repeats` calls after a warm-up,
    on random inputs laid out as the model's."""
    import torch.nn.functional as F

    q, k, v = random_qkv(geo, heads, head_dim, device, dtype)
    n, scale = geo.q_len, head_dim**-0.5
    with torch.no_grad():
        stock = lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=scale)  # noqa: E731
        stock_ms, _ = timeit(stock, device, repeats)
        clear_ms, _ = timeit(lambda: clear_attention(q, k, v, geo, scale, backend), device, repeats)
    return stock_ms, clear_ms


def composed_full_step(clear_step: float, layers: int, stock_op: float, clear_op: float) -> float:
    """Full attention's step composed from measured parts (in any one unit): the CLEAR step less its
    `layers` CLEAR attention ops plus as many stock ones. What the FLOP model cannot know: at 8K on an
    H200 the stock op ran at ~57% of the bf16 matmul peak, CLEAR's r = 8 kernel at ~27% and the rest of
    the step at ~41%."""
    return clear_step + layers * (stock_op - clear_op)
