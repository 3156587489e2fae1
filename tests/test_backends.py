"""The attention backends: `gather` against references written here (and flex), the registry's choices per
device and use, a compile failure's fallback, `info --backends`, the Apple-silicon device logic with MPS
patched in (no Mac here), and every new bad input as one line through the CLI."""

from __future__ import annotations

import json
import math
import re

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
            "unknown attention backend 'nope'; choose one of auto, flex, gather, flex-split, flex-fa4, dense",
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
    named = re.compile(r"""["'](flex|flex-split|flex-fa4|gather|dense)["']""")
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p.name != "backends.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if named.search(line)
    ]
    assert hits == []


# ---------------------------------------------------------------- flex-fa4, CUDA patched in


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA GPU here as torch would show an H100 (compute capability 9.0) with flash-attn-4 installed;
    set `capability` and `package` to change them."""
    card = {"capability": (9, 0), "package": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: card["capability"])
    monkeypatch.setattr(A, "_flash_attn_cute", lambda: card["package"])
    monkeypatch.setattr(BACKENDS["flex"], "needs", None)  # Triton is there too
    return card


FLUX = Work(24, 128, torch.bfloat16)


def test_flex_fa4_serves_hopper_and_blackwell_in_half_precision_and_auto_never_takes_it(hopper):
    geo = Geometry(512, 32, 32, 8, 4)
    for card in ((9, 0), (10, 0), (10, 3), (11, 0)):
        hopper["capability"] = card
        assert choose("flex-fa4", CUDA, geo, work=FLUX).name == "flex-fa4"
        assert choose("flex-fa4", CUDA, geo, True, Work(24, 128, torch.float16)).name == "flex-fa4"
        assert choose("auto", CUDA, geo, work=FLUX).name == "flex"  # off by default until measured
    BACKENDS["flex"].failed["cuda"] = "the flex backend did not compile on cuda (...) in this process"
    try:
        assert choose("auto", CUDA, geo, work=FLUX).name == "gather"  # flex's fallback, not flex-fa4
    finally:
        BACKENDS["flex"].failed.pop("cuda")


@pytest.mark.parametrize(
    "card, package, work, says",
    [
        ((9, 0), False, FLUX, "the flex-fa4 backend needs FlashAttention-4's CuTe kernels: pip install "
                              "flash-attn-4"),
        (
            (8, 0), True, FLUX,
            "the flex-fa4 backend runs on Hopper and data-centre Blackwell GPUs (compute capability 9.x to "
            "11.x), not on this 8.0 card: use --backend flex",
        ),
        ((12, 0), True, FLUX, "compute capability 9.x to 11.x), not on this 12.0 card: use --backend flex"),
        ((9, 0), True, Work(24, 128, torch.float32), "the flex-fa4 backend does not take float32"),
        (
            (9, 0), True, Work(24, 256, torch.bfloat16),
            "the flex-fa4 backend takes head dims of 16 to 128 in steps of 8, not 256: use --backend flex",
        ),
        ((9, 0), True, Work(24, 8, torch.bfloat16), "takes head dims of 16 to 128 in steps of 8, not 8"),
    ],
)  # fmt: skip
def test_flex_fa4_that_cannot_serve_says_why_in_one_line_naming_the_fix(hopper, card, package, work, says):
    hopper.update(capability=card, package=package)
    with pytest.raises(ConfigError, match=re.escape(says)) as raised:
        choose("flex-fa4", CUDA, Geometry(512, 32, 32, 8, 4), work=work)
    assert str(raised.value).startswith("the flex-fa4 backend ") and "\n" not in str(raised.value)


def test_flex_fa4_is_planned_for_a_gpu_elsewhere_without_looking_for_its_package_here(monkeypatch):
    monkeypatch.setattr(A, "_flash_attn_cute", lambda: False)
    assert choose("flex-fa4", CUDA, Geometry(512, 32, 32, 8, 4), work=FLUX).name == "flex-fa4"
    with pytest.raises(
        ConfigError, match=r"^the flex-fa4 backend does not run on cpu \(it runs on cuda\): use"
    ):
        choose("flex-fa4", CPU, Geometry(512, 32, 32, 8, 4))


@pytest.mark.parametrize("card, rows", [((9, 0), 128), ((10, 0), 256)])
def test_flex_fa4_runs_flex_with_the_flash_kernel_and_the_query_blocks_fa4_tiles(
    hopper, monkeypatch, card, rows
):
    """The call FA4 gets, on CPU tensors: flex's FLASH kernel over CLEAR's block mask, with 128-row query
    blocks on Hopper and 256-row ones on Blackwell (flash_attn.cute: 2 Q stages of 128 there)."""
    hopper["capability"] = card
    calls = []

    def flash(q, k, v, block_mask, scale, kernel="AUTO"):
        calls.append((block_mask, kernel))
        return torch.zeros_like(q)

    monkeypatch.setattr(A, "compiled_flex", flash)
    geo = Geometry(77, 16, 16, 8, 4)
    fa4 = BACKENDS["flex-fa4"].run  # on CPU tensors: the call as it would go on a CUDA card
    fa4(*qkv(geo), geo, 0.3)
    ((mask, kernel),) = calls
    assert kernel == "FLASH" and mask.BLOCK_SIZE == (rows, 128) and mask.q_num_blocks is None
    assert mask.seq_lengths == (geo.q_len, geo.kv_len)
    fa4(
        *[t.clone().requires_grad_() for t in qkv(geo)], geo, 0.3
    )  # training: the mask carries the query-block lists
    assert calls[-1][0].q_num_blocks is not None and calls[-1][0].BLOCK_SIZE == (rows, 128)


def test_flex_fa4_refused_by_flash_attn_when_it_runs_is_one_line_naming_the_fix(hopper, monkeypatch):
    """flash_attn.cute checks block sizes and head dims when the kernel first runs, after the compile."""

    def refuses(*args, **kwargs):
        raise ValueError("Block sparse tensors forward have block size 128, which must be a multiple of 256.")

    monkeypatch.setattr(A, "compiled_flex", refuses)
    geo = Geometry(77, 16, 16, 8, 4)
    with pytest.raises(ConfigError, match=r"^the flex-fa4 backend failed on this card \(Block sparse .* of "
                       r"256\.\); use --backend flex$"):  # fmt: skip
        BACKENDS["flex-fa4"].run(*qkv(geo), geo, 0.3)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(A, "compiled_flex", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not flash_attn's: as it is
        BACKENDS["flex-fa4"].run(*qkv(geo), geo, 0.3)


def test_each_flex_kernel_has_its_own_compiled_callable(monkeypatch):
    """flex and flex-fa4 compile apart: "FLASH" is flex_attention with kernel_options BACKEND FLASH."""
    from torch.nn.attention.flex_attention import flex_attention

    built = []
    monkeypatch.setattr(A, "_compiled_flex", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: built.append((fn, kw)) or (lambda *a, **k: a[0]))
    geo = Geometry(7, 12, 20, 4)
    q, k, v = qkv(geo)
    for kernel in ("AUTO", "FLASH", "AUTO", "FLASH"):
        A.compiled_flex(q, k, v, None, 0.3, kernel)
    (auto, auto_kw), (flash, flash_kw) = built
    assert auto is flex_attention and auto_kw == flash_kw == {"dynamic": False, "fullgraph": True}
    assert flash.func is flex_attention and flash.keywords == {"kernel_options": {"BACKEND": "FLASH"}}


def test_flex_fa4_on_this_cpu_machine_is_one_line_naming_the_fix(capsys):
    args = ["a", "--res", "2048", "--variant", "r8", "--backend", "flex-fa4", "--device", "cpu", "--dry-run"]
    code, _, err = run(args, capsys)
    assert "the flex-fa4 backend does not run on cpu (it runs on cuda): use --backend auto" in one_error(
        code, err
    )


# ---------------------------------------------------------------- clear-gen info --backends


def test_info_backends_lists_each_backend_on_one_line(capsys):
    code, out, err = run(["info", "--backends"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "on this machine (cpu" in lines[0]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == ["flex", "gather", "flex-split", "flex-fa4", "dense"]
    assert (
        "cpu: inference and training" in rows["gather"] and "trains on cuda, cpu, mps, xpu" in rows["gather"]
    )
    assert "runs on cuda, cpu, mps, trains on cuda" in rows["flex"]
    assert (
        "not here: the flex-fa4 backend does not run on cpu (it runs on cuda): use --backend auto"
        in (rows["flex-fa4"])
    )


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


def test_bench_attention_keeps_measuring_past_a_backend_that_is_refused_or_fails(monkeypatch):
    """fa4-8k on a machine without flash-attn-4 (here: no CUDA): flex-fa4 a refused row, said why under the
    table, unchecked; a kernel that raises when it runs a failed row; the others measured and checked."""
    from clear_gen.bench import report as R
    from clear_gen.bench import run as bench

    def broken(*args):
        raise RuntimeError("CuTe DSL: no kernel for this card\nlast line of the error")

    monkeypatch.setattr(BACKENDS["dense"], "run", broken)
    kw = dict(heads=2, head_dim=16, repeats=1, device="cpu", window=4, down_factor=1, text_len=128)
    rows = bench("attention", res=[256], backend="flex-fa4,gather,dense", **kw)
    fa4, gather_row, dense = rows
    assert fa4["refused"].startswith("the flex-fa4 backend does not run on cpu (it runs on cuda)")
    assert fa4["clear_ms"] is None and "check_ok" not in fa4
    assert gather_row["clear_ms"] > 0 and gather_row["check_ok"] and gather_row["full_ms"] > 0
    assert dense["failed"] == "RuntimeError: last line of the error" and "check_ok" not in dense
    text = R.table_markdown(rows)
    assert "| flex-fa4 | " in text and "| refused |" in text and "| failed |" in text
    assert "- flex-fa4 at 256 px: refused: the flex-fa4 backend does not run on cpu" in text
    assert "- dense at 256 px: failed: RuntimeError: last line of the error" in text


def test_distill_trains_on_the_cpu_and_mps_with_gather(compilers):
    from clear_gen.distill.student import resolve_train_backend

    assert [resolve_train_backend("auto", d) for d in (CPU, MPS, CUDA)] == ["gather", "gather", "flex"]
