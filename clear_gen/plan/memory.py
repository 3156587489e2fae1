"""The memory and time plan of a run, made before anything loads: what `--dry-run` prints, what
`--offload auto` decides from, and where loading puts CLEAR's weights (`plan_run(opts) -> RunPlan`).

Peak GPU memory of a stage, in bytes, with e the compute dtype's bytes per element (2 for bf16):

    peak = weights on the GPU + the largest of (one denoising step's activations, VAE encode, VAE decode)

Weights (parameter counts from the family's shapes, models/flux1/shapes.py, exact):
- transformer: its Linear weights at quantize.MODES[--quantize]'s bytes each plus a scale per output row
  (none: e bytes, exactly), every other parameter (biases, norms) at e; a GGUF --transformer: the file's
  size, or its quantization type's bytes per weight (GGUF_BYTES) when the file is not here;
- CLEAR: a checkpoint's replaced projections (the image q, k, v, out: 190 Linear of C x C, 3.6 GB in
  bf16) at e, when they sit on the GPU beside the originals (a quantized transformer: always);
- text encoders: T5 per --quantize-text and CLIP at e, while the prompts are encoded (then they leave);
- VAE: its parameters at e;
- LoRAs (--lora): every tensor of their files at e, beside the transformer's weights (peft keeps them
  apart, unquantized); a Hub LoRA not yet downloaded is left out, with a note;
- a ControlNet (--controlnet): its parameters at e (shapes.controlnet_params, from its config.json, else
  the registry's block counts). With `--offload model` it joins the transformer while a stage denoises.
With `--offload model` only the running component is on the GPU; with `sequential`, one layer at a time.

Activations of one step and of the VAE: the model family's formula (models/flux1/activations.py:
24.5 GB for a CLEAR step at 8192 px in bf16 unchunked, 11.6 GB with feed-forward chunking).

A plan fits when peak x (1 + HEADROOM) <= the GPU memory free (allocator fragmentation, CUDA
libraries' workspaces and what is not modelled). Time: the FLOP model (flops.py) of each step over the
GPU's matmul rate (gpus.py: probed, or a table card's) at LINEAR/ATTENTION efficiencies, plus weights
streamed over PCIe with offload: an estimate, always labelled so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..attention.choice import ClearChoice
from ..attention.processor import attention_bytes
from ..core.device import dtype_name, resolve_device, resolve_dtype
from ..core.flops import attention_flops, linear_flops
from ..core.geometry import build_block_lists, needed_pairs
from ..core.sizes import scaled_size, size_multiple
from ..core.tensorfile import file_shapes
from ..errors import DeviceError
from ..models.flux1.activations import step_activations as model_step_activations
from ..models.flux1.activations import vae_activations
from ..models.flux1.shapes import (
    ModelShapes,
    Params,
    TransformerConfig,
    clear_params,
    controlnet_params,
    transformer_params,
)
from ..weights.control import controlnet_folder
from ..weights.quantize import MODES, Target
from ..weights.shapes import model_shapes
from . import gpus
from .spec import GenerateOptions, RunSpec, Stage

GB = 1e9
HEADROOM = 0.10  # a plan fits when its peak plus this share is free
DEFAULT_GPU_GB = 24.0  # what a plan assumes without a GPU (and without --gpu-memory)
FF_CHUNK_TOKENS = 4096  # tokens per feed-forward slice when chunking
GGUF_BYTES = {  # bytes per weight of GGUF block types (block bytes / block weights)
    "Q8_0": 34 / 32, "Q6_K": 210 / 256, "Q5_K": 176 / 256, "Q5_1": 24 / 32, "Q5_0": 22 / 32,
    "Q4_K": 144 / 256, "Q4_1": 20 / 32, "Q4_0": 18 / 32, "Q3_K": 110 / 256, "Q2_K": 84 / 256,
    "BF16": 2.0, "F16": 2.0, "F32": 4.0,
}  # fmt: skip
TEXT_ACTIVATIONS = 0.25 * GB  # T5-XXL and CLIP on 512 tokens: a few hundred MB
LINEAR_EFFICIENCY = 0.9  # share of the matmul rate the transformer's Linear layers reach
ATTENTION_EFFICIENCY = {"full": 0.6, "clear": 0.35}  # flash attention; CLEAR's block-sparse FlexAttention
FP8_SPEEDUP = 1.6  # fp8dq Linear layers over bf16 (fp8 tensor cores, less the activations' quantization)
PCIE_BYTES_S = 12e9  # host-to-GPU copies of offloaded weights (pageable memory)


# ---------------------------------------------------------------- bytes


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
    cfg: TransformerConfig,
    e: int,
    clear: bool,
    chunk: int | None,
    down: int = 1,
) -> int:
    """Peak bytes of one transformer call's activations on T + N tokens: the model's formula with CLEAR's
    processor (`down`: its down factor) or the stock one; `chunk`: feed-forward slice."""
    attention = attention_bytes(text_len, image_len, cfg.hidden, e, down) if clear else None
    return model_step_activations(text_len, image_len, cfg, e, chunk, attention)


# ---------------------------------------------------------------- the plan


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


@dataclass
class RunPlan:
    """What a run will do with GPU memory and time, before it loads anything (`plan_run`)."""

    device: str  # the GPU planned for ("NVIDIA GeForce RTX 4090", "a 24 GB GPU") or "cpu"
    gpu: bool  # False: a CPU run, whose memory is not checked
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
    fits_any: bool = True  # False: not even sequential offload with chunking fits (a real run refuses)
    reason: str = ""  # why this offload (and chunking): see offload_line
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
        return f"offload: {self.offload} ({self.reason})"

    def cannot_fit_line(self) -> str:
        """Why the run cannot fit, and what would: one line."""
        target = self.stages[-1]
        smaller = f"; {self.fits_at[0]}x{self.fits_at[1]} would fit" if self.fits_at else ""
        return (
            f"{target.width}x{target.height} needs {self.peak_gb:.1f} GB of GPU memory even with --offload "
            f"sequential and feed-forward chunking, and {self.free_gb:.1f} GB is free (a GPU with "
            f"{self.needs_gb:.0f} GB would do){smaller}"
        )

    def to_json(self) -> dict:
        data = {k: v for k, v in vars(self).items() if k != "stages"}
        return {**data, "time_s": self.time_s, "estimate": True, "stages": [vars(s) for s in self.stages]}


def device_problems(spec: RunSpec, gpu: gpus.Gpu | None, cuda_here: bool, offload: str) -> list[str]:
    """What a real run would refuse on this device (quantize.device_problems): a CPU run's, or the GPU's
    a plan describes (this machine's, or one a dry run assumes)."""
    from ..weights.quantize import device_problems as problems

    w = spec.weights
    if gpu is None:
        target = Target("cpu", False, None, cuda_here)
    else:
        target = Target(gpu.name, True, gpu.capability, cuda_here)
    return problems(w.quantize, w.quantize_text, target, offload, gguf=w.gguf)


@dataclass(frozen=True)
class _Run:
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
    vae_tile: int  # px: the VAE's tile side, in stages the recipe tiles
    controlnet: Params | None = None  # --controlnet's parameters
    controlnet_blocks: int = 0  # its blocks: one residual of N x C each
    controlnet_note: str | None = None  # an assumption about it
    lora_elements: int = 0  # --lora's tensors, elements
    lora_note: str | None = None  # a LoRA not counted

    @property
    def e(self) -> int:
        """Bytes per element of the compute dtype."""
        return torch.empty(0, dtype=self.dtype).element_size()


def plan_run(
    spec: RunSpec | GenerateOptions,
    assume_gpu: bool = True,
    gpu: gpus.Gpu | None = None,
    stages: list[Stage] | None = None,
) -> RunPlan:
    """The memory and time plan of a run on this machine's GPU, or, when there is none and `assume_gpu`
    (a dry run), on a `--gpu-memory` GB one (default 24): loads no weights, calls no network. Given
    GenerateOptions (`--dry-run`, a library call), it parses them first (plan.parse).

    `assume_gpu=False` plans the run as `generate` makes it: on the CPU when --device auto finds no GPU.
    `gpu`: plan for this GPU (e.g. `gpus.assumed_gpu(24, torch.bfloat16)`) whatever this machine has.
    `stages`: the stages that run, when not generate's (an upscale's SDEdit stages).
    """
    if isinstance(spec, GenerateOptions):
        from .parse import parse

        spec = parse(spec)
    # 1. What runs: stages, attention, the device and dtype, the model's shapes.
    settings = spec.settings
    stages = stages or list(spec.stages)
    cuda_here, problems = torch.cuda.is_available(), []
    try:
        device = resolve_device(settings.device)  # auto: CUDA when there is one
    except DeviceError as e:  # --device cuda without one: a dry run plans for a GPU all the same
        if not assume_gpu:
            raise
        device, problems = torch.device("cuda"), [str(e)]
    on_gpu = device.type == "cuda" or (settings.device == "auto" and assume_gpu)
    dtype = resolve_dtype(settings.dtype, torch.device("cuda") if on_gpu else device)
    if gpu is None and on_gpu:
        gpu = _target_gpu(settings.gpu_memory, device, dtype, cuda_here)
    run = _prepare(spec, stages, dtype)
    # 2. Offload and chunking: the first candidate that fits (only the asked offload unless auto).
    plan = _decide(run, gpu)
    plan.problems = problems + device_problems(spec, gpu, cuda_here, plan.offload)
    notes = (run.shapes.note, spec.attention.note, run.controlnet_note, run.lora_note)
    plan.notes += [n for n in notes if n]
    return plan


def _target_gpu(
    gpu_memory: float | None, device: torch.device, dtype: torch.dtype, cuda_here: bool
) -> gpus.Gpu:
    """This machine's GPU (its free memory, or --gpu-memory), else an assumed card of --gpu-memory GB."""
    if not cuda_here:
        return gpus.assumed_gpu(gpu_memory or DEFAULT_GPU_GB, dtype)
    gpu = gpus.detected_gpu(device, dtype)
    if gpu_memory is not None:
        gpu = replace(gpu, free_bytes=int(gpu_memory * GB))
    return gpu


def _prepare(spec: RunSpec, stages: list[Stage], dtype: torch.dtype) -> _Run:
    """Everything the candidates share: the model's shapes, each stage's attention and FLOPs."""
    choice = spec.attention
    shapes = model_shapes(spec.weights.model)
    net, net_note = _controlnet(spec)
    lora_elements, lora_note = _loras(spec)
    attention = [_attention(choice, spec.text_len, s, shapes.transformer, net) for s in stages]
    e = torch.empty(0, dtype=dtype).element_size()
    has_checkpoint = choice.weights is not None or choice.hub_variant is not None
    return _Run(
        spec=spec,
        shapes=shapes,
        stages=stages,
        labels=[a[0] for a in attention],
        densities=[a[1] for a in attention],
        flops=[a[2] for a in attention],
        text_len=spec.text_len,
        dtype=dtype,
        multiple=size_multiple(choice.down_factor),
        down_factor=choice.down_factor,
        clear_bytes=clear_params(shapes.transformer, choice.down_factor) * e if has_checkpoint else 0,
        vae_tile=shapes.vae_tile,
        controlnet=controlnet_params(shapes.transformer, *net) if net else None,
        controlnet_blocks=net[0] + net[1] if net else 0,
        controlnet_note=net_note,
        lora_elements=lora_elements,
        lora_note=lora_note,
    )


def _loras(spec: RunSpec) -> tuple[int, str | None]:
    """(elements of every --lora file here, a note naming those not downloaded yet)."""
    from ..weights.hub import cached_file

    elements, missing = 0, []
    for lora in spec.weights.loras:
        file = Path(lora.source) if lora.file is None else cached_file(lora.source, lora.file)
        if file is None:
            missing.append(lora.spec)
            continue
        elements += sum(math.prod(shape) for shape in file_shapes(file).values())
    note = f"LoRA {', '.join(missing)} not downloaded yet: not counted" if missing else None
    return elements, note


def _controlnet(spec: RunSpec) -> tuple[tuple[int, int, int] | None, str | None]:
    """((num_layers, num_single_layers, num_mode) of --controlnet, a note): from its config.json when it is
    on disk, else the registry's (a repo outside it: union-pro's, said in the note); None without one."""
    import json

    control = spec.weights.controlnet
    if control is None:
        return None, None
    folder = controlnet_folder(control, cached_only=True)
    if folder is not None:
        config = json.loads((folder / "config.json").read_text())
        blocks = config.get("num_layers", 2), config.get("num_single_layers", 0)  # diffusers' defaults
        return (*blocks, config.get("num_mode") or 0), None
    net = control.net
    if not net.num_layers + net.num_single_layers:  # a repo outside the registry, not downloaded yet
        return (5, 10, 10), f"ControlNet {net.repo} is not cached: planned with 5 + 10 blocks (union-pro's)"
    return (net.num_layers, net.num_single_layers, 10 if net.modes else 0), None


def _attention(
    choice: ClearChoice, text_len: int, stage: Stage, cfg: TransformerConfig, net: tuple | None = None
) -> tuple[str, float, tuple[float, float]]:
    """(label, density, (linear, attention) FLOPs of one step) of a stage; `net`: a ControlNet's
    (num_layers, num_single_layers, num_mode), whose blocks run in every step too (control.py says when
    with CLEAR)."""
    shape = cfg.flux_shape
    linear = linear_flops(shape, text_len, stage.tokens)
    all_pairs = (text_len + stage.tokens) ** 2  # full attention's
    extra = (0.0, 0.0)
    if net is not None:
        net_shape = replace(shape, double=net[0], single=net[1])
        pairs = all_pairs
        if stage.controlnet_clear:
            net_geo = choice.geometry(stage.width, stage.height, text_len, down_factor=1)
            pairs = build_block_lists(net_geo).computed_pairs()
        extra = (linear_flops(net_shape, text_len, stage.tokens), attention_flops(net_shape, pairs))
    if not stage.clear:
        return "full", 1.0, (linear + extra[0], attention_flops(shape, all_pairs) + extra[1])
    geo = choice.geometry(stage.width, stage.height, text_len)
    density = needed_pairs(geo) / (geo.q_len * geo.kv_len)
    attention = attention_flops(shape, build_block_lists(geo).computed_pairs())
    return choice.attention_label, density, (linear + extra[0], attention + extra[1])


# ---------------------------------------------------------------- deciding


@dataclass(frozen=True)
class _Weights:
    """Bytes of each component on the GPU, for one run."""

    transformer: int
    clear: int  # CLEAR's projections beside the originals; 0 when copied in place
    t5: int
    clip: int
    vae: int
    layer: int  # the largest layer (sequential offload streams one at a time)
    controlnet: int = 0  # --controlnet's weights
    lora: int = 0  # --lora's, counted in transformer too


def _weights(run: _Run, clear_on_gpu: bool) -> tuple[_Weights, str | None]:
    weights, shapes, e = run.spec.weights, run.shapes, run.e
    params = transformer_params(shapes.transformer)
    gguf = weights.gguf
    transformer, note = (
        gguf_bytes(weights.transformer, params, e)
        if gguf
        else (weight_bytes(params, weights.quantize, e), None)
    )
    lora = run.lora_elements * e
    transformer += lora  # the LoRAs go where the transformer goes
    quantized = gguf or weights.quantize != "none"
    layer = max(params.largest * e, shapes.t5.other * e)  # a Linear, or T5's token embedding
    clear = run.clear_bytes if (quantized or clear_on_gpu) else 0
    t5 = weight_bytes(shapes.t5, weights.quantize_text, e)
    net = run.controlnet.total * e if run.controlnet else 0
    w = _Weights(transformer, clear, t5, shapes.clip.total * e, shapes.vae * e, layer, net, lora)
    return w, note


def _stage_memory(
    run: _Run, w: _Weights, offload: str, chunk: int | None, i: int
) -> tuple[int, int, int, int]:
    """(denoise weights, activations, VAE activations, peak) of stage i, in bytes."""
    s, e = run.stages[i], run.e
    act = step_activations(run.text_len, s.tokens, run.shapes.transformer, e, s.clear, chunk, run.down_factor)
    act += run.controlnet_blocks * s.tokens * run.shapes.transformer.hidden * e  # a ControlNet's residuals
    tile = run.vae_tile if s.vae_tiling else None
    vae = vae_activations(s.width, s.height, e, tile, encode=False)
    if s.sdedit:
        vae = max(vae, vae_activations(s.width, s.height, e, tile, encode=True))
    if offload == "sequential":
        denoise_weights = vae_weights = w.layer
    elif offload == "model":  # the transformer (and ControlNet) leave when the VAE runs; the VAE stays
        denoise_weights, vae_weights = w.transformer + w.clear + w.vae + w.controlnet, w.vae
    else:
        denoise_weights = vae_weights = w.transformer + w.clear + w.vae + w.controlnet
    return denoise_weights, act, vae, max(denoise_weights + act, vae_weights + vae)


def _full_step(run: _Run, w: _Weights, offload: str, chunk: int | None, i: int) -> int:
    """Peak bytes of the stock-attention step that times full attention at stage i's size."""
    s = run.stages[i]
    act = step_activations(run.text_len, s.tokens, run.shapes.transformer, run.e, False, chunk)
    return _stage_memory(run, w, offload, chunk, i)[0] + act


def _encode_memory(w: _Weights, offload: str) -> int:
    """Peak while encoding the prompts: with offload none, everything is on the GPU (then the text
    encoders leave); with model, one text encoder at a time; with sequential, one layer."""
    if offload == "sequential":
        return w.layer + int(TEXT_ACTIVATIONS)
    if offload == "model":
        return max(w.t5, w.clip) + int(TEXT_ACTIVATIONS)
    return w.transformer + w.t5 + w.clip + w.vae + w.controlnet + int(TEXT_ACTIVATIONS)


def _candidate(run: _Run, gpu: gpus.Gpu | None, offload: str, chunk: int | None, clear_on: bool) -> RunPlan:
    """The plan of one (offload, chunk, CLEAR placement) choice; its time is filled in later."""
    w, note = _weights(run, clear_on)
    stages, peaks = [], [_encode_memory(w, offload)]
    unchunked = [_stage_memory(run, w, offload, None, i) for i in range(len(run.stages))]
    for i, s in enumerate(run.stages):
        weights, act, vae, peak = _stage_memory(run, w, offload, chunk, i)
        peaks.append(peak)
        stages.append(
            StagePlan(s.width, s.height, s.tokens, s.denoising_steps, run.labels[i], run.densities[i],
                      weights / GB, act / GB, unchunked[i][1] / GB, vae / GB, peak / GB, 0.0)
        )  # fmt: skip
    free = gpu.free_bytes if gpu else None
    too_big = [
        (s.width, s.height)
        for i, s in enumerate(run.stages)
        if s.clear and free is not None and (1 + HEADROOM) * _full_step(run, w, offload, chunk, i) > free
    ]
    return RunPlan(
        device=gpu.name if gpu else "cpu",
        gpu=gpu is not None,
        free_gb=free / GB if free is not None else None,
        rate_tflops=gpu.tflops if gpu else 0.0,
        rate_source=gpu.rate_source if gpu else "",
        dtype=dtype_name(run.dtype),
        model=run.shapes.source,
        quantize=run.spec.weights.quantize,
        quantize_text=run.spec.weights.quantize_text,
        transformer=run.spec.weights.transformer,
        transformer_gb=w.transformer / GB,
        text_encoders_gb=(w.t5 + w.clip) / GB,
        controlnet_gb=w.controlnet / GB,
        lora_gb=w.lora / GB,
        offload=offload,
        offload_asked=run.spec.settings.offload,
        ff_chunk=chunk,
        clear_on_gpu=w.clear > 0 and offload != "sequential",
        encode_gb=peaks[0] / GB,
        peak_gb=max(peaks) / GB,
        unchunked_peak_gb=max([peaks[0]] + [u[3] for u in unchunked]) / GB,
        fits=free is None or max(peaks) * (1 + HEADROOM) <= free,
        stages=stages,
        notes=[note] if note else [],
        full_step_too_big=too_big,
        activation_bytes=max(max(a, v) for _, a, v, _ in (_stage_memory(run, w, offload, chunk, i)
                                                           for i in range(len(run.stages)))),
    )  # fmt: skip


def _chunks(run: _Run, offload: str) -> list[int | None]:
    """Feed-forward slices to try, fewest first. With sequential offload each slice copies the MLP's
    weights to the GPU again, so it tries 2, 4, then 8 slices; else FF_CHUNK_TOKENS-token slices."""
    longest = run.text_len + max(s.tokens for s in run.stages)
    if offload != "sequential":
        return [None, FF_CHUNK_TOKENS]
    return [None] + [256 * math.ceil(longest / k / 256) for k in (2, 4, 8)]


def _decide(run: _Run, gpu: gpus.Gpu | None) -> RunPlan:
    """The first (offload, CLEAR placement, chunk) that fits, fastest first: none, model, sequential
    (with an asked offload, only it). When nothing fits, the most frugal plan, with fits_at and needs_gb."""
    if gpu is None:
        plan = _candidate(run, None, "none", None, clear_on=False)
        plan.reason = "a CPU run: no GPU memory to plan"
        return _timed(run, plan)
    asked = run.spec.settings.offload
    rejected = None  # the most frugal plan of the last offload that did not fit
    for offload in ("none", "model", "sequential") if asked == "auto" else (asked,):
        for clear_on in (True, False) if offload == "none" and run.clear_bytes else (False,):
            for chunk in _chunks(run, offload):
                plan = _candidate(run, gpu, offload, chunk, clear_on)
                if plan.fits:
                    plan.reason = _reason(run, plan, rejected)
                    return _timed(run, plan)
        rejected = plan
    frugal = _candidate(run, gpu, "sequential", _chunks(run, "sequential")[-1], clear_on=False)
    plan = frugal if asked == "auto" else plan
    plan.fits_any = frugal.fits
    plan.needs_gb = frugal.peak_gb * (1 + HEADROOM)
    plan.fits_at = None if frugal.fits else _fits_at(run, gpu)
    also = "; --offload sequential fits" if frugal.fits else ": does not fit even with --offload sequential"
    plan.reason = _reason(run, plan, None) + also
    return _timed(run, plan)


def _usable(plan: RunPlan) -> str:
    return f"{plan.free_gb / (1 + HEADROOM):.1f} GB usable of {plan.free_gb:.1f} GB free"


def _reason(run: _Run, plan: RunPlan, rejected: RunPlan | None) -> str:
    """Why this offload, for `offload_line`: 'none: plan 31.2 GB > 21.4 GB usable of 23.5 GB free; model:
    plan 18.1 GB'."""
    longest = run.text_len + max(s.tokens for s in run.stages)
    chunked = f", feed-forward in {math.ceil(longest / plan.ff_chunk)} slices" if plan.ff_chunk else ""
    sign = "<=" if plan.fits else ">"
    this = f"plan {plan.peak_gb:.1f} GB {sign} {_usable(plan)}{chunked}"
    if plan.offload_asked != "auto":
        return f"asked; {this}"
    if rejected is None:
        return this
    return f"{rejected.offload}: plan {rejected.peak_gb:.1f} GB > {_usable(rejected)}; {plan.offload}: {this}"


def _fits_at(run: _Run, gpu: gpus.Gpu) -> tuple[int, int] | None:
    """The largest size of the same aspect whose last stage fits with sequential offload and chunking."""
    multiple, last = run.multiple, run.stages[-1]
    w0, h0 = last.width, last.height
    lo, hi = 0, max(w0, h0) // multiple  # long side in multiples, lo fits (0: nothing does)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        w, h = scaled_size(w0, h0, mid * multiple, multiple)
        stage = replace(last, width=w, height=h, vae_tiling=run.spec.recipe.vae_tiles(w, h))
        trial = replace(run, stages=[stage])
        plan = _candidate(trial, gpu, "sequential", _chunks(trial, "sequential")[-1], clear_on=False)
        lo, hi = (mid, hi) if plan.fits else (lo, mid)
    return scaled_size(w0, h0, lo * multiple, multiple) if lo else None


# ---------------------------------------------------------------- time


def _timed(run: _Run, plan: RunPlan) -> RunPlan:
    """Each stage's estimated seconds: its steps' FLOPs at the GPU's rate, plus offload copies."""
    cpu = torch.device("cpu")
    rate = plan.rate_tflops * 1e12 if plan.gpu else gpus.probe_tflops(cpu, run.dtype, 512) * 1e12
    w, _ = _weights(run, plan.clear_on_gpu)
    cfg = run.shapes.transformer
    linear_rate = rate * LINEAR_EFFICIENCY * (FP8_SPEEDUP if run.spec.weights.quantize == "fp8dq" else 1.0)
    for stage, label, (linear, attention) in zip(plan.stages, run.labels, run.flops, strict=True):
        kind = "full" if label == "full" else "clear"
        step = linear / linear_rate + attention / (rate * ATTENTION_EFFICIENCY[kind])
        copies = 0.0
        if plan.offload == "sequential":  # every layer's weights each step; the MLP's once per slice
            slices = math.ceil((run.text_len + stage.tokens) / plan.ff_chunk) if plan.ff_chunk else 1
            streamed = w.transformer + w.clear + w.controlnet + (slices - 1) * _mlp_bytes(cfg, w)
            copies = streamed / PCIE_BYTES_S
        stage.time_s = stage.steps * (step + copies)
        if plan.offload == "model":  # the transformer (and a ControlNet) come back once a stage
            stage.time_s += (w.transformer + w.clear + w.controlnet) / PCIE_BYTES_S
    if not plan.gpu:
        plan.rate_tflops, plan.rate_source = rate / 1e12, "measured by a matmul probe"
    return plan


def _mlp_bytes(cfg: TransformerConfig, w: _Weights) -> float:
    """The MLP layers' share of the transformer's bytes (what each feed-forward slice copies again)."""
    c2 = cfg.hidden**2
    mlp = (16 * cfg.num_layers + 9 * cfg.num_single_layers) * c2
    return w.transformer * mlp / transformer_params(cfg).linear
