"""clear_gen.bench and `clear-gen bench`: FLOP model against CLEAR_FACTS, plan targets, tiny timed runs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from clear_gen.bench import check as C
from clear_gen.bench import image as BI
from clear_gen.bench import report as R
from clear_gen.bench import run as bench_run
from clear_gen.bench import suite as B
from clear_gen.cli import app, main
from clear_gen.core import flops as FL
from clear_gen.core import geometry as G
from clear_gen.errors import ClearGenError, ConfigError
from clear_gen.models.flux1 import random as RF
from clear_gen.run import measure as M

GEO_8K = G.Geometry(512, 512, 512, 8)


# ---------------------------------------------------------------- FLOP model


def test_flop_model_reproduces_clear_facts():
    flux = FL.FluxShape()
    f = FL.step_flops(flux, GEO_8K, G.build_block_lists(GEO_8K).computed_pairs())
    assert f["linear"] == pytest.approx(3.39e15, rel=0.02)
    assert f["attn_full"] == pytest.approx(48.3e15, rel=0.02)
    assert f["attn_exact"] == pytest.approx(0.22e15, rel=0.02)
    assert f["attn_full"] / flux.layers == pytest.approx(847.73e12, rel=0.02)  # per layer
    assert f["attn_exact"] / flux.layers == pytest.approx(3.92e12, rel=0.02)
    assert FL.speedup_bound(f) == pytest.approx(14, rel=0.05)  # "~14x, not 6.3x"


def test_flux_shape_splits_layers_like_flux():
    assert (RF.flux_shape(24, 128, 57).double, RF.flux_shape(24, 128, 57).single) == (19, 38)
    assert (RF.flux_shape(2, 32, 2).double, RF.flux_shape(2, 32, 2).single) == (1, 1)
    assert RF.rope_axes(128) == (16, 56, 56) and RF.rope_axes(64) == (8, 28, 28)
    with pytest.raises(ConfigError):
        RF.flux_shape(2, 32, 0)


# ---------------------------------------------------------------- plan


def test_row_major_geometry_is_row_major():
    geo = B.row_major(G.Geometry(512, 12, 20, 4))
    assert torch.equal(G.tile_order(geo.height, geo.width, geo.tile), torch.arange(12 * 20))


@pytest.mark.parametrize("window, ours_max, row_major", [(8, 1.8, 4.8), (16, 1.65, 6.0)])
def test_plan_8k_meets_density_targets(window, ours_max, row_major):
    (row,) = bench_run("plan", res=[8192], window=window)
    assert set(B.ROW_KEYS) <= row.keys() and row["tokens"] == 512 * 512 + 512
    assert row["computed_over_needed"] <= ours_max
    assert row["rowmajor_over_needed"] == pytest.approx(row_major, abs=0.1)
    assert row["computed_density"] == pytest.approx(row["exact_density"] * row["computed_over_needed"])
    assert row["mask_build_ms"] > 0  # the figure for BENCHMARKS.md; not asserted (shared CPU)


# ---------------------------------------------------------------- timed runs, tiny


@pytest.mark.slow  # compiles FlexAttention
def test_attention_runs_and_checks_against_dense():
    rows = bench_run("attention", res=[256, 512], heads=2, head_dim=32, repeats=1, device="cpu")
    assert [r["res"] for r in rows] == [256, 512]
    for row in rows:
        assert set(B.ROW_KEYS) <= row.keys()
        assert row["check_ok"] and row["check_res"] == 256 and row["check_split_max_err"] < 1e-4
        assert row["clear_ms"] > 0 and row["full_ms"] > 0 and row["speedup"] > 0
        assert row["image_rows_ms"] > 0 and row["text_rows_ms"] > 0 and row["split_ms"] > 0  # text rows apart
        assert row["device"].startswith("cpu") and row["peak_mem_mb"] >= 0  # resident memory above the start
    assert "attention" in R.table_markdown(rows) and "cpu" in R.title(rows)


@pytest.mark.slow  # compiles FlexAttention
def test_step_runs_with_a_tiny_flux():
    (row,) = bench_run("step", res=[256], heads=2, head_dim=32, layers=2, repeats=1, device="cpu")
    assert set(B.ROW_KEYS) <= row.keys() and row["layers"] == 2
    assert row["check_ok"] and row["check_res"] == 256  # flex vs dense over the whole step
    assert row["clear_ms"] > 0 and row["full_ms"] > 0 and not row["full_estimated"]


@pytest.mark.slow  # compiles FlexAttention
def test_step_guard_estimates_instead_of_running_full():
    kw = dict(heads=2, head_dim=32, layers=2, repeats=1, device="cpu", down_factor=4)
    (row,) = bench_run("step", res=[256], max_full_seconds=1e-9, **kw)
    assert row["full_estimated"] and row["full_ms"] > 0 and row["check_ok"]
    (row,) = bench_run("step", res=[256], compare_full=False, **kw)
    assert row["full_ms"] is None and row["speedup"] is None


def test_bad_arguments_are_config_errors():
    for kw in ({"what": "nope"}, {"res": [1000]}, {"dtype": "int8"}, {"res": [256], "down_factor": 3}):
        with pytest.raises(ConfigError):
            bench_run(**{"what": "plan", **kw})
    with pytest.raises(ConfigError):
        bench_run("plan", variant="r7")


# ---------------------------------------------------------------- CLI


def test_cli_bench_plan_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "rows.json", tmp_path / "rows.md"
    args = ["bench", "--what", "plan", "--res", "1024,2048", "--variant", "r16-down4"]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["res"] for r in rows] == [1024, 2048]
    assert all(set(B.ROW_KEYS) <= r.keys() and (r["window"], r["down_factor"]) == (16, 4) for r in rows)
    assert "| 2048 | 16 | 4 |" in md.read_text()


def test_cli_bench_user_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--variant", "r7"])
    assert e.value.code == 1
    assert "unknown variant 'r7'" in capsys.readouterr().err


def test_bench_defaults_to_generates_variant_and_refuses_a_conflict(capsys):
    (row,) = bench_run("plan", res=[1024])
    assert (row["window"], row["down_factor"]) == (8, 4)  # r8-down4, as clear-gen generate
    (row,) = bench_run("plan", res=[1024], window=16)
    assert (row["window"], row["down_factor"]) == (16, 1)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--variant", "r8", "--window", "4"])
    assert e.value.code == 1 and "conflict" in capsys.readouterr().err


def test_full_size_model_that_cannot_fit_is_refused(monkeypatch):
    monkeypatch.setattr(RF, "free_bytes", lambda device: 10 * 2**30)
    with pytest.raises(ConfigError, match="needs 47.3 GB in float32.*--layers"):
        RF.build_transformer(RF.flux_shape(24, 128, 57), torch.device("cpu"), torch.float32)


@pytest.mark.slow  # compiles FlexAttention at a real 8K grid
def test_step_at_8k_in_bf16_with_tiny_dims():
    rows = bench_run("step", res=[8192], dtype="bf16", device="cpu", heads=2, head_dim=32, layers=1,
                 compare_full=False, repeats=0)  # fmt: skip
    assert rows[0]["tokens"] == 512 * 512 + 512 and rows[0]["clear_ms"] > 0 and rows[0]["dtype"] == "bfloat16"


@pytest.mark.parametrize("f", [1, 2])
def test_image_rows_block_mask_is_the_image_rows_of_clear(f):
    from clear_gen.attention.backends import clear_attention, compiled_flex

    geo = G.Geometry(128, 16, 24, 3, f)
    q, k, v = M.random_qkv(geo, 2, 16, torch.device("cpu"), torch.float32)
    assert q.stride() != q.contiguous().stride()  # the model's (B, L, H, D).transpose(1, 2) layout
    whole = clear_attention(q, k, v, geo, 0.25, "dense")
    rows = compiled_flex(q[:, :, 128:], k, v, G.image_rows_block_mask(geo, "cpu"), 0.25)
    torch.testing.assert_close(rows, whole[:, :, 128:], rtol=1e-5, atol=1e-5)


def test_report_keeps_the_latest_row_and_every_part_status(tmp_path):
    rows, md = tmp_path / "rows.jsonl", tmp_path / "bench.md"
    (plan,) = bench_run("plan", res=[1024], window=8)
    R.append(rows, {"part": "a", "status": "running"})
    R.append(rows, {**plan, "part": "a", "mask_build_ms": 111.0})
    R.append(rows, {**plan, "part": "a", "mask_build_ms": 222.0})  # the same row again: replaces it
    R.append(rows, {"part": "a", "status": "done"})
    R.append(rows, {"part": "b", "status": "skipped: 3 s of the budget left"})
    with rows.open("a") as f:
        f.write('{"part": "c", "what": "st')  # torn by a kill
    R.write(rows, md)
    text = md.read_text()
    assert "| a | done |" in text and "| b | skipped: 3 s of the budget left |" in text
    assert "| 222 / " in text and "| 111 / " not in text


def test_report_takes_full_attention_from_another_part():
    base = dict(what="step", res=2048, tokens=16896, layers=57, heads=24, head_dim=128, dtype="bfloat16")
    base.update(device="gpu", window=8, computed_density=0.1, peak_mem_mb=None)
    clear = {**base, "part": "clear", "down_factor": 4, "clear_ms": 100.0, "full_ms": None, "speedup": None}
    full = {**base, "part": "full", "down_factor": 4, "clear_ms": None, "full_ms": 500.0, "speedup": None}
    r8 = {**clear, "part": "r8", "down_factor": 1, "clear_ms": 50.0}
    text = R.markdown([clear, full, r8], {})
    assert "5.00x" in text and "10.00x" in text and "measured at the same size in part full" in text


@pytest.mark.slow  # runs the script: several processes, each importing torch and compiling (~2 minutes)
def test_gpu_bench_smoke_brings_back_three_files_a_summary_and_a_killed_part(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "BUDGET": "400"}
    env.update(
        PARTS="env,check,step-8k,step-8k-r8,image-8k,fp8dq-8k,fa4-8k,plan,vae-8k", PART_LIMITS="step-8k-r8=1"
    )
    done = subprocess.run(["bash", str(root / "scripts/gpu_bench.sh")], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["bench.log", "bench.md", "rows.jsonl"]  # the limit (the device tool returns 8)
    text = (tmp_path / "bench.md").read_text()
    head = text.split("\n\n")[0].splitlines()  # the summary: up to the first blank line
    assert len(head) <= R.SUMMARY_LINES and head[0] == "# clear-gen GPU bench (scripts/gpu_bench.sh)"
    assert head[1].startswith("- card: cpu") and head[2].startswith("- software: torch ")
    assert head[3].startswith("- correctness (CLEAR's kernel, bfloat16 vs the dense reference")
    assert ": pass, max |err| " in head[3]
    assert "step-8k-r8: killed: cap of 1 s reached" in head[4]  # r = 8's step: not measured
    composed = r"- 512 px step, 2 blocks, CLEAR r=8 f=4: .* s; full attention .* s \(composed\): .*x"
    assert re.match(composed, head[5])
    assert head[6].startswith("- 512x512 image (full + CLEAR r=8 f=4, 4 steps at 512 px): ")
    assert head[7].startswith("- the same image at the recipe's 20 steps a stage: ")
    assert head[8].startswith("- parts: env done, check done, step-8k done, step-8k-r8 killed, image-8k done")
    assert "| step-8k-r8 | killed: cap of 1 s reached" in text
    assert "| compile-8k | not selected (PARTS) |" in text
    assert "## check" in text and "| 512 | 8 | 4 | 1536 | all |" in text and "## plan" in text
    assert "## fp8dq-8k" in text and "--quantize int8 --compile (plain: the same step before)" in text
    assert "| image-8k | done |" in text and "| all | 512x512 |" in text
    assert (
        "| fa4-8k | done |" in text
    )  # FlashAttention-4 refused on a CPU, said why; flex and gather measured
    assert "- flex-fa4 at 512 px: refused: the flex-fa4 backend does not run on cpu (it runs on cuda)" in text
    fa4 = text.split("## fa4-8k")[1].split("\n## ")[0]
    assert "| flex | " in fa4 and "| gather | " in fa4 and fa4.count("| pass ") == 2
    assert "| vae-8k | done |" in text and "## vae-8k" in text and "exact VAE tiling on cpu" in text
    assert re.search(r"\| decode \| 128 \| exact \| 64 \| .* levels \| .* levels \|", text)  # vs untiled, f32


def test_the_vae_part_measures_exact_tiles_against_untiled_and_the_plan(tmp_path):
    """bench/vae.py on the CPU, small: a row per call in the plan's order, exact tiles at rounding distance
    from the untiled call (float32), each beside the plan's model; the report's table; an OOM row."""
    from clear_gen.bench.vae import rows

    made = list(rows("cpu", torch.float32, channels=8, big=192, small=128, tile=64))
    assert [(r["op"], r["res"], r["tiling"]) for r in made] == [
        ("decode", 128, "off"), ("decode", 128, "exact"), ("encode", 128, "off"), ("encode", 128, "exact"),
        ("decode", 192, "exact"),
    ]  # fmt: skip
    assert all(r["seconds"] > 0 and r["model_gb"] > 0 and r["error"] is None for r in made)
    decode, encode = made[1], made[3]  # exact, after the untiled call at the same size
    assert decode["err_max"] < 0.01 and encode["err_max"] < 1e-4  # levels of 255; latent units
    assert decode["ref_err_max"] < 0.01 and made[0]["ref_err_max"] == 0  # float32 is its own truth
    assert made[4]["err_max"] is None and made[4]["ref_err_max"] is None  # the big size: no untiled call
    oom = {**made[4], "seconds": None, "peak_gb": None, "error": "out of memory: CUDA out of memory."}
    text = R.table_markdown([*made, oom])
    assert text.startswith("exact VAE tiling on cpu") and "8 channels, float32" in text
    assert (
        "| op | px | tiling | tile px | s | peak GB | plan GB | peak / plan | vs untiled | vs float32 |"
        in text
    )
    assert re.search(r"\| decode \| 128 \| exact \| 64 \| [0-9.]+ \| .* levels \|", text)
    assert "| decode | 192 | exact | 64 | failed: out of memory: CUDA out of memory. | - |" in text
    for row in made:  # as the part writes them: every call keeps its own row
        R.append(tmp_path / "rows.jsonl", {**row, "part": "vae-8k"})
    assert len(R.read(tmp_path / "rows.jsonl")[0]) == 5


def test_summary_puts_a_failed_check_first_and_fits_in_ten_lines():
    env = dict(what="env", part="env", device="NVIDIA H200", torch="2.11.0+cu130", cuda="13.0",
               python="3.12.3", triton="3.6.0", diffusers="0.42.1", torchao="0.18.0", transformers="5.17.0",
               capability="9.0", free_gb=140.0, total_gb=150.0)  # fmt: skip
    check = dict(what="check", part="check", res=4096, window=8, down_factor=4, dtype="bfloat16",
                 check_res=4096, check_max_err=0.5, check_ok=False, check_rows=1024)  # fmt: skip
    step = dict(what="step", part="step-8k-r8", res=8192, window=8, down_factor=1, layers=57,
                clear_ms=9890.0, full_ms=94500.0, full_composed=True, speedup=9.555,
                peak_mem_mb=46.2 * 1024)  # fmt: skip
    lines = R.summary([env, check, step], {"env": "done", "check": "done", "image-8k": "skipped: 20 s left"},
                      "GPU bench")  # fmt: skip
    assert len(lines) <= R.SUMMARY_LINES
    assert lines[0].startswith("**CHECK FAILED**") and "5.0e-01 @4096 px r=8 f=4 (1024 rows)" in lines[0]
    assert lines[1] == "# GPU bench"
    assert lines[2] == "- card: NVIDIA H200, 150.0 GB (140.0 GB free), compute capability 9.0"
    assert "torch 2.11.0+cu130 (CUDA 13.0), triton 3.6.0, diffusers 0.42.1" in lines[3]
    assert ": FAIL, max |err| 5.0e-01" in lines[4]
    composed = "full attention 94.5 s (composed): 9.55x; peak 46.2 GB"
    assert lines[5] == f"- 8192 px step, 57 blocks, CLEAR r=8: 9.89 s; {composed}"
    assert lines[6] == "- step, CLEAR r=8 f=4: not measured"
    assert lines[7] == "- whole image: not measured (image-8k: skipped: 20 s left)"
    lines = R.summary([env, step], {"check": "failed: exit 1 (see bench.log)"}, "GPU bench")
    assert lines[0] == "**CHECK DID NOT FINISH**: failed: exit 1 (see bench.log)" and len(lines) <= 10


def test_env_row_names_what_ran():
    (row,) = bench_run("env", device="cpu")
    assert row["what"] == "env" and row["device"].startswith("cpu") and row["torch"] == torch.__version__
    assert row["diffusers"] and row["python"] and row["free_gb"] is None  # no GPU here
    assert "| cpu" in R.table_markdown([row])


def test_check_rows_are_sampled_where_the_dense_reference_would_not_fit(monkeypatch):
    from clear_gen.attention.backends import clear_attention

    geo = G.image_geometry(512, 32, 32, 8, 4)
    assert C.check_rows(geo).tolist() == list(range(geo.q_len))  # fits: every row
    monkeypatch.setattr(C, "DENSE_MAX_ELEMENTS", 1000)
    rows = C.check_rows(geo)
    starts = (0, 512, (512 + geo.q_len) // 2, geo.q_len - C.CHECK_ROWS)
    assert rows.tolist() == sorted({s + i for s in starts for i in range(C.CHECK_ROWS)})
    q, k, v = M.random_qkv(geo, 2, 16, torch.device("cpu"), torch.float32)
    whole = C.reference_rows(q, k, v, geo, 0.25, torch.arange(geo.q_len))
    torch.testing.assert_close(C.reference_rows(q, k, v, geo, 0.25, rows), whole[:, :, rows])
    monkeypatch.undo()
    torch.testing.assert_close(whole, clear_attention(q, k, v, geo, 0.25, "dense"))  # the dense backend's


@pytest.mark.slow  # compiles FlexAttention
def test_check_part_compares_flex_with_sampled_reference_rows(monkeypatch):
    monkeypatch.setattr(C, "DENSE_MAX_ELEMENTS", 1 << 20)  # 256 px fits, 512 px no: sampled rows
    rows = bench_run("check", res=[256, 512], heads=2, head_dim=32, device="cpu", dtype="bf16")
    checked = [(r["res"], r["check_rows"], r["check_ok"]) for r in rows]
    assert checked == [(256, "all", True), (512, 1024, True)]
    assert all(r["check_max_err"] < r["check_tol"] == C.CHECK_ATOL[torch.bfloat16] for r in rows)


@pytest.mark.slow  # compiles FlexAttention
def test_step_composed_from_timed_attention_ops_never_runs_the_stock_step(monkeypatch):
    ops = []
    monkeypatch.setattr(B, "attention_ops_ms", lambda *args: ops.append(args) or (30.0, 10.0))
    (row,) = bench_run("step", res=[256], heads=2, head_dim=32, layers=2, repeats=1, device="cpu",
                       measure="composed", window=8, down_factor=1)  # fmt: skip
    assert len(ops) == 1 and row["full_composed"] and not row["full_estimated"]
    assert (row["stock_op_ms"], row["clear_op_ms"]) == (30.0, 10.0)
    assert row["full_ms"] == pytest.approx(row["clear_ms"] + 2 * 20.0)
    assert row["rest_ms"] == pytest.approx(row["clear_ms"] - 2 * 10.0)
    assert row["speedup"] == pytest.approx(row["full_ms"] / row["clear_ms"])
    assert "(composed)" in R.table_markdown([row])


@pytest.mark.slow  # compiles FlexAttention
def test_step_quantized_times_the_plain_step_first():
    (row,) = bench_run("step", res=[256], heads=2, head_dim=32, layers=2, repeats=1, device="cpu",
                       measure="clear", quantize="int8")  # fmt: skip
    assert row["quantize"] == "int8" and not row["compile"] and row["plain_ms"] > 0 and row["clear_ms"] > 0
    assert row["check_ok"]  # the quantized step against the dense backend, both quantized
    assert "(plain " in R.table_markdown([row]) and "--quantize int8" in R.title([row])


@pytest.mark.parametrize(
    "kw, message",
    [({"quantize": "nf4"}, "nf4 quantizes while loading"), ({"quantize": "fp8dq"}, "needs a CUDA GPU"),
     ({"compile": True, "res": [256, 512]}, "one --res"), ({"measure": "sideways"}, "unknown measure"),
     ({"what": "attention", "quantize": "int8"}, "--quantize is an option of --what image or step")],
)  # fmt: skip
def test_step_speed_options_are_checked_before_any_work(kw, message, monkeypatch):
    monkeypatch.setattr(B, "build_transformer", lambda *a: pytest.fail("built"))
    kw = {"what": "step", "res": [256], "heads": 2, "head_dim": 32, "layers": 2, "device": "cpu", **kw}
    with pytest.raises(ClearGenError, match=message):
        bench_run(**kw)


def test_measure_composed_is_one_gpus_step(monkeypatch):
    from clear_gen.core import launch

    monkeypatch.setattr(launch, "launched", lambda: True)
    with pytest.raises(ConfigError, match="without torchrun"):
        bench_run("step", res=[256], device="cpu", measure="composed")


# ---------------------------------------------------------------- a whole image (--what image)

TINY_IMAGE = dict(heads=2, head_dim=32, layers=2, vae_channels=8, device="cpu", steps=2)


@pytest.mark.slow  # a whole (tiny) image: first pass, SDEdit stage with CLEAR, decode, save
def test_image_rows_have_every_field_and_add_up_to_the_wall_time():
    import time

    t0 = time.perf_counter()
    rows = bench_run("image", res=[256], stages=[128, 256], **TINY_IMAGE)
    wall = time.perf_counter() - t0
    assert [r["stage"] for r in rows] == [1, 2, "all"]
    for row in rows:
        assert set(BI.IMAGE_KEYS) <= row.keys() and row["what"] == "image" and row["device"].startswith("cpu")
    first, clear, total = rows
    assert (first["res"], first["attention"], first["steps"]) == (128, "full", 2)
    assert (clear["res"], clear["attention"], clear["tokens"]) == (256, "CLEAR r=8 f=4", 512 + 16 * 16)
    assert clear["full_step_s"] > 0 and clear["decode_s"] > 0 and clear["compile_s"] >= 0
    assert total["steps"] == first["steps"] + clear["steps"] and total["block_evals"] == 0
    assert total["total_s"] == pytest.approx(wall, rel=0.05)
    parts = total["total_s"] - total["other_s"]  # every timed part: build, load, encode, stages, ...
    assert parts == pytest.approx(wall, rel=0.05)
    # the recipe's 20 steps a stage (20 at the first pass, 14 at strength 0.7), at each stage's s/step
    extra = (20 - 2) * first["step_s"] + (14 - clear["steps"]) * clear["step_s"]
    assert total["recipe_steps"] == 20 and total["recipe_image_s"] == pytest.approx(total["image_s"] + extra)
    assert parts == pytest.approx(total["build_s"] + total["load_s"] + total["encode_s"] + total["compare_s"]
                                  + total["save_s"] + first["total_s"] + clear["total_s"])  # fmt: skip
    text = R.table_markdown(rows)
    assert "| all | 256x256 | full + CLEAR r=8 f=4 | 4 |" in text and "The whole image:" in text
    assert "tiny random text encoders" in R.title(rows)


@pytest.mark.slow  # a whole (tiny) image
def test_cli_bench_image_with_a_cache_writes_json(tmp_path):
    out = tmp_path / "rows.json"
    args = ["bench", "--what", "image", "--res", "128", "--heads", "2", "--head-dim", "32", "--layers", "2",
            "--vae-channels", "8", "--device", "cpu", "--steps", "4", "--cache", "taylorseer:2"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--no-compare-full", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    (stage,) = [r for r in rows if r["stage"] != "all"]
    assert stage["cache"] == "taylorseer:2" and stage["full_step_s"] is None
    # 2 blocks, 4 steps: the first 3 computed (warm-up), the 4th predicted (taylorseer:2)
    assert (stage["block_evals"], stage["blocks_skipped"]) == (2 * 3, 2 * 1)
    assert "2/8" in result.output and "The whole image" in result.output


@pytest.mark.parametrize(
    "args, message",
    [(["--what", "step", "--stages", "512,1024"], "--stages is an option of --what image only"),
     (["--what", "image", "--res", "512,1024"], "one --res"),
     (["--what", "image", "--res", "512", "--cache", "fbc:0"], "--cache fbc:T"),
     (["--what", "image", "--res", "512", "--vae-channels", "12", "--layers", "1"], "--vae-channels")],
)  # fmt: skip
def test_cli_bench_image_user_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", *args])
    assert e.value.code == 1 and message in capsys.readouterr().err


def test_report_fills_an_image_stage_from_a_measured_full_step():
    base = dict(what="image", window=8, down_factor=4, layers=57, heads=24, head_dim=128, dtype="bfloat16",
                device="gpu", compile=False, cache="none", vae_channels=128, text_len=512)  # fmt: skip
    stage = lambda i, res, att, step, full, est: {  # noqa: E731
        **base, "part": "image-8k", "stage": i, "res": res, "width": res, "height": res, "attention": att,
        "tokens": 512 + (res // 16) ** 2, "steps": 10, "step_s": step, "compile_s": 1.0, "decode_s": 2.0,
        "total_s": 10 * step + 3.0, "full_step_s": full, "full_estimated": est, "speedup": None,
        "peak_mem_mb": 40960.0,
    }  # fmt: skip
    rows = [stage(1, 1024, "full", 0.5, 0.5, False), stage(2, 8192, "CLEAR r=8 f=4", 10.0, 60.0, True)]
    rows.append({**stage("all", 8192, "full + CLEAR r=8 f=4", 1.0, None, True), "step_s": None,
                 "image_s": 120.0, "full_image_s": 620.0, "speedup": 620 / 120, "total_s": 130.0,
                 "build_s": 10.0})  # fmt: skip
    full = {**base, "what": "step", "part": "full-8k", "res": 8192, "tokens": 512 + 512**2, "full_ms": 90e3,
            "clear_ms": None, "full_estimated": False, "computed_density": 0.07, "speedup": None,
            "peak_mem_mb": None}  # fmt: skip
    text = R.markdown([*rows, full], {})
    assert rows[1]["full_step_s"] == 90.0 and rows[1]["speedup"] == 9.0 and rows[1]["full_from"] == "full-8k"
    assert rows[2]["full_image_s"] == 120.0 + 10 * 80.0 and not rows[2]["full_estimated"]
    cells = "| 2 | 8192x8192 | CLEAR r=8 f=4 | 10 | 10.00 | 1.0 | 2.0 | "  # then the VAE tiles: not said
    cells += "- | 103.0 | 90.00 | 9.00x | 40.0 | - |"
    assert cells in text
    assert "the same stages with full attention: 920.0 s." in text


@pytest.mark.parametrize("speed", [{"quantize": "fp8dq"}, {"compile": True}])
def test_report_keys_the_stock_step_by_quantization_and_compilation(speed):
    base = dict(what="image", window=8, down_factor=1, layers=57, heads=24, head_dim=128, dtype="bfloat16",
                device="gpu", cache="none", vae_channels=128, text_len=512, part="image-8k-fast", stage=2,
                res=8192, width=8192, height=8192, attention="CLEAR r=8 f=1", tokens=512 + 512**2, steps=10,
                step_s=5.0, compile_s=1.0, decode_s=2.0, total_s=53.0, full_step_s=60.0, full_estimated=True,
                speedup=12.0, peak_mem_mb=None, compile=False, quantize="none")  # fmt: skip
    fast = {**base, **speed}
    stock = dict(what="step", part="full-8k", res=8192, tokens=512 + 512**2, layers=57, heads=24,
                 head_dim=128, dtype="bfloat16", device="gpu", window=8, down_factor=4, full_ms=90e3,
                 clear_ms=None, full_estimated=False, computed_density=0.07, speedup=None)  # fmt: skip
    R.fill_full_from_other_rows([fast, stock])
    assert fast["full_estimated"] and fast["full_step_s"] == 60.0  # not the bf16 eager stock step's 90 s
    R.fill_full_from_other_rows([fast, {**stock, **speed}])
    assert fast["full_step_s"] == 90.0 and fast["speedup"] == 18.0  # the stock step made the same way


@pytest.mark.slow  # a whole (tiny) image
def test_bench_image_quantizes_the_built_transformer_as_loading_would():
    rows = bench_run("image", res=[128], quantize="int8", compare_full=False, **TINY_IMAGE)
    assert all(r["quantize"] == "int8" for r in rows) and rows[-1]["stage"] == "all"
    with pytest.raises(ClearGenError, match="nf4"):  # on a CPU: CUDA only; on a GPU: only while loading
        bench_run("image", res=[128], quantize="nf4", **TINY_IMAGE)


# ---------------------------------------------------------------- what a GPU session pays for


def test_full_guard_times_a_slow_stock_call_once_and_a_quick_one_after_a_warm_up():
    calls = []
    fn = lambda: calls.append(1)  # noqa: E731
    guard = B.FullGuard(enabled=True, max_seconds=None)
    row = guard.measure(fn, 1e12, clear_ms=2e3, ratio=10.0, device=torch.device("cpu"), repeats=3)
    assert len(calls) == 1 and row["full_repeats"] == 0  # estimated 20 s: one call, no warm-up
    calls.clear()
    guard = B.FullGuard(enabled=True, max_seconds=None)
    row = guard.measure(fn, 1e12, clear_ms=1.0, ratio=10.0, device=torch.device("cpu"), repeats=3)
    assert len(calls) == 4 and row["full_repeats"] == 3  # a warm-up and the median of 3


def test_reset_peak_memory_releases_cached_blocks_before_the_reset(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append("reset"))
    M.reset_peak_memory(torch.device("cpu"))
    assert calls == []
    M.reset_peak_memory(torch.device("cuda"))
    assert calls == ["empty_cache", "reset"]  # else peak reserved starts from the stock step's cached blocks


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bench_runs_its_kernels_under_no_grad_as_generate_does(monkeypatch):
    """Under inference_mode the compiled kernels differ from generate's (and on the CPU were 4x slower)."""
    from torch.nn.attention.flex_attention import flex_attention

    from clear_gen.attention import backends

    modes = []

    def eager_flex(q, k, v, block_mask, scale):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)

    monkeypatch.setattr(backends, "compiled_flex", eager_flex)
    bench_run("attention", res=[256], heads=2, head_dim=32, repeats=0, device="cpu")
    assert modes and set(modes) == {(False, False)}
