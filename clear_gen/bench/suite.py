"""`clear-gen bench`: CLEAR versus full attention on random weights, so it runs with no download.

Measurements, one row (a dict) per resolution:
- plan: no compute; tokens, mask densities, block-mask build time, FLOPs and the speedup they bound;
- attention: the attention op alone, CLEAR (with each asked backend, side by side) versus full SDPA,
  plus a check of each against the dense reference (check.py);
- check: that check alone, one block's attention at each size (sampled query rows where the dense
  reference would not fit);
- step: one denoising step of a FLUX.1-dev-shaped transformer with random weights, CLEAR versus stock
  (measured, or composed from timed attention ops: `--measure composed`), optionally quantized and
  compiled; under torchrun the CLEAR step is the sequence-parallel one (run.world), checked against one
  GPU's;
- env: one row of what ran (versions, card, free memory).
`plan --gpus P` adds, per resolution and GPU count, sequence mode's communication per GPU next to its
compute, priced at NVLink, PCIe and network speeds, and the halo layout's on paper (parallel.py).
Timing follows nanoGPT's bench: warm up (first call, compilation included, reported apart),
synchronise, median of repeats, device named in every row.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..attention.backends import REFERENCE, Work, choose
from ..core import flops as FL
from ..core import geometry as G
from ..core.clock import samples, timed, timeit
from ..core.device import device_name, resolve_device, resolve_dtype
from ..core.launch import launched
from ..errors import ConfigError
from ..models.flux1 import use_exact_positions
from ..models.flux1.random import build_transformer, flux_shape, step_inputs
from ..run import world as PL
from ..run.measure import attention_ops_ms, composed_full_step, random_qkv
from .check import attention_check, check_row, dense_fits, env_row
from .spec import BenchSpec

ROW_KEYS = (
    "what", "res", "window", "down_factor", "tokens", "exact_density", "computed_density",
    "full_ms", "clear_ms", "speedup", "peak_mem_mb", "device", "backend",
)  # fmt: skip

Progress = Callable[[str], None] | None


# ---------------------------------------------------------------- small pieces


def geometry(res: int, window: int, down_factor: int, text_len: int) -> G.Geometry:
    """Geometry of a res x res image: (res / 16)^2 image tokens, tiled as the transformer tiles them."""
    from ..core.sizes import check_size  # generate's check: range, multiple, and the nearest valid size

    check_size(res, res, 16 * down_factor)
    side = res // 16
    return G.image_geometry(text_len, side, side, window, down_factor)


def row_major(geo: G.Geometry) -> G.Geometry:
    """The same attention with image tokens row-major (the reference layout): one tile = one grid row."""
    return G.Geometry(geo.text_len, geo.height, geo.width, geo.window, geo.down_factor, (1, geo.width))


def _base_row(what: str, res: int, geo: G.Geometry, lists: G.BlockLists, dev: str) -> dict:
    size = geo.q_len * geo.kv_len
    return {
        "what": what,
        "res": res,
        "window": geo.window,
        "down_factor": geo.down_factor,
        "tokens": geo.q_len,
        "exact_density": G.needed_pairs(geo) / size,
        "computed_density": lists.computed_pairs() / size,
        "full_ms": None,
        "clear_ms": None,
        "speedup": None,
        "peak_mem_mb": None,
        "device": dev,
        "backend": None,
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------- plan


def plan_row(res: int, window: int, down_factor: int, text_len: int, shape: FL.FluxShape) -> dict:
    """Densities, block-mask build time, FLOPs per step and the speedup bound; no attention computed."""
    geo = geometry(res, window, down_factor, text_len)
    uncached = lambda: G.block_mask.__wrapped__(geo, "cpu")  # noqa: E731
    build = samples(uncached, torch.device("cpu"), 6)[1:]  # ms, after one warm-up
    lists = G.build_block_lists(geo)
    needed = G.needed_pairs(geo)
    flops = FL.step_flops(shape, geo, lists.computed_pairs())
    row = _base_row("plan", res, geo, lists, device_name(torch.device("cpu")))
    row.update(
        computed_over_needed=lists.computed_pairs() / needed,
        rowmajor_over_needed=G.build_block_lists(row_major(geo)).computed_pairs() / needed,
        mask_build_ms=statistics.median(build),
        mask_build_min_ms=min(build),  # on a shared machine the best run is the intrinsic cost
        linear_pflop=flops["linear"] / 1e15,
        attn_full_pflop=flops["attn_full"] / 1e15,
        attn_exact_pflop=flops["attn_exact"] / 1e15,
        attn_computed_pflop=flops["attn_computed"] / 1e15,
        speedup_bound=FL.speedup_bound(flops),
        layers=shape.layers,
    )
    return row


def comm_row(res: int, window: int, down_factor: int, text_len: int, shape: FL.FluxShape, gpus: int) -> dict:
    """Per GPU and step at `gpus` GPUs: compute, head-parallel bytes and their time on each link (None when
    the heads do not split), and the halo layout's bytes on paper. Compute time at parallel.ASSUMED_FLOPS."""
    geo = geometry(res, window, down_factor, text_len)
    flops = FL.step_flops(shape, geo, _computed(geo))
    compute = (flops["linear"] + flops["attn_computed"]) / gpus
    a2a = PL.head_parallel_bytes(shape, geo, gpus) if shape.heads % gpus == 0 else None
    halo = PL.halo_bytes(shape, geo, gpus)
    row = {
        "what": "comm", "res": res, "window": window, "down_factor": down_factor, "tokens": geo.q_len,
        "gpus": gpus, "heads": shape.heads, "layers": shape.layers, "pflop_per_gpu": compute / 1e15,
        "compute_s": compute / PL.ASSUMED_FLOPS, "assumed_tflops": PL.ASSUMED_FLOPS / 1e12,
        "a2a_gb": None if a2a is None else a2a / 1e9, "halo_gb": halo / 1e9,
    }  # fmt: skip
    for link, rate in PL.LINKS.items():
        row[f"a2a_s {link}"] = None if a2a is None else a2a / rate
    row["halo_s 400 Gb/s"] = halo / PL.LINKS["400 Gb/s"]
    return row


