"""Measuring a run: its steps as they run (StepClock), its peak GPU memory, and full attention at the same
size (one warm stock step, or the FLOP model); what is measured goes into files.record's RunTiming."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from .. import models
from ..attention import remove_clear
from ..core import device as D
from ..core.clock import samples, timeit
from ..core.device import synchronize
from ..core.flops import speedup_bound, step_flops
from ..core.geometry import Geometry, build_block_lists
from ..files.record import StageTiming

FULL_MEASURE_BUDGET_S = 60.0  # measure full attention when a warm + timed step costs less than this


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU memory high-water mark (CUDA, MPS; nothing on the CPU)."""
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
    """Full attention's warm step at each size, measured once: a run keeps one, and LoadedPipelines one
    per pipeline, so that a batch of images (and compare's variants) measure each size once. The key is
    what a stock step's time depends on: sizes, batch, dtype, device, whether a ControlNet runs in it."""

    def __init__(self) -> None:
        self.seconds: dict[tuple, float] = {}

    def time(
        self, step: StepCall, timing: StageTiming, geo: Geometry, device, reapply, fits: bool = True
    ) -> None:
        """timing.full_step_s: one warm step with stock attention when that is cheap (and `fits`: the memory
        plan says its activations fit), else the FLOP model. With a ControlNet the step is the ControlNet's
        call and the transformer's, both with stock attention, as the stage's steps were both of them with
        CLEAR; `reapply` puts CLEAR back after.

        The estimate scales the measured CLEAR step by the FLOP ratio (linear + full attention) /
        (linear + computed CLEAR attention), so it assumes both run at the same FLOP rate; a ControlNet's
        blocks are counted as more transformer blocks. Either is one GPU's: in sequence mode the stock step
        runs whole on each GPU, and the estimate starts from the CLEAR step's GPU-seconds (step_s x gpus,
        as if the step scaled perfectly).
        """
        key = _stock_key(step, geo, device) if step.inputs else None
        if key in self.seconds:
            timing.full_step_s = self.seconds[key]
            return
        estimate = timing.step_s * timing.gpus * speedup_bound(_step_flops(step, geo))
        if 2 * estimate > FULL_MEASURE_BUDGET_S or not step.complete or not fits:
            timing.full_step_s, timing.full_estimated = estimate, True
            return
        remove_clear(step.transformer)
        if step.controlnet is not None:
            remove_clear(step.controlnet)
        try:
            with torch.no_grad():  # one warm-up, one timed
                median_ms, _ = timeit(step, device, repeats=1)
            timing.full_step_s = self.seconds[key] = median_ms / 1e3
        finally:
            reapply()


def _stock_key(step: StepCall, geo: Geometry, device) -> tuple:
    hidden = step.inputs["hidden_states"]
    return (
        geo.text_len,
        geo.height,
        geo.width,
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
