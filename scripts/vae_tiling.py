"""Exact VAE tiling against the untiled VAE and diffusers' tiling (fast): error, time and memory.

    PYTHONPATH=. python scripts/vae_tiling.py                          # CPU: 1024 and 2048 px, 256 px tiles
    PYTHONPATH=. python scripts/vae_tiling.py --res 1024 --dtype bf16
    PYTHONPATH=. python scripts/vae_tiling.py --at-8k                  # + 8K on 'meta': live bytes, FLOPs
    PYTHONPATH=. python scripts/vae_tiling.py --bench --device cuda --dtype bf16 --channels 128 \
        --tile 1024 --jsonl rows.jsonl --label vae-8k                  # gpu_bench.sh's vae-8k part

A random VAE of FLUX.1's layout (models.flux1.random.build_vae: 2 resnets a down block, 3 an up block,
mid-block attention), `--channels` wide (FLUX.1's is 128). Each size decodes random latents and encodes a
random picture untiled, exactly tiled and with diffusers' tiles; errors against the untiled result (decode:
in levels of the 8-bit picture, 255 = the whole range; encode: in units of the posterior mean); times are
the median of `--repeats` calls after a warm-up. `--at-8k` runs the full-width VAE (128 channels, bf16) at
8192 px on the 'meta' device: the bytes it keeps alive op by op (tests/live_bytes.py) beside the memory
model (models/flux1/activations.py), and the FLOPs each way (torch's FLOP counter). `--bench` runs
clear_gen/bench/vae.py instead (exact tiles at `--big` px: time, peak memory against the plan's model; at
`--small` px against the untiled VAE), one JSON row per call into `--jsonl` (tagged `--label`), as
scripts/gpu_bench.sh's `vae-8k` part does; the report (clear_gen/bench/report.py) renders them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from clear_gen.core.device import device_name, resolve_device
from clear_gen.models.flux1 import vae as V
from clear_gen.models.flux1.activations import vae_activations
from clear_gen.models.flux1.random import build_vae

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADER = (
    "| what | px | tile px | dtype | exact: mean / max error | fast: mean / max error | untiled s | exact s "
    "| fast s |\n|---|---:|---:|---|---:|---:|---:|---:|---:|"
)


def timed(call, repeats: int):
    """(result, median seconds of `repeats` calls after a warm-up)."""
    result = call()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
    return result, statistics.median(seconds)


def runs(vae, tile: int, encode: bool) -> dict:
    """Each way of running the VAE, as the pipelines call it (AutoencoderKL.encode / decode)."""

    def way(mode: str):
        def call(x):
            V.set_vae_tiling(vae, mode, tile)
            return vae._encode(x) if encode else vae.decode(x).sample

        return call

    return {"untiled": way("off"), "exact": way("exact"), "fast": way("fast")}


def row(vae, side: int, tile: int, dtype: torch.dtype, device, repeats: int, encode: bool) -> str:
    g = torch.Generator().manual_seed(0)
    if encode:
        given = (torch.rand(1, 3, side, side, generator=g) * 2 - 1).to(device, dtype)  # a picture in [-1, 1]
    else:
        given = torch.randn(1, 16, side // 8, side // 8, generator=g).to(device, dtype)  # latents
    with torch.no_grad():
        out = {
            name: timed(lambda call=call: call(given), repeats)
            for name, call in runs(vae, tile, encode).items()
        }
    untiled = out["untiled"][0].float()
    if encode:
        untiled = untiled[:, :16]  # the posterior's mean
        errors = {k: (v[0].float()[:, :16] - untiled).abs() for k, v in out.items()}
        unit = "latent"
    else:
        levels = lambda x: (x.float().clamp(-1, 1) + 1) * 127.5  # noqa: E731  (what the PNG stores)
        errors = {k: (levels(v[0]) - levels(untiled)).abs() for k, v in out.items()}
        unit = "levels"
    cells = [("encode" if encode else "decode"), f"{side}", f"{tile}", str(dtype).removeprefix("torch.")]
    cells += [f"{errors[k].mean():.2g} / {errors[k].max():.2g} {unit}" for k in ("exact", "fast")]
    cells += [f"{out[k][1]:.2f}" for k in ("untiled", "exact", "fast")]
    return "| " + " | ".join(cells) + " |"


def at_8k() -> list[str]:
    """Live bytes and FLOPs of the full-width VAE at 8192 px, bf16, 1024 px tiles, on 'meta'."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    import torch.nn.functional as F
    from live_bytes import LiveBytes, flash_like_sdpa
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    vae = build_vae(meta, torch.bfloat16)
    with torch.device(meta):
        z, x = torch.empty(1, 16, 1024, 1024).bfloat16(), torch.empty(1, 3, 8192, 8192).bfloat16()
    lines = ["| 8192 px, bf16, 1024 px tiles | model GB | live bytes GB | TFLOP |", "|---|---:|---:|---:|"]
    sdpa = F.scaled_dot_product_attention
    for encode in (False, True):
        for name, call in runs(vae, 1024, encode).items():
            given = x if encode else z
            with torch.no_grad(), FlopCounterMode(display=False) as flops:
                call(given)
            F.scaled_dot_product_attention = flash_like_sdpa  # what a fused kernel keeps
            try:
                with torch.no_grad(), LiveBytes() as live:
                    call(given)
            finally:
                F.scaled_dot_product_attention = sdpa
            mode = {"untiled": "off"}.get(name, name)
            model = vae_activations(8192, 8192, 2, mode, 1024, encode) / 1e9
            what = f"{'encode' if encode else 'decode'} {name}"
            lines.append(
                f"| {what} | {model:.1f} | {live.peak / 1e9:.1f} | {flops.get_total_flops() / 1e12:.0f} |"
            )
    return lines


def bench(args: argparse.Namespace) -> None:
    """Each row of bench/vae.py as it lands: printed, and appended to --jsonl with its part."""
    import json

    from clear_gen.bench.report import append
    from clear_gen.bench.vae import rows

    for row in rows(args.device, DTYPES[args.dtype], args.channels, args.big, args.small, args.tile):
        print(json.dumps(row), flush=True)
        if args.jsonl:
            append(args.jsonl, {**row, "part": args.label})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", default="1024,2048", help="square sides in px")
    parser.add_argument("--tile", type=int, default=256, help="px")
    parser.add_argument("--channels", type=int, default=16, help="the VAE's width (FLUX.1's: 128)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--at-8k", action="store_true", help="also the full-width VAE at 8K on 'meta'")
    parser.add_argument("--bench", action="store_true", help="the GPU part's rows (bench/vae.py) instead")
    parser.add_argument("--big", type=int, default=8192, help="--bench: px of the exact tiles' timing")
    parser.add_argument("--small", type=int, default=4096, help="--bench: px of the error against untiled")
    parser.add_argument("--jsonl", type=Path, help="--bench: append each row to this file")
    parser.add_argument("--label", default="vae-8k", help="--bench: the rows' part")
    args = parser.parse_args()
    if args.bench:
        bench(args)
        return
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    vae = build_vae(device, dtype, args.channels)
    where = f"on {device_name(device)}, torch {torch.__version__}"
    print(f"random FLUX.1-layout VAE, {args.channels} channels, {where}\n{HEADER}")
    for side in (int(s) for s in args.res.split(",")):
        for encode in (False, True):
            print(row(vae, side, args.tile, dtype, device, args.repeats, encode), flush=True)
    if args.at_8k:
        print("\n" + "\n".join(at_8k()))


if __name__ == "__main__":
    main()
