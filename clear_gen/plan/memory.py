"""The memory and time plan of a run, made before anything loads: what `--dry-run` prints, what
`--offload auto` decides from, and where loading puts CLEAR's weights (`plan_run(opts) -> RunPlan`).

Peak GPU memory of a stage, in bytes, with e the compute dtype's bytes per element (2 for bf16):

    peak = weights on the GPU + the largest of (one denoising step's activations, VAE encode, VAE decode)

Weights (parameter counts from the family's shapes, models/<family>/shapes.py, exact):
- transformer: its Linear weights at quantize.MODES[--quantize]'s bytes each plus a scale per output row
  (none: e bytes, exactly), every other parameter (biases, norms) at e; a GGUF --transformer: the file's
  size, or its quantization type's bytes per weight (GGUF_BYTES) when the file is not here;
- CLEAR: a checkpoint's replaced projections (the image q, k, v, out: 190 Linear of C x C, 3.6 GB in
  bf16) at e, when they sit on the GPU beside the originals (a quantized transformer: always);
- text encoders: the one --quantize-text quantizes (FLUX.1's T5) per that mode, the other (CLIP) at e,
  while the prompts are encoded (then they leave);
- VAE: its parameters at e;
- LoRAs (--lora): every tensor of their files at e, beside the transformer's weights (peft keeps them
  apart, unquantized); a Hub LoRA not yet downloaded is left out, with a note;
- a ControlNet (--controlnet): its parameters at e (shapes.controlnet_params, from its config.json, else
  the registry's block counts). With `--offload model` it joins the transformer while a stage denoises.
With `--offload model` only the running component is on the GPU; with `sequential`, one layer at a time.

Activations of one step and of the VAE: the model family's formula (models/<family>/activations.py;
FLUX.1's: 24.5 GB for a CLEAR step at 8192 px in bf16 unchunked, 11.6 GB with feed-forward chunking).

A plan fits when peak x (1 + HEADROOM) <= the GPU memory free (allocator fragmentation, CUDA
libraries' workspaces and what is not modelled). Time: the FLOP model (flops.py) of each step over the
GPU's matmul rate (gpus.py: probed, or a table card's) at LINEAR/ATTENTION efficiencies, plus weights
streamed over PCIe with offload: an estimate, always labelled so.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from ..core.device import dtype_note, resolve_device, resolve_dtype
from ..core.flops import attention_flops, linear_flops
from ..core.geometry import build_block_lists, needed_pairs
from ..core.sizes import size_multiple
from ..core.tensorfile import file_shapes
from ..errors import DeviceError
from ..weights.control import controlnet_folder
from ..weights.quantize import Target
from ..weights.shapes import model_shapes
from . import gpus
from .footprint import GB, RunInputs, RunPlan
from .offload import decide
from .spec import ClearChoice, GenerateOptions, RunSpec, Stage

DEFAULT_GPU_GB = 24.0  # what a plan assumes without a GPU (and without --gpu-memory)


# ---------------------------------------------------------------- bytes


# ---------------------------------------------------------------- the plan


def device_problems(spec: RunSpec, gpu: gpus.Gpu | None, cuda_here: bool, offload: str) -> list[str]:
    """What a real run would refuse on this device (quantize.device_problems): a CPU run's, or the GPU's
    a plan describes (this machine's, or one a dry run assumes)."""
    from ..weights.quantize import device_problems as problems

    w = spec.weights
    if gpu is None or gpu.kind != "cuda":
        target = Target(gpu.kind if gpu else "cpu", False, None, cuda_here)
    else:
        target = Target(gpu.name, True, gpu.capability, cuda_here)
    return problems(w.quantize, w.quantize_text, target, offload, gguf=w.gguf)


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
    said: list[str] = []  # what parsing a GenerateOptions had to say (a picture converted, a full window)
    if isinstance(spec, GenerateOptions):
        from .parse import parse

        spec = parse(spec, said.append)
    # 1. What runs: stages, attention, the device and dtype, the model's shapes.
    settings = spec.settings
    stages = stages or list(spec.stages)
    cuda_here, problems, notes, absent = torch.cuda.is_available(), [], [], False
    try:
        device = resolve_device(settings.device)  # auto: CUDA when there is one, else MPS
    except DeviceError as e:  # a device not here: a dry run plans for it all the same
        if not assume_gpu:
            raise
        device, absent = torch.device(settings.device), True
        if settings.gpu_memory is None:  # with --gpu-memory, a plan for that device on another machine
            problems.append(str(e))
    on_gpu = device.type in ("cuda", "mps") or (settings.device == "auto" and assume_gpu)
    planned = device if device.type != "cpu" or not on_gpu else torch.device("cuda")
    dtype = resolve_dtype(settings.dtype, planned)
    notes += [n for n in (dtype_note(settings.dtype, planned),) if n]
    if gpu is None and planned.type == "mps":  # a Mac: its unified memory
        gpu = gpus.mac(settings.gpu_memory, dtype, DEFAULT_GPU_GB)
    elif gpu is None and on_gpu:  # this machine's GPU or an assumed one
        gpu = _target_gpu(settings.gpu_memory, device, dtype, cuda_here)
    elif gpu is None:  # the CPU: the machine's memory
        gpu = gpus.cpu_machine(dtype)
    if absent and not problems:
        notes.append(f"no {device.type} device here: planned for {gpu.name} (--gpu-memory)")
    run = _prepare(spec, stages, dtype)
    # 2. Offload and chunking: the first candidate that fits (only the asked offload unless auto).
    plan = decide(run, gpu)
    plan.problems = problems + device_problems(spec, gpu, cuda_here, plan.offload)
    notes += [run.shapes.note, spec.attention.note, run.controlnet_note, run.lora_note]
    plan.notes += [n for n in notes if n] + said
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


def _prepare(spec: RunSpec, stages: list[Stage], dtype: torch.dtype) -> RunInputs:
    """Everything the candidates share: the model's shapes, each stage's attention and FLOPs."""
    choice = spec.attention
    shapes = model_shapes(spec.weights.model)
    net, net_note = _controlnet(spec)
    lora_elements, lora_note = _loras(spec)
    attention = [_attention(choice, spec.text_len, s, shapes.transformer, net) for s in stages]
    e = torch.empty(0, dtype=dtype).element_size()
    has_checkpoint = choice.weights is not None or choice.hub_variant is not None
    return RunInputs(
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
        clear_bytes=shapes.clear_params(choice.down_factor) * e if has_checkpoint else 0,
        controlnet=shapes.controlnet_params(*net) if net else None,
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
    choice: ClearChoice, text_len: int, stage: Stage, cfg, net: tuple | None = None
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
    geo = choice.geometry(stage.width, stage.height, text_len, reference=stage.reference)
    density = needed_pairs(geo) / (geo.q_len * geo.kv_len)
    attention = attention_flops(shape, build_block_lists(geo).computed_pairs())
    return choice.attention_label, density, (linear + extra[0], attention + extra[1])


# ---------------------------------------------------------------- deciding


# ---------------------------------------------------------------- time
