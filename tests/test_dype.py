"""DyPE (--dype): Dy-YaRN's frequencies against a reference written here from the formulas, their limits,
the per-step hook on a tiny transformer, and the command line end to end (record, --from, off = today)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import grid_ids, tiny_inputs, tiny_transformer
from conftest import run_cli as run
from PIL import Image

from clear_gen.core.dype import axis_frequencies, mscale, rotary
from clear_gen.files.record import ImageRecord
from clear_gen.plan.spec import Stage
from clear_gen.run.dype import dynamic_rope

pytestmark = pytest.mark.usefixtures("offline_hub")

FLUX_AXES, THETA, BASE = (16, 56, 56), 10000.0, 64


def reference(dim: int, side: int, t: float, theta: float = THETA, base: int = BASE) -> list[float]:
    """Dy-YaRN pair by pair, from the definitions: turns over the training side, the pair index where a
    number of turns falls, two ramps (interpolation -> NTK-aware at 1.25 -> 0.75 turns, that -> the
    original at 16 -> 2 turns), every bound times t^2."""
    s, k = side / base, t**2

    def where(turns: float) -> float:  # solve base * theta^(-2j/dim) / (2 pi) = turns for j
        if turns == 0:
            return math.inf
        return dim / 2 * math.log(base / (2 * math.pi * turns)) / math.log(theta)

    def weight(i: int, fast: float, slow: float) -> float:  # 1 where pair i turns more than `fast`
        lo = math.floor(min(max(where(fast * k), 0), dim // 2))  # pair indices: 0 .. dim/2
        hi = math.ceil(min(max(where(slow * k), 0), dim // 2))
        if i <= lo:
            return 1.0
        if i >= hi:
            return 0.0
        return (hi - i) / (hi - lo)

    out = []
    for i in range(dim // 2):
        w = theta ** (-2 * i / dim)
        if s <= 1:
            out.append(w)
            continue
        ntk = (theta * s ** (dim / (dim - 2))) ** (-2 * i / dim)
        a = weight(i, 1.25, 0.75)
        first = a * ntk + (1 - a) * w / s
        b = weight(i, 16, 2)
        out.append(b * w + (1 - b) * first)
    return out


@pytest.mark.parametrize("dim", [56, 16, 6])
@pytest.mark.parametrize("side", [65, 96, 128, 256, 512])
@pytest.mark.parametrize("t", [1.0, 0.83, 0.5, 0.2, 0.05])
def test_frequencies_are_the_formulas(dim, side, t):
    np.testing.assert_allclose(
        axis_frequencies(dim, THETA, side, t).numpy(), reference(dim, side, t), rtol=1e-12
    )


@pytest.mark.parametrize("side", [96, 256, 512])
def test_the_limits(side):
    """t -> 0: the original frequencies (plain extrapolation); t = 1: static YaRN, whose fastest pair keeps
    its frequency and slowest is interpolated by s; s <= 1: unchanged at any t."""
    dim, s = 56, side / BASE
    original = THETA ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    for t in (0.0, 1e-6):
        torch.testing.assert_close(axis_frequencies(dim, THETA, side, t), original, rtol=0, atol=0)
    yarn = axis_frequencies(dim, THETA, side, 1.0)
    assert yarn[0] == original[0] and float(yarn[-1]) == pytest.approx(float(original[-1]) / s, rel=1e-12)
    assert bool((yarn <= original).all()) and not torch.equal(yarn, original)
    for small in (64, 40, 1):
        for t in (1.0, 0.5, 0.0):
            torch.testing.assert_close(axis_frequencies(dim, THETA, small, t), original, rtol=0, atol=0)
    steps = [axis_frequencies(dim, THETA, side, t) for t in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)]
    assert all(bool((a <= b + 1e-18).all()) for a, b in zip(steps, steps[1:], strict=False))  # back to w
    assert mscale(side) == pytest.approx(1 + 0.1 * math.log(s)) and mscale(64) == mscale(32) == 1.0


def test_rotary_is_fluxs_rope_at_the_training_size_and_scales_only_the_image_axes():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([torch.zeros(5, 3), grid_ids(48, 64)])  # 5 text tokens, then a 48 x 64 grid
    stock = FluxPosEmbed(int(THETA), list(FLUX_AXES))(ids)  # FLUX.1's
    ours = rotary(ids, FLUX_AXES, THETA, {1: 48, 2: 64}, t=0.7)
    for a, b in zip(ours, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    ids = torch.cat([torch.zeros(5, 3), grid_ids(8, 32)])  # a corner of 1024 x 4096 px: columns at s = 4
    cos, sin = rotary(ids, FLUX_AXES, THETA, {1: 64, 2: 256}, t=0.7)
    stock_cos, stock_sin = FluxPosEmbed(int(THETA), list(FLUX_AXES))(ids)
    torch.testing.assert_close(cos[:, :72], stock_cos[:, :72], rtol=0, atol=1e-6)  # index and rows
    m = mscale(256)
    torch.testing.assert_close(cos[:5, 72:], torch.full((5, 56), m))  # text: position 0, times mscale
    freqs = axis_frequencies(56, THETA, 256, 0.7)
    angles = ids[:, 2:3].double() * freqs  # (S, 28)
    torch.testing.assert_close(sin[:, 72::2], (angles.sin() * m).float(), rtol=0, atol=1e-6)


def test_the_hook_reads_each_calls_sigma_and_leaves_nothing_behind():
    model = tiny_transformer()  # axes (4, 6, 6)
    stage = Stage(2048, 1024, True, 4, 7.5, True, 0.7, dype=True)  # 128 x 64 tokens: rows stay, s = 2
    seen = []
    inputs = tiny_inputs(1, 3, 2, 2)
    with dynamic_rope([model], stage):
        wrapped = model.pos_embed.forward
        for sigma in (0.9, 0.25):
            inputs["timestep"] = torch.full((1,), sigma)
            with torch.no_grad():
                model(**inputs)
            ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
            seen.append(wrapped(ids))
            expected = rotary(ids, (4, 6, 6), THETA, {1: 64, 2: 128}, t=sigma)
            for a, b in zip(seen[-1], expected, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(seen[0][0], seen[1][0])
    assert "forward" not in vars(model.pos_embed) and not model._forward_pre_hooks
    with dynamic_rope([model], Stage(2048, 1024, True, 4, 7.5, True, 0.7)):  # off: nothing wrapped
        assert "forward" not in vars(model.pos_embed) and not model._forward_pre_hooks


# ---------------------------------------------------------------- the command line, the record, --from


def args(tiny: Path, out: Path, *extra: str) -> list[str]:
    """One CLEAR pass at 2048x64 (128 x 4 tokens: columns at s = 2), in bf16."""
    return ["a red castle", "--model", str(tiny), "--out", f"{out}/", "--max-sequence-length", "16",
            "--steps", "2", "--backend", "dense", "--window", "2", "--seed", "4", "--no-compare-full",
            "--json", "--width", "2048", "--height", "64", "--direct", "--dtype", "bf16", *extra]  # fmt: skip


def made(tiny, out, capsys, *extra) -> tuple[Path, ImageRecord, str]:
    code, stdout, err = run(args(tiny, out, *extra), capsys)
    assert code == 0, err
    path = Path(json.loads(stdout.splitlines()[-1])["path"])
    return path, ImageRecord.from_png(path), err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_dype_off_is_todays_image_and_on_is_recorded_and_remade(tiny, tmp_path, capsys):
    plain, record, _ = made(tiny, tmp_path / "a", capsys)
    off, off_record, _ = made(tiny, tmp_path / "b", capsys, "--no-dype")
    np.testing.assert_array_equal(pixels(plain), pixels(off))  # the PNGs differ only by their timings
    assert "dype" not in record.extra and "dype" not in off_record.extra
    dype, record, err = made(tiny, tmp_path / "c", capsys, "--dype", "--ntk-factor", "3")
    assert "2048x64, CLEAR, DyPE, 2 steps" in err
    assert "note: --ntk-factor 3 is not used in DyPE's stages: DyPE sets RoPE's frequencies" in err
    assert record.extra["dype"] is True
    assert np.abs(pixels(dype).astype(int) - pixels(plain)).mean() > 0.5
    code, stdout, err = run(["--from", str(dype), "--out", f"{tmp_path / 'd'}/", "--json"], capsys)
    assert code == 0, err
    again = json.loads(stdout)
    assert again["extra"]["dype"] is True
    np.testing.assert_array_equal(pixels(Path(again["path"])), pixels(dype))


@pytest.mark.parametrize("command", ["upscale", "compare"])
def test_upscale_and_compare_take_dype(tiny, tmp_path, capsys, command):
    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 16)).save(picture)
    common = ["--model", str(tiny), "--max-sequence-length", "16", "--dry-run", "--dype"]
    line = {
        "upscale": ["upscale", str(picture), *common, "--window", "2", "--width", "2048", "--height", "512"],
        "compare": ["compare", "a castle", *common, "--width", "2048", "--height", "512"],
    }[command]
    code, out, err = run(line, capsys)
    assert code == 0, err
    assert "DyPE changes nothing" not in out + err


def test_dype_with_no_stage_to_change_is_a_note(tiny, capsys):
    line = ["a castle", "--model", str(tiny), "--max-sequence-length", "16", "--res", "1024", "--window", "2"]
    code, out, err = run([*line, "--dype", "--dry-run"], capsys)
    assert code == 0, err
    assert "note: --dype: no CLEAR stage above 1024 px, so DyPE changes nothing" in out + err


def test_dype_stages_take_the_place_of_the_ntk_factor_and_of_auto_proportional_attention(tiny):
    from dataclasses import replace

    from clear_gen.plan.parse import parse
    from clear_gen.plan.spec import GenerateOptions

    asked = GenerateOptions(["a"], 2048, 1024, model=str(tiny), window=2, max_sequence_length=16, dype=True)
    first, second = parse(asked).stages
    assert not first.dype and second.dype  # the first pass runs full attention at 1024 px: no DyPE
    assert (second.ntk_factor, second.proportional) == (1.0, False)  # DyPE's RoPE and its mscale instead
    second = parse(replace(asked, ntk_factor=3.0, proportional_attention=True)).stages[1]
    assert (second.dype, second.ntk_factor, second.proportional) == (True, 1.0, True)  # asked: both scale
    second = parse(replace(asked, dype=False)).stages[1]
    assert (second.dype, second.ntk_factor, second.proportional) == (False, 10.0, True)  # today's recipe
