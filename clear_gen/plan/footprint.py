"""What a run's components occupy on the GPU, in bytes (memory.py's model): weights per dtype and
quantization, one step's activations, the VAE's, what is on the GPU while encoding or denoising with each
offload; and the plan's own types, StagePlan and RunPlan."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention.processor import attention_bytes
from ..models.shapes import ModelShapes, Params
from ..weights.quantize import MODES
from .spec import RunSpec, Stage

GB = 1e9


HEADROOM = 0.10  # a plan fits when its peak plus this share is free


GGUF_BYTES = {  # bytes per weight of GGUF block types (block bytes / block weights)
    "Q8_0": 34 / 32, "Q6_K": 210 / 256, "Q5_K": 176 / 256, "Q5_1": 24 / 32, "Q5_0": 22 / 32,
    "Q4_K": 144 / 256, "Q4_1": 20 / 32, "Q4_0": 18 / 32, "Q3_K": 110 / 256, "Q2_K": 84 / 256,
    "BF16": 2.0, "F16": 2.0, "F32": 4.0,
}  # fmt: skip


TEXT_ACTIVATIONS = 0.25 * GB  # the text encoders on 512 tokens (T5-XXL and CLIP): a few hundred MB


def weight_bytes(params: Params, mode: str, e: int) -> int:
    """Bytes of a component's parameters: Linear weights per quantization mode, the rest at e bytes.

    Quantized layers also dequantize one weight at a time: the largest Linear at e bytes is added."""
    if mode == "none":
        return params.total * e
    per_weight, per_row = MODES[mode].bytes_per_weight, MODES[mode].bytes_per_row
    return math.ceil(params.linear * per_weight) + params.rows * per_row + (params.other + params.largest) * e


def gguf_bytes(transformer: str, params: Params, e: int) -> tuple[int, str | None]:
    """(bytes, note) of a GGUF transformer: the file's size when it is here, else its type's bytes per
    weight from the name (Q8_0, Q4_K_S, ...; Q8_0 when the name does not say)."""
    path = Path(transformer).expanduser()
    if path.is_file():
        return path.stat().st_size + params.largest * e, None
    found = re.search(r"(Q\d_[K01]|BF16|F16|F32)", Path(transformer).name.upper())
    kind = found.group(1) if found else "Q8_0"
    note = None if found else f"{transformer}: quantization type not in the name, Q8_0 assumed"
    return math.ceil(params.linear * GGUF_BYTES[kind]) + (params.other + params.largest) * e, note


def step_activations(
    text_len: int,
    image_len: int,
    shapes: ModelShapes,
    e: int,
    clear: bool,
    chunk: int | None,
    down: int = 1,
) -> int:
    """Peak bytes of one transformer call's activations on T + N tokens: the model's formula (its
    shapes') with CLEAR's processor (`down`: its down factor) or the stock one; `chunk`: feed-forward
    slice."""
    attention = attention_bytes(text_len, image_len, shapes.transformer.hidden, e, down) if clear else None
    return shapes.step_activations(text_len, image_len, e, chunk, attention)


@dataclass
class StagePlan:
    """One stage of an image: its size, attention and estimated peak memory and time."""

    width: int
    height: int
    tokens: int  # image tokens
    steps: int  # denoising steps that run
    attention: str  # "full" or "CLEAR r=8 f=4"
    density: float  # share of (query, key) pairs attention computes exactly
    weights_gb: float  # on the GPU while it denoises
    activations_gb: float  # one step's peak activations
    unchunked_activations_gb: float  # the same without feed-forward chunking
    vae_gb: float  # the VAE's encode / decode peak (weights apart)
    peak_gb: float
    time_s: float  # estimate: its denoising steps and offload copies
    vae_tiles: str = "off"  # how its VAE tiles: exact, fast or off (whole: it fits in one tile)


@dataclass
class RunPlan:
    """What a run will do with GPU memory and time, before it loads anything (`plan_run`)."""

    device: str  # the GPU planned for ("NVIDIA GeForce RTX 4090", "a 24 GB GPU", "a 64 GB Mac") or the CPU
    gpu: bool  # False: a CPU run
    free_gb: float | None  # GPU memory the plan may use
    rate_tflops: float
    rate_source: str  # "measured by a matmul probe" or the table card
    dtype: str
    model: str  # where the shapes come from
    quantize: str
    quantize_text: str
    transformer: str | None
    transformer_gb: float  # its weights as quantized (CLEAR's projections apart)
    text_encoders_gb: float  # T5 (as --quantize-text) and CLIP
    controlnet_gb: float  # --controlnet's weights (0 without one); its residuals are in the activations
    lora_gb: float  # --lora's weights (0 without), with the transformer's in transformer_gb
    offload: str  # none | model | sequential: what runs
    offload_asked: str
    ff_chunk: int | None  # feed-forward slice in tokens; None: not chunked
    clear_on_gpu: bool  # a CLEAR checkpoint's projections sit on the GPU beside the originals
    encode_gb: float  # peak while the text encoders run
    peak_gb: float  # the run's peak: encoding and every stage
    unchunked_peak_gb: float  # the same run without feed-forward chunking
    fits: bool
    stages: list[StagePlan]
    unified: bool = False  # one memory for everything (a CPU run, a Mac's GPU): nothing to offload
    fits_any: bool = True  # False: not even sequential offload with chunking fits (a real run refuses)
    headroom: float = HEADROOM  # the share of the free memory a plan keeps spare
    reason: str = ""  # why this offload (and chunking): see offload_line
    hint: str | None = None  # a lighter choice that would offload less (--quantize fp8), for offload_line
    fits_at: tuple[int, int] | None = None  # when it does not fit: the largest size that would
    needs_gb: float | None = None  # when it does not fit: the GPU memory that would do
    problems: list[str] = field(default_factory=list)  # device problems a real run refuses
    notes: list[str] = field(default_factory=list)  # assumptions (shapes, file types)
    activation_bytes: int = 0  # the largest stage's activations and VAE: what loading keeps free
    # CLEAR stages (w, h) whose comparison step with stock attention would not fit: estimated, not timed
    full_step_too_big: list[tuple[int, int]] = field(default_factory=list)

    @property
    def time_s(self) -> float:
        return sum(s.time_s for s in self.stages)

    def offload_line(self) -> str:
        """'offload: model (plan 31.2 GB > 23.5 GB free)': the decision in one line."""
        return f"offload: {self.offload} ({self.reason})" + (f"; {self.hint}" if self.hint else "")

    def cannot_fit_line(self) -> str:
        """Why the run cannot fit, and what would: one line."""
        target = self.stages[-1]
        smaller = f"; {self.fits_at[0]}x{self.fits_at[1]} would fit" if self.fits_at else ""
        if self.unified:
            lighter = [
                flag
                for flag, on in (
                    ("--dtype bf16", self.dtype == "fp32"),
                    ("--quantize int8", self.quantize == "none"),
                    ("--quantize-text int8", self.quantize_text == "none"),
                    ("--vae-tiling fast", any(s.vae_tiles == "exact" for s in self.stages)),
                )
                if on
            ]
            where, other = ("this Mac", "a Mac with more memory") if self.gpu else ("the CPU", "a GPU")
            return (
                f"{target.width}x{target.height} on {where} needs {self.peak_gb:.1f} GB of memory and "
                f"{self.free_gb:.1f} GB is available{smaller}; use {other}"
                f"{''.join(', ' + f for f in lighter)} or a smaller size"
            )
        return (
            f"{target.width}x{target.height} needs {self.peak_gb:.1f} GB of GPU memory even with --offload "
            f"sequential and feed-forward chunking, and {self.free_gb:.1f} GB is free (a GPU with "
            f"{self.needs_gb:.0f} GB would do){smaller}"
        )

    def to_json(self) -> dict:
        data = {k: v for k, v in vars(self).items() if k not in ("stages", "headroom")}
        return {**data, "time_s": self.time_s, "estimate": True, "stages": [vars(s) for s in self.stages]}


@dataclass(frozen=True)
class RunInputs:
    """What every candidate plan of one run shares."""

    spec: RunSpec
    shapes: ModelShapes
    stages: list[Stage]
    labels: list[str]  # attention per stage
    densities: list[float]
    flops: list[tuple[float, float]]  # (linear, attention) FLOPs of one step per stage
    text_len: int
    dtype: torch.dtype
    multiple: int  # pixels each side is a multiple of
    down_factor: int  # CLEAR's
    clear_bytes: int  # CLEAR's replaced projections at e; 0 without a checkpoint
    controlnet: Params | None = None  # --controlnet's parameters
    controlnet_blocks: int = 0  # its blocks: one residual of N x C each
    controlnet_note: str | None = None  # an assumption about it
    lora_elements: int = 0  # --lora's tensors, elements
    lora_note: str | None = None  # a LoRA not counted

    @property
    def e(self) -> int:
        """Bytes per element of the compute dtype."""
        return torch.empty(0, dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Weights:
    """Bytes of each component on the GPU, for one run."""

    transformer: int
    clear: int  # CLEAR's projections beside the originals; 0 when copied in place
    text: int  # the text encoder --quantize-text quantizes (FLUX.1's T5)
    text_small: int  # the other one (FLUX.1's CLIP), or 0
    vae: int
    layer: int  # the largest layer (sequential offload streams one at a time)
    controlnet: int = 0  # --controlnet's weights
    lora: int = 0  # --lora's, counted in transformer too


def weights_on_gpu(run: RunInputs, clear_on_gpu: bool) -> tuple[Weights, str | None]:
    weights, shapes, e = run.spec.weights, run.shapes, run.e
    params = shapes.transformer_params()
    gguf = weights.gguf
    transformer, note = (
        gguf_bytes(weights.transformer, params, e)
        if gguf
        else (weight_bytes(params, weights.quantize, e), None)
    )
    lora = run.lora_elements * e
    transformer += lora  # the LoRAs go where the transformer goes
    quantized = gguf or weights.quantize != "none"
    layer = max(params.largest * e, shapes.text.other * e)  # a Linear, or the text encoder's embedding
    clear = run.clear_bytes if (quantized or clear_on_gpu) else 0
    text = weight_bytes(shapes.text, weights.quantize_text, e)
    net = run.controlnet.total * e if run.controlnet else 0
    w = Weights(transformer, clear, text, shapes.text_small.total * e, shapes.vae * e, layer, net, lora)
    return w, note


def stage_memory(
    run: RunInputs, w: Weights, offload: str, chunk: int | None, i: int
) -> tuple[int, int, int, int]:
    """(denoise weights, activations, VAE activations, peak) of stage i, in bytes."""
    s, e = run.stages[i], run.e
    act = step_activations(run.text_len, s.tokens, run.shapes, e, s.clear, chunk, run.down_factor)
    act += run.controlnet_blocks * s.tokens * run.shapes.transformer.hidden * e  # a ControlNet's residuals
    parked = offload != "sequential"  # exact tiling parks its tiles in the machine's memory then
    vae = run.shapes.vae_activations(s.width, s.height, e, s.vae_tiling, s.vae_tile, False, parked)
    if s.sdedit:
        vae = max(
            vae, run.shapes.vae_activations(s.width, s.height, e, s.vae_tiling, s.vae_tile, True, parked)
        )
    if offload == "cpu":  # everything stays in the machine's memory, the text encoders too
        denoise_weights = vae_weights = w.transformer + w.clear + w.text + w.text_small + w.vae + w.controlnet
    elif offload == "sequential":
        denoise_weights = vae_weights = w.layer
    elif offload == "model":  # the transformer (and ControlNet) leave when the VAE runs; the VAE stays
        denoise_weights, vae_weights = w.transformer + w.clear + w.vae + w.controlnet, w.vae
    else:
        denoise_weights = vae_weights = w.transformer + w.clear + w.vae + w.controlnet
    return denoise_weights, act, vae, max(denoise_weights + act, vae_weights + vae)


def full_step_memory(run: RunInputs, w: Weights, offload: str, chunk: int | None, i: int) -> int:
    """Peak bytes of the stock-attention step that times full attention at stage i's size."""
    s = run.stages[i]
    act = step_activations(run.text_len, s.tokens, run.shapes, run.e, False, chunk)
    return stage_memory(run, w, offload, chunk, i)[0] + act


def encode_memory(w: Weights, offload: str) -> int:
    """Peak while encoding the prompts: with offload none, everything is on the GPU (then the text
    encoders leave); with model, one text encoder at a time; with sequential, one layer."""
    if offload == "sequential":
        return w.layer + int(TEXT_ACTIVATIONS)
    if offload == "model":
        return max(w.text, w.text_small) + int(TEXT_ACTIVATIONS)
    everything = w.transformer + w.text + w.text_small + w.vae + w.controlnet + w.clear * (offload == "cpu")
    return everything + int(TEXT_ACTIVATIONS)