# ---------------------------------------------------------------- attention


def _check_geometry(res: Sequence[int], window: int, down_factor: int, text_len: int) -> G.Geometry:
    """The smallest asked-for size if the dense reference fits it, else 1024 px or less."""
    for r in (min(res), 1024, 512, 256):
        geo = geometry(r, window, down_factor, text_len)
        if dense_fits(geo):
            return geo
    raise ConfigError(f"text length {text_len} is too long for the dense reference check")


def attention_row(res: int, spec: BenchSpec, bench: Bench, backend: str, fulls: dict) -> dict:
    """CLEAR attention (the backend) versus full SDPA over the text + image tokens, heads x head_dim. Full
    SDPA runs once per size (`fulls`, by res) for all the backends a run compares. A backend that cannot
    serve the size (dense's mask limit, gather's budget, flex-fa4 without its package) gets a row saying so
    (`refused`), and one that fails when it runs (a kernel that does not compile on this card) a row saying
    how (`failed`): the others are still measured."""
    import torch.nn.functional as F

    from ..attention.backends import clear_attention

    heads, head_dim, repeats = spec.heads, spec.head_dim, spec.asked.repeats
    device = bench.device
    geo = geometry(res, spec.window, spec.down_factor, spec.asked.text_len)
    q, k, v = random_qkv(geo, heads, head_dim, device, bench.dtype)
    scale = head_dim**-0.5
    row = _base_row("attention", res, geo, G.build_block_lists(geo), device_name(device))
    row.update(heads=heads, head_dim=head_dim, dtype=str(bench.dtype).removeprefix("torch."))
    row.update(backend=backend, backend_asked=backend)
    try:
        chosen = choose(backend, device, geo, work=Work.of(q))
    except ConfigError as e:
        row.update(refused=str(e), **fulls.get(res, {"full_ms": None}))
        return row
    clear = lambda: clear_attention(q, k, v, geo, scale, chosen.name)  # noqa: E731
    try:
        clear_ms, first_ms, peak = timed(clear, device, repeats)
    except Exception as e:  # one kernel's failure is a row of the comparison, not the end of it
        last = (str(e).strip().splitlines() or [""])[-1][:200]
        row.update(failed=f"{type(e).__name__}: {last}", **fulls.get(res, {"full_ms": None}))
        return row
    row.update(backend=chosen.name, clear_ms=clear_ms, clear_compile_ms=first_ms - clear_ms, peak_mem_mb=peak)
    if res not in fulls:
        kq, vq = k[:, :, : geo.q_len], v[:, :, : geo.q_len]  # full attention: no down-sampled keys
        full = lambda: F.scaled_dot_product_attention(q, kq, vq, scale=scale)  # noqa: E731
        flops = 4.0 * FL.full_pairs(geo) * heads * head_dim
        ratio = FL.full_pairs(geo) / _computed(geo)
        fulls[res] = bench.guard.measure(full, flops, clear_ms, ratio, device, repeats)
    row.update(fulls[res])
    row["speedup"] = row["full_ms"] / clear_ms if row["full_ms"] else None
    if chosen.image_rows is not None and geo.text_len % G.BLOCK == 0:
        row.update(text_split(q, k, v, geo, scale, device, repeats, chosen))
    return row


