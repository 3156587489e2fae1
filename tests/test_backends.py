"""The attention backends: `gather` against references written here (and flex), the registry's choices per
device and use, a compile failure's fallback, `info --backends`, the Apple-silicon device logic with MPS
patched in (no Mac here), and every new bad input as one line through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli as run
from conftest import tiny_inputs, tiny_transformer
from test_attention import clear_checkpoint, reference_output, rel_err
from test_geometry import GEOMETRIES, reference_mask

import clear_gen
from clear_gen.attention import backends as A
from clear_gen.attention import gather
from clear_gen.attention.backends import BACKENDS, Work, choose, clear_attention
from clear_gen.core import clock
from clear_gen.core import device as D
from clear_gen.core.geometry import Geometry, tile_order
from clear_gen.errors import ConfigError

CPU, CUDA, MPS, XPU = (torch.device(t) for t in ("cpu", "cuda", "mps", "xpu"))


def qkv(geo: Geometry, heads: int = 3, dim: int = 16, batch: int = 2, seed: int = 0):
    """Random q (B, H, q_len, D) and k, v (B, H, kv_len, D) with the strides the processor passes."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randn(batch, n, heads, dim, generator=g).transpose(1, 2)  # noqa: E731
    return rand(geo.q_len), rand(geo.kv_len), rand(geo.kv_len)


# ---------------------------------------------------------------- gather, exact


@pytest.mark.parametrize("budget", [None, 1 << 20, 1], ids=["one-chunk", "1MiB", "a-tile-a-chunk"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
def test_gather_equals_the_dense_reference(geo, budget):
    """test_geometry's geometries (text rows, down-sampled keys, non-square grids, grids that tiles do not
    divide, a text block holding image rows) against the mask written from CLEAR's definition there; with
    chunks from the whole sequence down to one tile (and one text row) each."""
    q, k, v = qkv(geo)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(geo), scale=0.3)
    got = gather.attention(q, k, v, geo, 0.3, budget)
    assert got.shape == want.shape and got.transpose(1, 2).is_contiguous()  # (B, L, H, D) in memory
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("geo", GEOMETRIES[:5], ids=str)
def test_gather_evaluates_the_mask_when_a_geometry_has_too_many_patterns(geo, monkeypatch):
    monkeypatch.setattr(gather, "MAX_PATTERNS", 0)
    gather.patterns.cache_clear()
    gather._on_device.cache_clear()
    try:
        assert gather.patterns(geo) is None
        q, k, v = qkv(geo)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(geo), scale=0.3)
        torch.testing.assert_close(gather.attention(q, k, v, geo, 0.3, 1 << 20), want, atol=1e-5, rtol=0)
    finally:
        gather.patterns.cache_clear()
        gather._on_device.cache_clear()


def test_a_geometry_of_whole_tiles_has_few_mask_patterns():
    """Blocks that are whole tiles see a handful of distinct 128 x 128 masks at any size: a lookup a chunk."""
    ids, table = gather.patterns(Geometry(512, 64, 64, 8, 4))
    assert table.shape[0] <= 20 and not table[0].any() and int(ids.max()) < table.shape[0]


def sampled_reference(q, k, v, geo: Geometry, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """CLEAR for some query rows, from its definition (grid positions of the tile order, the circle, text
    and down-sampled keys): (B, H, len(rows), D)."""
    T, N = geo.text_len, geo.image_len
    perm = tile_order(geo.height, geo.width, geo.tile)
    y, x = perm // geo.width, perm % geo.width  # grid position of each image token, in tile order
    keys = torch.arange(geo.kv_len)
    mask = torch.zeros(len(rows), geo.kv_len, dtype=torch.bool)
    for i, r in enumerate(rows.tolist()):
        if r < T:
            mask[i] = keys < T + N
            continue
        img = keys[T : T + N] - T
        mask[i, :T] = True
        mask[i, T : T + N] = (y[img] - y[r - T]) ** 2 + (x[img] - x[r - T]) ** 2 < geo.window**2
        mask[i, T + N :] = True
    return F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask, scale=scale)


