"""Timing: where a run's time goes (RunTiming), its steps as they run, and full attention at the same size."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch

from .attention import remove_clear
from .device import synchronize
from .flops import FluxShape, speedup_bound, step_flops
from .geometry import Geometry, build_block_lists

FULL_MEASURE_BUDGET_S = 60.0  # measure full attention when a warm + timed step costs less than this


def samples(fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
    """Milliseconds of n synchronised calls."""
    times = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def timeit(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median_ms, first_call_ms): one warm-up call (compilation lands here), then `repeats` timed calls.

    With repeats = 0 the warm-up call is the only measurement (for calls too slow to repeat).
    """
    times = samples(fn, device, 1 + max(repeats, 0))
    return (statistics.median(times[1:]) if repeats > 0 else times[0]), times[0]


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float, float | None]:
    """timeit plus the peak allocated MB over those calls (CUDA); None on the CPU (torch keeps no count)."""
    if device.type != "cuda":
        return (*timeit(fn, device, repeats), None)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    median_ms, first_ms = timeit(fn, device, repeats)
    return median_ms, first_ms, torch.cuda.max_memory_allocated(device) / 2**20


@dataclass
class StageTiming:
    """One stage of one image: its steps, the first step's warm-up, and full attention at the same size."""

    width: int
    height: int
    attention: str  # "full" or "CLEAR r=8 f=4"
    steps: int  # denoising steps that ran
    seconds: float  # the whole stage: latents, img2img's VAE encode, every step
    step_s: float | None  # median warm step (after the first); None: one step and no warm step timed
    first_step_s: float | None = None  # the first step, compilation and warm-up included (None: unknown)
    full_step_s: float | None = None  # full attention, same size and device, warm
    full_estimated: bool = False  # True: from the FLOP model, not measured
    density: float = 1.0  # fraction of (q, kv) pairs CLEAR computes exactly
    compare_s: float = 0.0  # seconds spent timing full attention (and a warm step of a 1-step stage)
    decode_s: float = 0.0  # VAE decode of the stage's latents into an image
    peak_allocated_gb: float | None = None  # GPU memory high-water mark (denoise and decode); None: CPU
    peak_reserved_gb: float | None = None  # the same, as reserved by torch's caching allocator
    block_evals: int = 0  # --cache: transformer blocks evaluated in the stage (0: no cache, not counted)
    blocks_skipped: int = 0  # --cache: block evaluations the cache skipped
    gpus: int = 1  # ranks whose GPUs shared each step (torchrun's sequence mode); full_step_s is one GPU's

    @property
    def warmup_s(self) -> float | None:
        """What the first step took beyond a warm one: compilation, autotuning, first allocations."""
        if self.step_s is None or self.first_step_s is None:
            return None
        return max(self.first_step_s - self.step_s, 0.0)

    @property
    def speedup(self) -> float | None:
        """Full attention's warm step over this stage's warm step; None for full attention or unknown."""
        if self.attention == "full" or not self.full_step_s or not self.step_s:
            return None
        return self.full_step_s / self.step_s

    def to_json(self) -> dict:
        return {**vars(self), "warmup_s": self.warmup_s, "speedup": self.speedup}

    @classmethod
    def from_json(cls, data: dict) -> StageTiming:
        """Inverse of to_json (derived values are recomputed); TypeError if a field is missing."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunTiming:
    """Where one image's wall time went; the table, the JSON line and the PNG metadata all show this.

    Loading and text encoding happen once per run: the run's first image carries them, later ones
    show 0. The PNG's own copy stops where its save begins: save_s None, total_s up to there.
    """

    load_s: float = 0.0  # pipeline and CLEAR weights
    encode_s: float = 0.0  # text encoders, every prompt of the run
    stages: list[StageTiming] = field(default_factory=list)
    save_s: float | None = None  # PNG writes: the image and its kept stages
    total_s: float | None = None  # wall time of this image, its share of loading and encoding included
    gpus: int = 1  # processes in the run (torchrun's world size)
    parallel: str = "none"  # none (one process), sequence (each image over every GPU) or data: parallel.py

    @property
    def decode_s(self) -> float:
        return sum(s.decode_s for s in self.stages)

    @property
    def compare_s(self) -> float:
        return sum(s.compare_s for s in self.stages)

    @property
    def other_s(self) -> float | None:
        """total_s less every part timed: Python, scheduling, the output-path checks."""
        if self.total_s is None:
            return None
        parts = self.load_s + self.encode_s + sum(s.seconds for s in self.stages)
        return self.total_s - parts - self.compare_s - self.decode_s - (self.save_s or 0.0)

    def to_json(self) -> dict:
        derived = {"decode_s": self.decode_s, "compare_s": self.compare_s, "other_s": self.other_s}
        return {**vars(self), **derived, "stages": [s.to_json() for s in self.stages]}

    @classmethod
    def from_json(cls, data: dict) -> RunTiming:
        """Inverse of to_json; TypeError or KeyError if data is not a RunTiming (e.g. an older record)."""
        names = {f.name for f in fields(cls)} - {"stages"}
        stages = [StageTiming.from_json(s) for s in data["stages"]]
        return cls(**{k: v for k, v in data.items() if k in names}, stages=stages)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new GPU memory high-water mark (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def record_peak_memory(timing: StageTiming, device: torch.device) -> None:
    """Raise the stage's peak figures to the high-water marks since the last reset (CUDA; None elsewhere:
    torch keeps no count on the CPU)."""
    if device.type != "cuda":
        return
    allocated = torch.cuda.max_memory_allocated(device) / 1e9
    reserved = torch.cuda.max_memory_reserved(device) / 1e9
    timing.peak_allocated_gb = max(timing.peak_allocated_gb or 0.0, allocated)
    timing.peak_reserved_gb = max(timing.peak_reserved_gb or 0.0, reserved)


def now(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


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


def step_call(transformer, inputs: dict, controlnet=None, control_inputs: dict | None = None) -> Callable:
    """One denoising step's model calls with the inputs of their last calls: the ControlNet's, when there
    is one (its residuals then feed the transformer, as in diffusers' ControlNet pipelines), then the
    transformer's."""

    def call():
        if controlnet is None:
            return transformer(**inputs)
        blocks, singles = controlnet(**{**control_inputs, "return_dict": False})
        residuals = {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles}
        return transformer(**{**inputs, **residuals})

    return call


def time_step(step: Callable, device: torch.device) -> float:
    """Seconds of one more (warm) step (step_call) with the inputs of the last."""
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


_FULL_STEP_S: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformer -> {key: seconds}


def _full_step_key(inputs: dict, geo: Geometry, device, controlnet) -> tuple:
    """What a stock step's time depends on: sizes, batch, dtype, device and whether a ControlNet runs in
    it (not CLEAR's window)."""
    hidden = inputs["hidden_states"]
    return geo.text_len, geo.height, geo.width, hidden.shape[0], hidden.dtype, str(device), controlnet is None


def time_full_attention(
    transformer,
    inputs: dict,
    timing: StageTiming,
    geo: Geometry,
    device,
    reapply,
    fits: bool = True,
    controlnet=None,
    control_inputs: dict | None = None,
) -> None:
    """timing.full_step_s: one warm step with stock attention when that is cheap (and `fits`: the memory
    plan says its activations fit), else the FLOP model. With a ControlNet (its last call's inputs in
    `control_inputs`) the step is the ControlNet's call and the transformer's, both with stock attention,
    as the stage's steps were both of them with CLEAR.

    A measured time is kept per transformer and size, so a batch of images measures it once. The
    estimate scales the measured CLEAR step by the FLOP ratio (linear + full attention) /
    (linear + computed CLEAR attention), so it assumes both run at the same FLOP rate; a ControlNet's
    blocks are counted as more transformer blocks. Either is one GPU's: in sequence mode the stock step
    runs whole on each GPU, and the estimate starts from the CLEAR step's GPU-seconds (step_s x gpus, as
    if the step scaled perfectly).
    """
    cache = _FULL_STEP_S.setdefault(transformer, {})
    key = _full_step_key(inputs, geo, device, controlnet) if inputs else None
    if key in cache:
        timing.full_step_s = cache[key]
        return
    computed = build_block_lists(geo).computed_pairs()
    gpu_seconds = timing.step_s * timing.gpus
    shape = FluxShape.from_config(transformer.config)
    if controlnet is not None:
        net = FluxShape.from_config(controlnet.config)
        shape = replace(shape, double=shape.double + net.double, single=shape.single + net.single)
    estimate = gpu_seconds * speedup_bound(step_flops(shape, geo, computed))
    if 2 * estimate > FULL_MEASURE_BUDGET_S or not inputs or not fits or (controlnet and not control_inputs):
        timing.full_step_s, timing.full_estimated = estimate, True
        return
    remove_clear(transformer)
    if controlnet is not None:
        remove_clear(controlnet)
    try:
        with torch.no_grad():  # one warm-up, one timed
            step = step_call(transformer, inputs, controlnet, control_inputs)
            median_ms, _ = timeit(step, device, repeats=1)
        timing.full_step_s = cache[key] = median_ms / 1e3
    finally:
        reapply()
