"""PNGs written by clear-gen 0.1.0 before the package redesign still work: `info` reads the same record,
and `--from` re-makes the same image (tests/fixtures/v0.1-*: made by
`clear-gen "a red castle" --model TINY --width 256 --height 192 --stages 128,256 --window 4 --seed 3
--steps 2 --first-steps 2 --device cpu --keep-stages --max-sequence-length 64 --no-compare-full`,
TINY = tiny_pipeline.save_tiny_flux)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
PNGS = ["v0.1-castle-256x192", "v0.1-castle-stage-128x96"]


@pytest.mark.parametrize("name", PNGS)
def test_info_reads_a_record_written_before_the_redesign(name, capsys):
    code, out, err = run_cli(["info", "--json", str(FIXTURES / f"{name}.png")], capsys)
    assert code == 0, err
    assert json.loads(out) == json.loads((FIXTURES / f"{name}.info.json").read_text())
    code, out, err = run_cli(["info", str(FIXTURES / f"{name}.png")], capsys)  # the table too
    assert code == 0 and "a red castle" in out and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.usefixtures("offline_hub")
@pytest.mark.parametrize("name", PNGS)
def test_from_remakes_an_image_written_before_the_redesign(name, tiny, tmp_path, capsys):
    old = FIXTURES / f"{name}.png"
    code, out, err = run_cli(
        ["--from", str(old), "--model", str(tiny), "--out", str(tmp_path), "--device", "cpu", "--json"],
        capsys,
    )
    assert code == 0, err
    made = json.loads(out.splitlines()[-1])
    recorded = json.loads((FIXTURES / f"{name}.info.json").read_text())
    for key in ("prompt", "seed", "variant", "window", "down_factor", "steps", "guidance", "width", "height",
                "stages", "strength"):  # fmt: skip
        assert made[key] == recorded[key], key
    for key in ("first_steps", "first_guidance", "max_sequence_length", "dtype"):
        assert made["extra"].get(key) == recorded["extra"].get(key), key
    before = np.asarray(Image.open(old), dtype=np.int16)
    after = np.asarray(Image.open(made["path"]), dtype=np.int16)
    assert before.shape == after.shape
    assert np.abs(before - after).mean() < 1.0  # the same pixels here; another CPU may round differently