@pytest.mark.slow  # an 8K token grid, and flex compiled at that size
def test_gather_at_8k_equals_flex_and_the_definition_on_sampled_rows():
    geo = Geometry(512, 512, 512, 8)  # 8192 x 8192 px: 262,656 tokens, 1 head of 16 channels
    q, k, v = qkv(geo, heads=1, dim=16, batch=1)
    with torch.no_grad():
        got = clear_attention(q, k, v, geo, 0.25, "gather")
        torch.testing.assert_close(got, clear_attention(q, k, v, geo, 0.25, "flex"), atol=1e-5, rtol=0)
        g = torch.Generator().manual_seed(1)
        rows = torch.cat(
            [torch.tensor([0, 511, 512, 640, geo.q_len - 1]), torch.randint(0, geo.q_len, (60,), generator=g)]
        )
        want = sampled_reference(q, k, v, geo, rows, 0.25)
    torch.testing.assert_close(got[:, :, rows], want, atol=1e-5, rtol=0)


@pytest.mark.slow  # an 8K token grid with down-sampled keys
def test_gather_at_8k_with_down_sampled_keys_equals_the_definition_on_sampled_rows():
    geo = Geometry(512, 512, 512, 8, 4)
    q, k, v = qkv(geo, heads=1, dim=8, batch=1)
    g = torch.Generator().manual_seed(2)
    rows = torch.cat(
        [torch.tensor([3, 512, geo.q_len - 1]), torch.randint(512, geo.q_len, (40,), generator=g)]
    )
    with torch.no_grad():
        got = gather.attention(q, k, v, geo, 0.3)
        want = sampled_reference(q, k, v, geo, rows, 0.3)
    torch.testing.assert_close(got[:, :, rows], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case", [(7, 12, 20, 4, 1), (77, 16, 16, 8, 4), (3, 9, 13, 2, 1), (130, 8, 32, 4, 2)]
)
def test_gather_in_a_transformer_matches_the_row_major_reference(case):
    """test_attention's independent reference (row-major tokens, a loop-built mask and pooling)."""
    text_len, h, w, r, f = case
    model = tiny_transformer()
    sd = clear_checkpoint(model, f)
    inputs = tiny_inputs(1, text_len, h, w)
    expected = reference_output(model, sd, inputs, text_len, h, w, r, f, True, 10.0)
    clear_gen.apply_clear(
        model, window=r, down_factor=f, state_dict=sd, proportional_attention=True, ntk_factor=10.0,
        backend="gather",
    )  # fmt: skip
    with torch.no_grad():
        assert rel_err(model(**inputs).sample, expected) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_gather_in_half_precision(dtype, tol):
    geo = Geometry(77, 16, 24, 4, 2)
    q, k, v = (t.to(dtype) for t in qkv(geo))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=reference_mask(geo))
    got = clear_attention(q, k, v, geo, 16**-0.5, "gather")
    assert got.dtype == dtype and (got.float() - want).abs().max() < tol