def text_split(q, k, v, geo: G.Geometry, scale: float, device, repeats: int, backend) -> dict:
    """What the text query rows cost: they visit every key block (~2,052 at 8K) where an image row
    visits ~13, so a few thread blocks may run long after the rest. Times the image rows alone (their
    rows of the block mask: the backend's `image_rows`) and the text rows alone (SDPA over text and image
    keys), then both as its `split` backend runs them (`split_ms`, one output): if that is well under the
    one-kernel time, the text rows deserve their own pass by default."""
    import torch.nn.functional as F

    from ..attention.backends import clear_attention

    t, n = geo.text_len, geo.q_len
    image = lambda: backend.image_rows(q, k, v, geo, scale)  # noqa: E731
    text = lambda: F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :n], v[:, :, :n], scale=scale)  # noqa: E731
    image_ms, _ = timeit(image, device, repeats)
    text_ms, _ = timeit(text, device, repeats)
    if backend.split is None:
        return {"image_rows_ms": image_ms, "text_rows_ms": text_ms}
    split = lambda: clear_attention(q, k, v, geo, scale, backend.split)  # noqa: E731  (both, one output)
    split_ms, _ = timeit(split, device, repeats)
    return {"image_rows_ms": image_ms, "text_rows_ms": text_ms, "split_ms": split_ms}


def _computed(geo: G.Geometry) -> int:
    return G.build_block_lists(geo).computed_pairs()


FULL_ONE_CALL_S = 10.0  # a full-attention call estimated to take longer runs once, without a warm-up


