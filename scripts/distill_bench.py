"""What one distillation step costs, measured: `clear-gen distill train`'s own loop on random
FLUX.1-dev-sized weights (no download) and random cached samples, at 1024 px and batch 1.

    python scripts/distill_bench.py --json distill_bench.json          # on a GPU: FLUX.1-dev's shape
    python scripts/distill_bench.py --device cpu --layers 3 --heads 2 --head-dim 32 --res 128 --text-len 16

Prints (and writes with --json) the device, the first step's seconds (kernel compilation included), the
median warm s/step, the peak GPU memory, and the estimates of clear_gen/distill/cost.py beside them.
Nothing is saved: the run's weight and resume files would be 40 GB for FLUX.1-dev.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import types
from pathlib import Path

import torch

from clear_gen.core.device import device_name, resolve_device
from clear_gen.distill import TrainOptions, train
from clear_gen.distill.cost import step_cost
from clear_gen.distill.data import Manifest, claim_folder, sample_path, save_tensors
from clear_gen.distill.train import TrainHooks
from clear_gen.models.flux1.random import build_transformer, flux_shape

VAE_CONFIG = types.SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE


def fake_data(folder: Path, res: int, text_len: int, joint_dim: int, count: int = 2) -> None:
    """A make-data folder of random posteriors and embeddings, for the base named "random"."""
    claim_folder(folder, Manifest("random", res, text_len, "bfloat16", "random", count))
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        latent = (16, res // 8, res // 8)
        sample = {
            "mean": torch.randn(latent, generator=g),
            "std": torch.full(latent, 0.05),
            "prompt_embeds": torch.randn(text_len, joint_dim, generator=g),
            "pooled": torch.randn(768, generator=g),
        }
        save_tensors(sample_path(folder, i), sample, {"prompt": "random"})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--down-factor", type=int, default=4)
    p.add_argument("--optimizer", default="prodigy")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=57)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    # 1. A random base of the asked shape, and random cached samples.
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = flux_shape(args.heads, args.head_dim, args.layers)
    transformer = build_transformer(shape, device, dtype)
    pipe = types.SimpleNamespace(transformer=transformer, vae=types.SimpleNamespace(config=VAE_CONFIG))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        fake_data(Path(tmp) / "data", args.res, args.text_len, shape.joint_dim)
        opts = TrainOptions(
            data=Path(tmp) / "data", out=Path(tmp) / "w.safetensors", window=args.window,
            down_factor=args.down_factor, model="random", res=args.res, steps=args.steps, batch=args.batch,
            accumulate=1, optimizer=args.optimizer, validate_steps=0, save=False, device=str(device),
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train(opts, TrainHooks(step=records.append), pipe=pipe)
    # 2. Measured against estimated.
    warm = [r["seconds"] for r in records[1:]] or [records[0]["seconds"]]
    cost = step_cost(
        shape, args.res, args.window, args.down_factor, args.text_len, args.optimizer, batch=args.batch
    )
    result = {
        "device": device_name(device),
        "res": args.res, "batch": args.batch, "window": args.window, "down_factor": args.down_factor,
        "optimizer": args.optimizer, "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
        "first_step_s": records[0]["seconds"],
        "step_s": statistics.median(warm),
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "estimated_tflop_per_sample": cost.flops / 1e12,
        "estimated_peak_gb": cost.peak_bytes / 1e9,
        "achieved_tflop_s": cost.flops * args.batch / statistics.median(warm) / 1e12,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
