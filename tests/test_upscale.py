"""`clear-gen upscale IMAGE`: any picture to a larger size by generate's own SDEdit stages (tiny pipeline)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as run
from PIL import Image

from clear_gen.files.record import ImageRecord

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline_hub")]


def recipe(tiny: Path, out: Path) -> list[str]:
    args = ["--model", str(tiny), "--out", f"{out}/", "--max-sequence-length", "16", "--steps", "2"]
    return [*args, "--backend", "dense", "--window", "2", "--seed", "4"]


def picture(path: Path, w: int = 96, h: int = 64, **save) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, **save)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def one_error_line(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error:"), err
    return lines[-1]


def test_upscale_equals_generates_own_sdedit_stage_bit_for_bit(tiny, tmp_path, capsys):
    """One code path: the kept first pass of a generate run, upscaled with the same seed and settings."""
    gen = tmp_path / "gen"
    args = ["a red castle", "--model", str(tiny), "--out", f"{gen}/", "--max-sequence-length", "16"]
    args += ["--steps", "2", "--first-steps", "2", "--backend", "dense", "--window", "2", "--seed", "4"]
    code, out, err = run([*args, "--width", "256", "--height", "128", "--upscale-from", "128",
                          "--keep-stages", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    row = json.loads(out)
    first, final = Path(row["stage_paths"][0]), Path(row["path"])
    code, out, err = run(
        ["upscale", str(first), *recipe(tiny, tmp_path / "up"), "--res", "256", "--json"], capsys
    )
    assert code == 0, err
    upscaled = json.loads(out)
    assert "prompt from its clear-gen metadata: 'a red castle'" in err
    np.testing.assert_array_equal(pixels(upscaled["path"]), pixels(final))
    record = ImageRecord.from_png(upscaled["path"])
    assert record.prompt == "a red castle" and record.stages == [256] and record.strength == 0.7
    assert record.extra["source"] == {
        "file": first.name,
        "sha256": hashlib.sha256(first.read_bytes()).hexdigest(),
        "width": 128,
        "height": 64,
    }
    code, _, err = run(["--from", upscaled["path"], "--out", f"{tmp_path}/again/"], capsys)
    assert "clear-gen upscale " + first.name in one_error_line(code, err)  # not a text-to-image re-run


def test_jpeg_without_prompt_png_with_one_scale_and_stages(tiny, tmp_path, capsys):
    jpeg = picture(tmp_path / "photo.jpg", 100, 70, quality=90)
    code, out, err = run(
        ["upscale", str(jpeg), *recipe(tiny, tmp_path / "a"), "--scale", "2", "--json"], capsys
    )
    assert code == 0, err
    row = json.loads(out)
    assert "no prompt given or found" in err and "multiples of 16 px" in err
    w, h = Image.open(row["path"]).size
    assert (w % 16, h % 16) == (0, 0) and abs(w / h - 100 / 70) < 16 / h  # the ratio, within rounding
    png = picture(tmp_path / "render.png", 128, 64)
    code, out, err = run(["upscale", str(png), "a harbour at dusk", *recipe(tiny, tmp_path / "b"),
                          "--stages", "192,256", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    row = json.loads(out)
    assert row["prompt"] == "a harbour at dusk" and row["stages"] == [192, 256]
    assert [s["width"] for s in row["timings"]["stages"]] == [192, 256]
    assert Image.open(row["path"]).size == (256, 128)


def test_a_folder_gives_one_result_and_one_json_line_per_picture(tiny, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.webp"):
        picture(folder / name)
    (folder / "broken.png").write_text("not an image")  # skipped with a note, the rest go on
    code, out, err = run(
        ["upscale", str(folder), "a field", *recipe(tiny, tmp_path / "out"), "--json"], capsys
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["extra"]["source"]["file"] for r in rows) == ["a.png", "b.jpg", "c.webp"]
    assert len({r["path"] for r in rows}) == 3 and len(list((tmp_path / "out").glob("*.png"))) == 3
    for r in rows:  # named after the picture, not "image-1-...", "image-1-...-1"
        stem = Path(r["extra"]["source"]["file"]).stem
        assert Path(r["path"]).name == f"{stem}-{r['seed']}-{r['width']}x{r['height']}.png"
    assert "skipped: " in err and "broken.png" in err


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: d / "missing.png", [], "missing.png: no such file"),
        (lambda d: (d / "notes.png").write_text("hello") and d / "notes.png", [], "not an image"),
        (lambda d: picture(d / "big.png", 512, 256), ["--res", "256"], "upscale makes images larger"),
        (lambda d: picture(d / "x.png"), ["--width", "200", "--height", "136", "--variant", "r8-down4"],
         "not a multiple of 64"),
        (lambda d: picture(d / "x.png"), ["--res", "300", "--scale", "2"], "one of --res, --scale"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(tiny, tmp_path, capsys, make, extra, message):
    path = make(tmp_path)
    args = ["upscale", str(path), "--model", str(tiny), "--out", f"{tmp_path}/out/", *extra]
    code, _, err = run(args, capsys)
    assert message in one_error_line(code, err)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_a_truncated_picture_is_one_line(tiny, tmp_path, capsys):
    whole = picture(tmp_path / "whole.png", 256, 256)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:2000])
    code, _, err = run(["upscale", str(cut), "--model", str(tiny), "--out", f"{tmp_path}/"], capsys)
    assert "cannot read" in one_error_line(code, err)