class FullGuard:
    """Skips full-attention runs estimated to take over `max_seconds` per call, or to overrun the
    `deadline` (a time.monotonic() value), and says so.

    The estimate is FLOPs at the rate of the last measured full run, or failing that the CLEAR time
    times the FLOP ratio (same rate assumed). A skipped run gets the estimate, marked `full_estimated`.
    A run estimated over FULL_ONE_CALL_S is timed once (`full_repeats` 0): at 8K a stock step takes
    ~25-100 s, and timing it twice spent a GPU session's minutes on a warm-up.
    """

    def __init__(self, enabled: bool, max_seconds: float | None, deadline: float | None = None):
        self.enabled, self.max_seconds, self.deadline = enabled, max_seconds, deadline
        self.rate = None  # FLOP per ms of the last measured full run

    def measure(self, fn, flops: float, clear_ms: float | None, ratio: float, device, repeats: int) -> dict:
        """With no rate and no CLEAR time to estimate from, the run is measured."""
        if not self.enabled:
            return {"full_ms": None, "full_estimated": False}
        est_ms = flops / self.rate if self.rate else (clear_ms or 0.0) * ratio
        limit_ms = math.inf if self.max_seconds is None else self.max_seconds * 1e3
        if self.deadline is not None:
            limit_ms = min(limit_ms, (self.deadline - time.monotonic()) * 1e3)
        if est_ms > limit_ms:
            return {"full_ms": est_ms, "full_estimated": True}
        # Too slow to repeat, or so slow that a warm-up would double the cost for nothing (SDPA compiles
        # nothing; a first call's overhead is well under 1% of it): one call.
        reps = repeats if est_ms * (1 + repeats) <= limit_ms and est_ms <= FULL_ONE_CALL_S * 1e3 else 0
        full_ms, _, peak = timed(fn, device, reps)
        self.rate = flops / full_ms
        return {"full_ms": full_ms, "full_estimated": False, "full_repeats": reps, "full_peak_mem_mb": peak}


# ---------------------------------------------------------------- step


def check_step(model, inputs: dict, window: int, down_factor: int, backend: str, shards=None) -> dict:
    """Whole-step CLEAR with the backend against the dense-mask reference: relative L2 error. With
    `shards` (under torchrun), the sequence-parallel step against this GPU's own step."""
    from ..attention import apply_clear

    outs = []
    runs = (
        ((backend, None), (backend, shards)) if shards is not None else ((REFERENCE, None), (backend, None))
    )
    for name, parallel in runs:
        apply_clear(model, window=window, down_factor=down_factor, backend=name, parallel=parallel)
        outs.append(model(**inputs)[0].float())
    err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    tol = 1e-3 if inputs["hidden_states"].dtype == torch.float32 else 5e-2
    return {"check_rel_err": err, "check_ok": bool(math.isfinite(err) and err <= tol)}


def step_row(res: int, spec: BenchSpec, bench: Bench, check: bool, emit: Callable[[dict], None]) -> dict:
    """One denoising step with CLEAR (the asked backend) and/or the stock attention (`measure`); check vs
    dense if asked. `emit` sees the row once CLEAR is measured, before the (much slower) stock step. Under
    torchrun (`bench.shards`) CLEAR runs sequence-parallel, checked against one GPU; stock runs on each GPU
    whole. `measure="composed"`: the stock step is not run but composed from the CLEAR step and one stock
    and one CLEAR attention op timed at this size (run.measure.composed_full_step). With --quantize or
    --compile the plain CLEAR step is timed first (`plain_ms`), then the model is quantized and its blocks
    compiled as generate does, and everything after runs that way."""
    from ..attention import apply_clear, remove_clear

    o, model, device, shape, shards = spec.asked, bench.model, bench.device, bench.shape, bench.shards
    window, down_factor = spec.window, spec.down_factor
    geo = geometry(res, window, down_factor, o.text_len)
    inputs = step_inputs(model, res, o.text_len, device, bench.dtype)
    step = lambda: model(**inputs)  # noqa: E731
    flops = FL.step_flops(shape, geo, _computed(geo))
    row = _base_row("step", res, geo, G.build_block_lists(geo), device_name(device))
    row.update(layers=shape.layers, heads=shape.heads, head_dim=shape.head_dim, text_len=o.text_len)
    row.update(dtype=str(bench.dtype).removeprefix("torch."), speedup_bound=FL.speedup_bound(flops))
    gpus = 1 if shards is None else shards.world.size
    row.update(gpus=gpus, parallel="none" if shards is None else "sequence")
    row.update(compile=spec.compile, quantize=spec.quantize)
    sped = spec.compile or spec.quantize != "none"
    backend = spec.backends[0]
    row["backend"] = choose(backend, device, geo, work=Work(shape.heads, shape.head_dim, bench.dtype)).name
    # 1. CLEAR timed (its first call compiles a compiling backend's kernel), then the optional whole-step
    #    check; with --quantize or --compile, first the plain step, then the quantized and compiled one.
    if o.measure != "full":
        apply_clear(model, window=window, down_factor=down_factor, backend=backend, parallel=shards)
        if sped:
            row["plain_ms"], _, _ = timed(step, device, o.repeats)
            emit(row)
            _speed_up(model, spec)
        clear_ms, first_ms, peak = timed(step, device, o.repeats)
        row.update(clear_ms=clear_ms, clear_compile_ms=first_ms - clear_ms, peak_mem_mb=peak)
        if check:
            row.update(check_res=res, **check_step(model, inputs, window, down_factor, backend, shards))
        remove_clear(model)
        emit(row)
    elif sped:
        _speed_up(model, spec)
    # 2. Stock attention: composed from timed ops, or run unless the guard estimates it too slow.
    if o.measure == "composed":
        heads = (shape.heads, shape.head_dim)
        stock_op, clear_op = attention_ops_ms(geo, *heads, device, bench.dtype, row["backend"], o.repeats)
        full_ms = composed_full_step(row["clear_ms"], shape.layers, stock_op, clear_op)
        row.update(full_ms=full_ms, full_estimated=False, full_composed=True, stock_op_ms=stock_op,
                   clear_op_ms=clear_op, rest_ms=row["clear_ms"] - shape.layers * clear_op)  # fmt: skip
    elif o.measure != "clear":
        full_flops = flops["linear"] + flops["attn_full"]
        gpu_ms = None if row["clear_ms"] is None else row["clear_ms"] * gpus  # one GPU's: from GPU-seconds
        row.update(bench.guard.measure(step, full_flops, gpu_ms, FL.speedup_bound(flops), device, o.repeats))
    row["speedup"] = row["full_ms"] / row["clear_ms"] if row["full_ms"] and row["clear_ms"] else None
    return row


