"""Exact VAE tiling on a device (scripts/gpu_bench.sh's `vae-8k` part): a random VAE of FLUX.1's layout
(models.flux1.random.build_vae; 128 channels: FLUX.1's width) at `small` px, where the untiled VAE fits
(4096 px: ~26 GB in bf16 by the plan), exact tiles against the untiled decode and encode: the error, both
times and peaks; then `big` px latents decoded in exact tiles, timed, the peak memory beside the plan's
model (models.flux1.activations.vae_activations). The 8K decode is the long one (its mid block's attention
over 1M latent pixels, whole as untiled: ~2 minutes on an H200), so it comes last.

One row (a dict, `what` "vae") per call, as it lands: `op` (decode, encode), `res`, `tiling` (exact, off),
`tile`, `seconds` (one synchronised call, its input made before it, after a warm-up of each op at
`2 * tile` px, where the kernels are chosen), `peak_gb` (allocated above what was allocated before the
call: the call's working memory and its output; on a CPU the resident high-water mark), `model_gb` (the
plan's activations), `err_mean`, `err_max` against the untiled call at the same size (decode: levels of
the 8-bit picture; encode: units of the posterior's mean), `ref_err_mean`, `ref_err_max` (at `small` px)
against the untiled call in float32 (bf16 rounding alone: exact tiles should be no further from it than
the untiled call) and `error` (a call that failed, out of memory say: the row says so, the next one runs).

    rows("cuda", channels=128, big=8192, small=4096, tile=1024)   # what the GPU part runs
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from ..core.device import device_name, peak_memory, reset_peak_memory, resolve_device, synchronize
from ..models.flux1 import vae as V
from ..models.flux1.activations import vae_activations
from ..models.flux1.random import build_vae


def measured(
    call: Callable[[], torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, float, float | None]:
    """(the call's result, its synchronised seconds, its peak GB above what was allocated before it)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = reset_peak_memory(device)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    out = call()
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak, reserved = peak_memory(device, before)
    peak = reserved if peak is None else peak
    return out, seconds, None if peak is None else peak - allocated / 1e9


def _call(vae, op: str, tiling: str, tile: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The VAE as the pipelines call it (AutoencoderKL.decode / _encode) with this tiling."""

    def call(given: torch.Tensor) -> torch.Tensor:
        V.set_vae_tiling(vae, tiling, tile)
        return vae.decode(given).sample if op == "decode" else vae._encode(given)[:, :16]  # the mean

    return call


def _given(op: str, res: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if op == "decode":
        return torch.randn(1, 16, res // 8, res // 8, generator=g).to(device, dtype)  # (B, 16, h, w) latents
    return (torch.rand(1, 3, res, res, generator=g) * 2 - 1).to(device, dtype)  # (B, 3, H, W) in [-1, 1]


def _errors(op: str, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean, max) |a - b|: decode in levels of the 8-bit picture (what a PNG stores), encode in latents."""
    if op == "decode":
        a, b = ((x.float().clamp(-1, 1) + 1) * 127.5 for x in (a, b))
    diff = (a.float() - b.float()).abs()
    return diff.mean().item(), diff.max().item()


def rows(
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    channels: int = 128,
    big: int = 8192,
    small: int = 4096,
    tile: int = 1024,
) -> Iterator[dict]:
    """The part's rows, one per VAE call, as they are measured (module docstring)."""
    dev = resolve_device(device)
    head = {"what": "vae", "device": device_name(dev), "torch": torch.__version__, "channels": channels,
            "dtype": str(dtype).removeprefix("torch."), "tile": tile}  # fmt: skip
    with torch.no_grad():
        truth = _float32_truth(dev, channels, small, tile)
        vae = build_vae(dev, dtype, channels)  # the same weights (seed 0), rounded to dtype
        for op in ("decode", "encode"):  # warm-up: the kernels' choice, at 2 x 2 tiles
            _call(vae, op, "exact", tile)(_given(op, 2 * tile, dev, dtype))
        untiled = {}
        plan = [("decode", small, "off"), ("decode", small, "exact"), ("encode", small, "off"),
                ("encode", small, "exact"), ("decode", big, "exact")]  # fmt: skip
        for op, res, tiling in plan:
            row = _row(vae, head, op, res, tiling, dev, dtype)
            out = row.pop("out")
            if out is not None and (op, res) in truth:
                row["ref_err_mean"], row["ref_err_max"] = _errors(op, out, truth[(op, res)])
            if out is not None and tiling == "off":
                untiled[(op, res)] = out
            elif out is not None and (op, res) in untiled:
                row["err_mean"], row["err_max"] = _errors(op, out, untiled.pop((op, res)))
            del out
            yield row
        V.set_vae_tiling(vae, "off", tile)


def _float32_truth(dev: torch.device, channels: int, res: int, tile: int) -> dict:
    """The untiled float32 decode and encode at `res` px (the weights `rows` rounds): what rounding to the
    compute dtype costs, untiled and in exact tiles alike. Empty when they do not fit."""
    vae = build_vae(dev, torch.float32, channels)
    try:
        return {
            (op, res): _call(vae, op, "off", tile)(_given(op, res, dev, torch.float32))
            for op in ("decode", "encode")
        }
    except torch.OutOfMemoryError:
        return {}
    finally:
        del vae
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _row(vae, head: dict, op: str, res: int, tiling: str, dev: torch.device, dtype: torch.dtype) -> dict:
    """One measured call: its row, and its result under "out" (None when it failed)."""
    row = {**head, "op": op, "res": res, "tiling": tiling, "error": None, "seconds": None, "peak_gb": None,
           "err_mean": None, "err_max": None, "ref_err_mean": None, "ref_err_max": None}  # fmt: skip
    e, tile = torch.finfo(dtype).bits // 8, head["tile"]
    row["model_gb"] = vae_activations(res, res, e, tiling, tile, op == "encode") / 1e9
    try:
        given, call = _given(op, res, dev, dtype), _call(vae, op, tiling, tile)
        out, row["seconds"], row["peak_gb"] = measured(lambda: call(given), dev)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0][:120]}"
        out = None
    return {**row, "out": out}
