"""clear_gen.bench and `clear-gen bench`: FLOP model against CLEAR_FACTS, plan targets, tiny timed runs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from clear_gen import bench as B
from clear_gen import flops as FL
from clear_gen import geometry as G
from clear_gen import random_flux as RF
from clear_gen.cli import app, main
from clear_gen.errors import ConfigError

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
    (row,) = B.run("plan", res=[8192], window=window)
    assert set(B.ROW_KEYS) <= row.keys() and row["tokens"] == 512 * 512 + 512
    assert row["computed_over_needed"] <= ours_max
    assert row["rowmajor_over_needed"] == pytest.approx(row_major, abs=0.1)
    assert row["computed_density"] == pytest.approx(row["exact_density"] * row["computed_over_needed"])
    assert row["mask_build_ms"] > 0  # the figure for BENCHMARKS.md; not asserted (shared CPU)


# ---------------------------------------------------------------- timed runs, tiny


@pytest.mark.slow  # compiles FlexAttention
def test_attention_runs_and_checks_against_dense():
    rows = B.run("attention", res=[256, 512], heads=2, head_dim=32, repeats=1, device="cpu")
    assert [r["res"] for r in rows] == [256, 512]
    for row in rows:
        assert set(B.ROW_KEYS) <= row.keys()
        assert row["check_ok"] and row["check_res"] == 256
        assert row["clear_ms"] > 0 and row["full_ms"] > 0 and row["speedup"] > 0
        assert row["device"].startswith("cpu") and row["peak_mem_mb"] is None
    assert "attention" in B.markdown(rows) and "cpu" in B.title(rows)


@pytest.mark.slow  # compiles FlexAttention
def test_step_runs_with_a_tiny_flux():
    (row,) = B.run("step", res=[256], heads=2, head_dim=32, layers=2, repeats=1, device="cpu")
    assert set(B.ROW_KEYS) <= row.keys() and row["layers"] == 2
    assert row["check_ok"] and row["check_res"] == 256  # flex vs dense over the whole step
    assert row["clear_ms"] > 0 and row["full_ms"] > 0 and not row["full_estimated"]


@pytest.mark.slow  # compiles FlexAttention
def test_step_guard_estimates_instead_of_running_full():
    kw = dict(heads=2, head_dim=32, layers=2, repeats=1, device="cpu", down_factor=4)
    (row,) = B.run("step", res=[256], max_full_seconds=1e-9, **kw)
    assert row["full_estimated"] and row["full_ms"] > 0 and row["check_ok"]
    (row,) = B.run("step", res=[256], compare_full=False, **kw)
    assert row["full_ms"] is None and row["speedup"] is None


def test_bad_arguments_are_config_errors():
    for kw in ({"what": "nope"}, {"res": [1000]}, {"dtype": "int8"}, {"res": [256], "down_factor": 3}):
        with pytest.raises(ConfigError):
            B.run(**{"what": "plan", **kw})
    with pytest.raises(ConfigError):
        B.variant("r7")


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