def _speed_up(model, spec: BenchSpec) -> None:
    """--quantize (torchao, as at load) then --compile (regional, the repeated blocks), in place."""
    from ..run.speed import compile_blocks
    from ..weights.quantize import quantize_built

    quantize_built(model, spec.quantize)
    if spec.compile:
        compile_blocks(model)


# ---------------------------------------------------------------- the one entry point


ALL_SIZES = (1024, 2048, 4096, 8192)
CPU_SIZES = (1024,)  # a full-size attention op or step at 1K takes seconds on a CPU; 8K takes hours


def run(
    spec: BenchSpec, progress: Progress = None, on_row: Callable[[dict], None] | None = None
) -> list[dict]:  # noqa: E501
    """Benchmark rows, one per resolution (see module docstring). `on_row` sees each row as it lands
    (a step row twice: once CLEAR is measured, again with full attention). `gpus` (plan): a
    communication row per resolution and GPU count too.

    No res: 1K-8K, or 1K alone for measurements on a CPU. `measure` (step): both, clear, full or composed.
    Full-attention runs estimated (FLOP model) to take over `max_full_seconds` per call, or to end after
    `time_budget` seconds from now, are skipped and reported as estimates (`full_estimated`). `env`: one
    row of what runs them.
    """
    o, say, emit = spec.asked, progress or (lambda _msg: None), on_row or (lambda _row: None)
    if o.what == "env":
        row = env_row(resolve_device(o.device))
        emit(row)
        return [row]
    world, dev = _world(o.what, o.device)
    sizes = _sizes(spec, dev, say)
    dt = resolve_dtype(o.dtype, dev)
    shape = flux_shape(spec.heads, spec.head_dim, o.layers)
    deadline = None if o.time_budget is None else time.monotonic() + o.time_budget
    guard = FullGuard(o.compare_full or o.measure == "full", o.max_full_seconds, deadline)
    # Rows in order; correctness checks in the same run, after the timings (so that the first timed call
    # carries the compilation). no_grad, as generate runs: the same compiled kernels.
    with torch.no_grad():
        model = build_transformer(shape, dev, dt) if o.what == "step" else None
        if model is not None:
            use_exact_positions(model)  # stock and CLEAR steps see the same, exact positions
        shards = None if world is None else PL.SequenceShards(world, spec.heads)
        return _rows(spec, sizes, Bench(dev, dt, shape, guard, model, shards), say, emit)