@pytest.mark.parametrize("budget", [None, 1])
def test_gather_gradients_equal_the_dense_ones(budget):
    """q, k, v gradients through gathers and chunks (the spatial weights': test_distill's loop reference)."""
    geo = Geometry(77, 16, 20, 4, 2)
    q, k, v = qkv(geo, seed=3)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    results = []
    for run_it in (
        lambda *t: gather.attention(*t, geo, 0.3, budget),
        lambda *t: clear_attention(*t, geo, 0.3, "dense"),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = run_it(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    for name, a, b in zip(("out", "q", "k", "v"), *results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


# ---------------------------------------------------------------- the registry


@pytest.fixture
def compilers(monkeypatch):
    """flex can compile on every device (as on a machine with g++ and Triton), and has failed nowhere."""
    monkeypatch.setattr(BACKENDS["flex"], "needs", None)
    monkeypatch.setattr(BACKENDS["flex"], "failed", {})


def test_auto_picks_per_device_and_use_from_the_registry(compilers):
    geo, short = Geometry(512, 32, 32, 8, 4), Geometry(16, 8, 8, 2)
    picks = {
        (dev.type, training): choose("auto", dev, geo, training).name
        for dev in (CPU, CUDA, MPS, XPU)
        for training in (False, True)
    }
    assert picks == {
        ("cpu", False): "flex", ("cpu", True): "gather",  # FlexAttention has no CPU backward
        ("cuda", False): "flex", ("cuda", True): "flex",
        ("mps", False): "flex", ("mps", True): "gather",  # torch's Metal flex: inference only
        ("xpu", False): "gather", ("xpu", True): "gather",  # no flex there
    }  # fmt: skip
    assert choose("auto", CPU, short).name == "dense"  # the short-sequence rule (CPU_SHORT_SEQUENCES)
    assert choose("auto", XPU, short).name == "dense"  # below one block gather is dense's work


@pytest.mark.parametrize(
    "name, device, training, match",
    [
        ("flex", XPU, False, "the flex backend does not run on xpu"),
        ("flex", CPU, True, "no backward pass on cpu: train there with --backend gather"),
        ("flex", MPS, True, "no backward pass on mps: train there with --backend gather"),
        (
            "nope",
            CPU,
            False,
            "unknown attention backend 'nope'; choose one of auto, flex, gather, flex-split, dense",
        ),  # noqa: E501
    ],
)
def test_an_asked_backend_that_cannot_serve_says_why(compilers, name, device, training, match):
    with pytest.raises(ConfigError, match=match):
        choose(name, device, Geometry(512, 32, 32, 8), training)


def test_gather_refuses_a_size_whose_single_tile_exceeds_its_budget():
    full = Geometry(512, 64, 64, 91)  # a window as wide as the image: every tile sees every key block
    flux = Work(24, 128, torch.bfloat16)
    assert gather.widest_tile(full) == math.ceil(full.kv_len / 128)
    with pytest.raises(
        ConfigError, match=r"1.8 GiB for one query tile's 516 key blocks .* use --backend auto or a smaller"
    ):
        choose("gather", CPU, Geometry(512, 256, 256, 400), work=flux)
    assert choose("gather", CPU, full, work=flux).name == "gather"  # 1K full: fits
    assert choose("gather", CPU, Geometry(512, 256, 256, 8, 4), work=flux).name == "gather"  # 4K r8-down4


def test_dtypes_are_registry_facts():
    with pytest.raises(ConfigError, match="does not take float64"):
        choose("gather", CPU, Geometry(16, 8, 8, 2), work=Work(1, 8, torch.float64))


def test_flex_without_a_compiler_is_passed_over_and_said_why(monkeypatch):
    monkeypatch.setattr(A, "_cpp_compiler", lambda: False)
    assert choose("auto", CPU, Geometry(512, 32, 32, 8)).name == "gather"
    with pytest.raises(ConfigError, match="C\\+\\+ compiler, and none is here"):
        choose("flex", CPU, Geometry(512, 32, 32, 8))
    monkeypatch.setattr(A, "_triton", lambda: False)
    assert choose("auto", CUDA, Geometry(512, 32, 32, 8)).name == "flex"  # a plan for a GPU elsewhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose("auto", CUDA, Geometry(512, 32, 32, 8)).name == "gather"  # a GPU here without Triton


def failing_compile(*args, **kwargs):
    raise torch._dynamo.exc.TorchDynamoException("metal: no pipeline state for the flex kernel")


def test_a_flex_compile_failure_under_auto_falls_back_to_gather_with_one_note(compilers, monkeypatch):
    """As on a Mac whose Metal lowering fails: the run goes on with gather, said once, for the process."""
    monkeypatch.setattr(BACKENDS["flex"], "run", failing_compile)
    notes = []
    model = tiny_transformer()
    sd = clear_checkpoint(model, 1)
    inputs = tiny_inputs(1, 7, 12, 20)  # 247 keys: auto takes flex on the CPU
    expected = reference_output(model, sd, inputs, 7, 12, 20, 4, 1, False, 1.0)
    clear_gen.apply_clear(model, window=4, state_dict=sd, note=notes.append)
    with torch.no_grad():
        got = model(**inputs).sample
        model(**inputs)
    assert rel_err(got, expected) < 1e-5
    assert notes == [
        "the flex backend did not compile on cpu (metal: no pipeline state for the flex kernel): "
        "CLEAR runs on the gather backend instead"
    ]
    assert choose("auto", CPU, Geometry(7, 12, 20, 4)).name == "gather"  # the record names what ran
    with pytest.raises(
        ConfigError, match=r"did not compile on cpu \(metal: .*\) in this process; use --backend gather"
    ):
        choose("flex", CPU, Geometry(7, 12, 20, 4))


def test_an_asked_flex_that_fails_to_compile_is_one_line(compilers, monkeypatch):
    monkeypatch.setattr(BACKENDS["flex"], "run", failing_compile)
    geo = Geometry(7, 12, 20, 4)
    with pytest.raises(
        ConfigError, match=r"^the flex backend did not compile on cpu \(metal: .*\); use --backend gather$"
    ):
        clear_attention(*qkv(geo), geo, 0.3, "flex")
    assert BACKENDS["flex"].failed == {}  # asked for: nothing changes for auto


def test_no_module_outside_the_registry_names_a_backend():
    """Backend facts live in the registry: no other module compares with a backend's name."""
    import pathlib
    import re

    root = pathlib.Path(clear_gen.__file__).parent
    named = re.compile(r"""["'](flex|flex-split|gather|dense)["']""")
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p.name != "backends.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if named.search(line)
    ]
    assert hits == []


# ---------------------------------------------------------------- clear-gen info --backends


def test_info_backends_lists_each_backend_on_one_line(capsys):
    code, out, err = run(["info", "--backends"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "on this machine (cpu" in lines[0]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == ["flex", "gather", "flex-split", "dense"]
    assert (
        "cpu: inference and training" in rows["gather"] and "trains on cuda, cpu, mps, xpu" in rows["gather"]
    )
    assert "runs on cuda, cpu, mps, trains on cuda" in rows["flex"]


def test_info_backends_says_why_one_cannot_run_here(capsys, monkeypatch):
    monkeypatch.setattr(BACKENDS["flex"], "needs", lambda device: "the flex backend needs a C++ compiler")
    code, out, _ = run(["info", "--backends"], capsys)
    flex = next(line for line in out.splitlines() if line.split()[:1] == ["flex"])
    assert code == 0 and "not here: the flex backend needs a C++ compiler" in flex


# ---------------------------------------------------------------- Apple silicon, MPS patched in


@pytest.fixture
def mac(monkeypatch):
    """A Mac as torch would show it: no CUDA, MPS present, its clock and memory readings recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 48 * 10**9)
    monkeypatch.setattr(
        D, "_sysctl", {"hw.memsize": "68719476736", "machdep.cpu.brand_string": "Apple M2 Max"}.get
    )
    D.mps_bf16.cache_clear()
    monkeypatch.setattr(D, "mps_bf16", lambda: True)
    return calls


def test_auto_device_is_cuda_then_mps_then_cpu(mac, monkeypatch):
    assert D.resolve_device("auto") == MPS and D.resolve_device("mps") == MPS
    assert [d.type for d in D.devices_here()] == ["cpu", "mps"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.resolve_device("auto") == CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert D.resolve_device("auto") == CPU


def test_mps_timing_synchronises_names_the_chip_and_reads_the_driver_pool(mac):
    assert D.device_name(MPS) == "mps: Apple M2 Max (64 GB unified memory)"
    median, first, peak_mb = clock.timed(lambda: None, MPS, 2)
    assert mac.count("synchronize") == 6 and "empty_cache" in mac  # before and after each of 3 calls
    assert peak_mb == pytest.approx(3 * 2**30 / 2**20)


def test_mps_default_dtype_is_bf16_else_fp16_with_a_note(mac, monkeypatch):
    assert D.resolve_dtype(None, MPS) == torch.bfloat16 and D.dtype_note(None, MPS) is None
    assert D.resolve_dtype("fp32", MPS) == torch.float32
    monkeypatch.setattr(D, "mps_bf16", lambda: False)
    assert D.resolve_dtype(None, MPS) == torch.float16
    assert "no bf16 on MPS" in D.dtype_note(None, MPS) and D.dtype_note("fp32", MPS) is None


def test_a_macs_plan_uses_its_unified_memory(mac, monkeypatch):
    from clear_gen.plan import gpus
    from clear_gen.plan.memory import plan_run
    from clear_gen.plan.spec import GenerateOptions

    monkeypatch.setattr(gpus, "probe_tflops", lambda *a, **k: 12.0)
    plan = plan_run(GenerateOptions(prompts=["a"], width=2048, height=2048, device="mps"), assume_gpu=False)
    assert (plan.device, plan.free_gb, plan.unified, plan.gpu, plan.offload) == (
        "mps: Apple M2 Max (64 GB unified memory)", 48.0, True, True, "none",
    )  # fmt: skip
    assert plan.rate_tflops == 12.0 and plan.dtype == "bf16" and plan.problems == []


def test_a_dry_run_plans_a_4k_image_for_a_64_gb_mac_here_without_one(capsys):
    mac = ["a castle", "--res", "4096", "--dry-run", "--device", "mps", "--gpu-memory", "64"]
    code, out, _ = run(mac, capsys)  # exact VAE tiles (the default above 2048 px) park 5.6 GB more
    assert code == 1 and "needs 44.3 GB" in out and "--vae-tiling fast or a smaller size" in out
    code, out, err = run([*mac, "--vae-tiling", "fast"], capsys)
    assert code == 0, err
    assert "plan for a 64 GB Mac, 48.0 GB free: bf16, --offload none" in out
    assert "offload: none (the Mac (unified memory): plan" in out and "fits (peak + 10%" in out
    assert "no mps device here: planned for a 64 GB Mac (--gpu-memory)" in out
    code, out, _ = run([*mac, "--vae-tiling", "fast", "--json"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["unified"] and plan["fits"] and plan["stages"][-1]["tokens"] == 65_536
    code, out, _ = run(
        ["a castle", "--res", "4096", "--dry-run", "--device", "mps", "--gpu-memory", "24"], capsys
    )
    assert code == 1 and "on this Mac needs" in out and "use a Mac with more memory" in out


def test_a_dry_run_for_mps_without_memory_given_says_mps_is_not_here(capsys):
    code, out, _ = run(["a castle", "--res", "2048", "--dry-run", "--device", "mps"], capsys)
    assert code == 1 and "problem: --device mps: torch sees no Apple GPU (MPS)" in out


# ---------------------------------------------------------------- bad input, one line


def one_error(code: int, err: str) -> str:
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["a", "--res", "4096", "--window", "400", "--backend", "gather", "--device", "cpu", "--dry-run"],
            "stage 2/2 (4096x4096): the gather backend needs 2.5 GiB for one query tile's 516 key blocks at "
            "this size (its budget is 1.0 GiB): use --backend auto or a smaller --window",
        ),
        (
            ["a", "--res", "512", "--window", "4", "--device", "mps"],
            "--device mps: torch sees no Apple GPU (MPS); use --device cpu, or run on a Mac with Apple "
            "silicon",
        ),
        (
            ["bench", "--what", "step", "--backend", "flex,gather"],
            "several backends side by side with --what attention only",
        ),
        (["bench", "--what", "attention", "--backend", "flex,fast"], "unknown attention backend 'fast'"),
        (["info"], "info needs a PNG made by clear-gen (or --backends)"),
    ],
)
def test_new_bad_inputs_are_one_line(args, says, capsys):
    code, _, err = run(args, capsys)
    assert says in one_error(code, err)


# ---------------------------------------------------------------- bench: backends side by side


def test_bench_attention_measures_backends_side_by_side(monkeypatch):
    from clear_gen.bench import run as bench

    monkeypatch.setattr(A, "DENSE_MAX_ELEMENTS", 500_000)  # dense refused at 512 px, as from 2K for real
    kw = dict(heads=2, head_dim=16, repeats=1, device="cpu", window=4, down_factor=1, text_len=128)
    rows = bench("attention", res=[256, 512], backend="gather,dense", **kw)
    assert [(r["res"], r["backend"]) for r in rows] == [
        (256, "gather"),
        (256, "dense"),
        (512, "gather"),
        (512, "dense"),
    ]
    gather_512, dense_512 = rows[2], rows[3]
    assert gather_512["clear_ms"] > 0 and gather_512["peak_mem_mb"] >= 0 and gather_512["check_ok"]
    assert dense_512["clear_ms"] is None and "too large" in dense_512["refused"]
    assert gather_512["full_ms"] == dense_512["full_ms"]  # full SDPA measured once a size


def test_distill_trains_on_the_cpu_and_mps_with_gather(compilers):
    from clear_gen.distill.student import resolve_train_backend

    assert [resolve_train_backend("auto", d) for d in (CPU, MPS, CUDA)] == ["gather", "gather", "flex"]
