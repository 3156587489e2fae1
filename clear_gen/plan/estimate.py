"""A plan's time: each stage's steps at the GPU's matmul rate (gpus.py: probed, or a table card's) times
the efficiencies below, plus the weights offload streams over PCIe: an estimate, always labelled so."""

from __future__ import annotations

import math

import torch

from ..models.shapes import ModelShapes
from . import gpus
from .footprint import RunInputs, RunPlan, Weights, weights_on_gpu

LINEAR_EFFICIENCY = 0.9  # share of the matmul rate the transformer's Linear layers reach


ATTENTION_EFFICIENCY = {"full": 0.6, "clear": 0.35}  # flash attention; CLEAR's block-sparse FlexAttention


FP8_SPEEDUP = 1.6  # fp8dq Linear layers over bf16 (fp8 tensor cores, less the activations' quantization)


PCIE_BYTES_S = 12e9  # host-to-GPU copies of offloaded weights (pageable memory)


def timed(run: RunInputs, plan: RunPlan) -> RunPlan:
    """Each stage's estimated seconds: its steps' FLOPs at the GPU's rate, plus offload copies."""
    cpu = torch.device("cpu")
    rate = plan.rate_tflops * 1e12 if plan.rate_tflops else gpus.probe_tflops(cpu, run.dtype, 512) * 1e12
    w, _ = weights_on_gpu(run, plan.clear_on_gpu)
    linear_rate = rate * LINEAR_EFFICIENCY * (FP8_SPEEDUP if run.spec.weights.quantize == "fp8dq" else 1.0)
    for stage, label, (linear, attention) in zip(plan.stages, run.labels, run.flops, strict=True):
        kind = "full" if label == "full" else "clear"
        step = linear / linear_rate + attention / (rate * ATTENTION_EFFICIENCY[kind])
        copies = 0.0
        if plan.offload == "sequential":  # every layer's weights each step; the MLP's once per slice
            slices = math.ceil((run.text_len + stage.tokens) / plan.ff_chunk) if plan.ff_chunk else 1
            streamed = w.transformer + w.clear + w.controlnet + (slices - 1) * mlp_bytes(run.shapes, w)
            copies = streamed / PCIE_BYTES_S
        stage.time_s = stage.steps * (step + copies)
        if plan.offload == "model":  # the transformer (and a ControlNet) come back once a stage
            stage.time_s += (w.transformer + w.clear + w.controlnet) / PCIE_BYTES_S
    if not plan.rate_tflops:
        plan.rate_tflops, plan.rate_source = rate / 1e12, "measured by a matmul probe"
    return plan


def mlp_bytes(shapes: ModelShapes, w: Weights) -> float:
    """The MLP layers' share of the transformer's bytes (what each feed-forward slice copies again)."""
    return w.transformer * shapes.mlp_params() / shapes.transformer_params().linear
