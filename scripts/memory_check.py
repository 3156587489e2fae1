"""Measured GPU memory of one denoising step of a random FLUX.1-dev-sized transformer against the plan.

    PYTHONPATH=. python scripts/memory_check.py --res 4096,8192                 # bf16, CLEAR r8-down4
    PYTHONPATH=. python scripts/memory_check.py --res 4096,8192 --quantize fp8  # torchao fp8 weights
    PYTHONPATH=. python scripts/memory_check.py --res 8192 --chunk 0            # without chunking

One row per size and chunking: the transformer's weights on the GPU (torch.cuda.memory_allocated after
building it) against footprint.weight_bytes, and a step's activations (max_memory_allocated over a warm
call, less what was allocated before it) against footprint.step_activations. Needs CUDA for the measured
columns; on a CPU (with a small --layers) it prints the plan's figures alone.
"""

from __future__ import annotations

import argparse

import torch

from clear_gen.attention import apply_clear
from clear_gen.models.flux1.chunking import chunk_feed_forward
from clear_gen.models.flux1.random import build_transformer, flux_shape, step_inputs
from clear_gen.models.flux1.shapes import TransformerConfig, shipped_shapes, transformer_params
from clear_gen.plan.footprint import step_activations, weight_bytes
from clear_gen.plan.offload import FF_CHUNK_TOKENS

TEXT = 512


def transformer(layers: int, device: torch.device, quantize: str):
    shape = flux_shape(24, 128, layers)
    model = build_transformer(shape, device, torch.bfloat16)
    if quantize == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(model, Float8WeightOnlyConfig())
    cfg = TransformerConfig(num_layers=shape.double, num_single_layers=shape.single)
    return model, weight_bytes(transformer_params(cfg), quantize, 2)


def step_peak(model, res: int, device: torch.device) -> float | None:
    """GB a warm step allocates beyond what was there before it (None on a CPU)."""
    inputs = step_inputs(model, res, TEXT, device, torch.bfloat16)
    with torch.no_grad():
        model(**inputs)  # compiles CLEAR's kernel for this size
        if device.type != "cuda":
            return None
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(**inputs)
        torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", default="4096,8192")
    parser.add_argument("--layers", type=int, default=57)
    parser.add_argument("--quantize", choices=("none", "fp8"), default="none")
    parser.add_argument("--chunk", type=int, default=None, help="tokens a slice; 0: whole (default: both)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunks = [None, FF_CHUNK_TOKENS] if args.chunk is None else [args.chunk or None]
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, planned_weights = transformer(args.layers, device, args.quantize)
    measured_weights = (torch.cuda.memory_allocated(device) - before) / 1e9 if device.type == "cuda" else None
    apply_clear(model, window=8, down_factor=4, proportional_attention=True, ntk_factor=10.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    weights = f"weights {measured_weights} GB measured, {planned_weights / 1e9:.3f} GB planned"
    print(f"{name}, {args.layers} layers, --quantize {args.quantize}: {weights}")
    print("| res | chunk | step activations GB measured | planned | planned / measured |")
    print("|---:|---:|---:|---:|---:|")
    shapes = shipped_shapes("dev", "FLUX.1-dev")
    for res in [int(r) for r in args.res.split(",")]:
        for chunk in chunks:
            chunk_feed_forward(model, chunk)
            measured = step_peak(model, res, device)
            planned = step_activations(TEXT, (res // 16) ** 2, shapes, 2, True, chunk, 4) / 1e9
            ratio = f"{planned / measured:.2f}" if measured else "-"
            shown = f"{measured:.2f}" if measured is not None else "-"
            print(f"| {res} | {chunk or 'whole'} | {shown} | {planned:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
