"""`clear-gen compare` on a tiny FLUX pipeline (CPU, no network), and its metrics and grid on their own."""

from __future__ import annotations

import importlib.machinery
import json
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from PIL import Image
from safetensors.torch import save_file

from clear_gen.files.record import ImageRecord
from clear_gen.plan.spec import GenerateOptions
from clear_gen.run import compare

pytestmark = pytest.mark.usefixtures("offline_hub")

CHECKPOINT = "clear_local_8.safetensors"  # a published file name: --variant PATH reads r = 8, f = 1 from it


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """The same random CLEAR checkpoint for the tiny model, in two folders under the published name."""
    from diffusers import FluxTransformer2DModel

    from clear_gen.attention.weights import expected_checkpoint

    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in expected_checkpoint(model, 1).items()}
    root = tmp_path_factory.mktemp("clear")
    paths = root / "a" / CHECKPOINT, root / "b" / CHECKPOINT
    for path in paths:
        path.parent.mkdir()
        save_file(sd, str(path))
    return paths


def recipe(tiny: Path) -> list[str]:
    return ["--model", str(tiny), "--res", "128", "--steps", "2", "--max-sequence-length", "16"]


def strict_rows(stdout: str) -> list[dict]:
    """One JSON object a line, refusing Infinity and NaN as a strict parser does."""

    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in stdout.splitlines()]


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


@pytest.mark.slow
def test_compare_writes_each_variant_a_grid_and_strict_json(tiny, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    variants = f"none,{checkpoints[0]}"
    code, stdout, err = run(
        ["compare", "a red castle", *recipe(tiny), "--variants", variants, "--seed", "7", "--out", str(out)]
        + ["--backend", "dense", "--json"],
        capsys,
    )
    assert code == 0, err
    ref, clear = strict_rows(stdout)
    # The reference: full attention, identical to itself.
    assert (ref["variant"], ref["reference"], ref["identical"], ref["psnr"], ref["ssim"]) == (
        "none",
        True,
        True,
        None,
        1.0,
    )
    # The CLEAR variant differs: finite PSNR (the one computed here from the PNGs) and SSIM below 1.
    assert (clear["variant"], clear["attention"], clear["reference"], clear["identical"]) == (
        str(checkpoints[0]),
        "r8",
        False,
        False,
    )
    assert clear["psnr"] == pytest.approx(psnr(pixels(ref["path"]), pixels(clear["path"])), rel=1e-6)
    assert 0 < clear["ssim"] < 1 and clear["lpips"] is None
    # Each variant's PNG carries its own record; the grid holds both panels and their labels.
    records = [ImageRecord.from_png(row["path"]) for row in (ref, clear)]
    assert [(r.variant, r.window, r.seed, r.width) for r in records] == [
        ("none", None, 7, 128),
        ("r8", 8, 7, 128),
    ]
    assert ref["grid"] == clear["grid"] and Path(ref["grid"]).parent == out.resolve()
    grid = Image.open(ref["grid"])
    assert grid.width > 2 * 128 and grid.height > 128
    np.testing.assert_array_equal(np.asarray(grid.convert("RGB"))[:128, :128], pixels(ref["path"]))
    assert ImageRecord.from_png(ref["grid"]).extra["compare"]["variants"] == ["none", str(checkpoints[0])]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        Path(p).name for p in (ref["path"], clear["path"], ref["grid"])
    )
    # Stderr: the full-attention cost up front, the table, and why there is no LPIPS.
    assert "full attention (none) at 128x128" in err and "FLOP model" in err
    assert "PSNR dB" in err and "SSIM" in err and "LPIPS skipped" in err