@dataclass
class Bench:
    """What every row of a run measures on: the device, dtype, model shape, full-attention guard, the
    random transformer (step) and torchrun's shards (a step under torchrun)."""

    device: torch.device
    dtype: torch.dtype
    shape: FL.FluxShape
    guard: FullGuard
    model: torch.nn.Module | None = None
    shards: object | None = None


def _sizes(spec: BenchSpec, dev: torch.device, say) -> tuple[int, ...]:
    """The asked sizes (each checked), else 1K-8K, or 1K alone for a measurement on a CPU."""
    o = spec.asked
    sizes = o.res
    if sizes is None:
        sizes = CPU_SIZES if dev.type == "cpu" and o.what != "plan" else ALL_SIZES
        say(f"sizes {', '.join(map(str, sizes))} px (--res to choose)")
    for r in sizes:
        geometry(r, spec.window, spec.down_factor, o.text_len)
    return sizes


def _rows(spec: BenchSpec, sizes, bench: Bench, say, emit) -> list[dict]:
    """One row per size (and per GPU count with --gpus), each emitted as it lands; the attention check."""
    o, wf, dev = spec.asked, (spec.window, spec.down_factor, spec.asked.text_len), bench.device
    rows, fulls = [], {}  # fulls: full SDPA's figures per size, shared by the backends compared
    for r in sizes:
        say(f"{o.what} {r} px, r = {spec.window}, f = {spec.down_factor} on {device_name(dev)}")
        if o.what == "plan":
            row = plan_row(r, *wf, bench.shape)
        elif o.what == "attention":
            for backend in spec.backends[:-1]:  # all but the last: the last is the loop's row
                rows.append(attention_row(r, spec, bench, backend, fulls))
                emit(rows[-1])
            row = attention_row(r, spec, bench, spec.backends[-1], fulls)
        elif o.what == "check":
            geo = geometry(r, *wf)
            base = _base_row("check", r, geo, G.build_block_lists(geo), device_name(dev))
            row = check_row(base, geo, spec.heads, spec.head_dim, dev, bench.dtype)
            say(f"check: CLEAR vs dense at {r} px, max |err| {row['check_max_err']:.2e}")
        else:
            geo = geometry(r, *wf)
            small = dense_fits(geo) or bench.shards is not None  # dense or one-GPU check
            row = step_row(r, spec, bench, r == min(sizes) and small and o.measure != "full", emit)
        rows.append(row)
        emit(row)
        for p in o.gpus:
            rows.append(comm_row(r, *wf, bench.shape, p))
            emit(rows[-1])
    if o.what == "attention":
        check_geo = _check_geometry(sizes, *wf)
        for backend in spec.backends:
            own = [row for row in rows if row["backend_asked"] == backend]
            if own and all(row.get("refused") or row.get("failed") for row in own):
                say(f"check: {backend} not checked (it did not run)")
                continue
            check = attention_check(check_geo, spec.heads, spec.head_dim, dev, bench.dtype, backend)
            say(
                f"check: CLEAR ({backend}) vs {REFERENCE} at {check['check_res']} px, "
                f"max |err| {check['check_max_err']:.2e}"
            )
            for row in (row for row in rows if row["backend_asked"] == backend):
                row.update(check)
                emit(row)
    return rows


def _world(what: str, device: str) -> tuple[PL.World | None, torch.device]:
    """(parallel.World, device) for a step under torchrun (rank, process group, cuda:LOCAL_RANK), else
    (None, the device)."""
    if what == "step" and launched():
        return PL.start("sequence", device)
    return None, resolve_device(device)