@pytest.mark.slow
def test_compare_runs_what_generate_runs(tiny, checkpoints, tmp_path, capsys, monkeypatch):
    """Same prompt, seed and recipe: each compare image is the one `generate --variant` makes, though
    compare loads the pipeline once (the CLEAR variant first: full attention then runs on the pipeline
    CLEAR was applied to and removed from)."""
    import clear_gen.run.generate as P

    loads, real = [], P.load_pipeline
    monkeypatch.setattr(P, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    args = [*recipe(tiny), "--seed", "3", "--backend", "dense"]
    code, stdout, err = run(
        ["compare", "a tower", *args, "--variants", f"{checkpoints[0]},none", "--out", str(tmp_path / "c")]
        + ["--json"],
        capsys,
    )
    assert code == 0, err
    assert len(loads) == 1
    rows = strict_rows(stdout)
    for row in rows:
        code, out, err = run(
            ["a tower", *args, "--variant", row["variant"], "--out", f"{tmp_path / 'g'}/", "--json"], capsys
        )
        assert code == 0, err
        np.testing.assert_array_equal(pixels(json.loads(out)["path"]), pixels(row["path"]))


@pytest.mark.slow
def test_identical_variants_give_null_psnr_and_ssim_one(tiny, checkpoints, tmp_path, capsys):
    """Two copies of one checkpoint, no `none`: the first is the reference, the second is identical to it."""
    opts = GenerateOptions(
        prompts=["a bridge"], model=str(tiny), width=128, height=128, steps=2, max_sequence_length=16,
        seeds=[5], out=str(tmp_path), backend="dense", compare_full=False,
    )  # fmt: skip
    plan = compare.prepare(opts, [str(p) for p in checkpoints])
    assert plan.reference == 0 and compare.full_attention_cost(plan) is None  # no none: nothing to warn of
    result = compare.run(plan)
    first, second = result.rows
    assert first.reference and not second.reference
    assert (second.identical, second.psnr, second.ssim) == (True, None, 1.0)
    assert first.image.path != second.image.path  # same file name, never overwritten
    np.testing.assert_array_equal(pixels(first.image.path), pixels(second.image.path))
    rows = strict_rows("\n".join(json.dumps(r) for r in result.to_json()))
    assert [(r["identical"], r["psnr"], r["ssim"]) for r in rows] == [(True, None, 1.0), (True, None, 1.0)]
    assert compare.panel_lines(second)[-1] == "identical to the reference"


@pytest.mark.slow
@pytest.mark.parametrize(
    "variants, message",
    [
        ("none", "compare needs two variants or more; e.g. --variants none,r8-down4"),
        ("none,none", "--variants lists none twice"),
        ("{a},{a_again}", "twice"),
        ("none,r7", "unknown variant 'r7'"),
        ("none,{other}", "not a published CLEAR file name"),
        ("none,missing/clear_local_8.safetensors", "no such file"),
        ("none,,r8", "empty name"),
        ("none,r8-down4 --res 96", "not a multiple of 64"),
        ("none,r8", "clear-gen download r8"),  # not cached, offline: refused before `none` runs
        ("none,{a} --out x.png", "give a directory"),
    ],
)
def test_user_errors_are_one_line(tiny, checkpoints, tmp_path, capsys, variants, message):
    other = tmp_path / "mine.safetensors"
    shutil.copy(checkpoints[0], other)
    a_again = checkpoints[0].parent / ".." / checkpoints[0].parent.name / CHECKPOINT
    text = variants.format(a=checkpoints[0], a_again=a_again, other=other)
    names, *extra = text.split(" ", 1)
    args = ["compare", "a castle", *recipe(tiny), "--out", str(tmp_path / "out"), "--variants", names]
    code, out, err = run(args + (extra[0].split() if extra else []), capsys)
    assert code == 1, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.rglob("*.png")) == []


def test_similarity_of_identical_and_different_images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert compare.similarity(a, a.copy()) == (True, None, 1.0)
    b = a.copy()
    b[10:20, 10:20] = 0
    identical, value, ssim = compare.similarity(a, b)
    assert not identical and value == pytest.approx(psnr(a, b)) and 0 < ssim < 1


def test_grid_scales_large_panels_and_cuts_long_labels(monkeypatch):
    monkeypatch.setattr(compare, "GRID_PANEL_SIDE", 100)
    panels = [Image.new("RGB", (200, 100), c) for c in ((255, 0, 0), (0, 0, 255))]
    grid = compare.grid_image(panels, [["none", "1.00 s/step"], ["a very long label " * 20, "x"]])
    gap = max(2, 100 // 128)
    assert grid.width == 2 * 100 + gap and grid.height > 50
    rgb = np.asarray(grid)
    assert tuple(rgb[25, 50]) == (255, 0, 0) and tuple(rgb[25, 100 + gap + 50]) == (0, 0, 255)
    assert tuple(rgb[25, 100 + gap // 2]) == (16, 16, 16)  # the gap between panels


def test_lpips_is_skipped_without_local_weights_and_used_with_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    fake = types.ModuleType("lpips")
    fake.__spec__ = importlib.machinery.ModuleSpec("lpips", None)

    class LPIPS(torch.nn.Module):  # mean absolute difference, on the inputs lpips gets
        def __init__(self, net: str, verbose: bool):
            super().__init__()

        def forward(self, a, b):
            assert a.shape[:2] == (1, 3) and -1 <= a.min() and a.max() <= 1
            return (a - b).abs().mean()

    fake.LPIPS = LPIPS
    monkeypatch.setitem(sys.modules, "lpips", fake)
    score, note = compare.lpips_metric()
    assert score is None and "no local AlexNet weights" in note
    weights = tmp_path / "hub" / "checkpoints" / compare.ALEXNET_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    score, note = compare.lpips_metric()
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    assert "AlexNet" in note and score(a, a) == 0.0 and score(a, a + 255) == pytest.approx(2.0)
