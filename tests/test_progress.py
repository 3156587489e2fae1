"""Progress on stderr, honest timing, records that re-make their image, the default attention by size."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from test_generate import common, run

import clear_gen.cli.display as D
from clear_gen.files.record import ImageRecord, RunTiming, StageTiming
from clear_gen.plan.parse import parse
from clear_gen.plan.spec import GenerateOptions, Stage
from clear_gen.run.generate import ImageResult

REPO = Path(__file__).resolve().parents[1]


def stage_timing(**overrides) -> StageTiming:
    fields = dict(width=128, height=64, attention="CLEAR r=2", steps=3, seconds=2.5, first_step_s=2.0)
    return StageTiming(**(fields | {"step_s": 0.2, "full_step_s": 0.5} | overrides))


# ---- the timing record ---------------------------------------------------------------------------


def test_run_timing_round_trips_and_accounts_for_the_total():
    timing = RunTiming(1.0, 0.5, [stage_timing(compare_s=0.75, decode_s=0.25)], save_s=0.5, total_s=6.0)
    data = timing.to_json()
    assert data["decode_s"] == 0.25 and data["compare_s"] == 0.75 and data["other_s"] == pytest.approx(0.5)
    assert data["stages"][0]["warmup_s"] == pytest.approx(1.8) and data["stages"][0]["speedup"] == 2.5
    assert RunTiming.from_json(json.loads(json.dumps(data))) == timing
    with pytest.raises((TypeError, KeyError)):
        RunTiming.from_json({"stage 1": 12.5})  # not clear-gen's record
    older = {"stages": [{k: v for k, v in data["stages"][0].items() if k != "first_step_s"}]}
    assert RunTiming.from_json(older).stages[0].warmup_s is None  # a record from before first_step_s


def test_one_step_without_a_warm_step_has_no_speedup_not_zero():
    t = stage_timing(steps=1, step_s=None)
    assert t.warmup_s is None and t.speedup is None
    assert D._stage_cells(t)[2:6] == ["n/a", "n/a", "0.50", "n/a"]  # warm-up, s/step, full, speedup
    assert stage_timing(attention="full").speedup is None


# ---- what the display prints ---------------------------------------------------------------------


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def test_plain_lines_first_and_last_step_and_one_every_5_s(monkeypatch):
    clock = iter(range(101, 200))
    monkeypatch.setattr(D.time, "monotonic", lambda: next(clock))  # one second per step
    console, buffer = plain_console()
    display = D.GenerateDisplay(console, as_json=False)
    assert isinstance(display.view, D.Lines) and not isinstance(display.view, D.Bars)
    hooks = display.hooks()
    hooks.stage_start(1, 2, Stage(256, 128, True, 12, 7.5, True, 1.0))
    hooks.phase("compile", "256x128")
    for done in range(1, 13):
        hooks.step(done, 12, 3.0 if done == 1 else 0.5)
    lines = buffer.getvalue().splitlines()
    assert lines[:2] == [
        "stage 2/2: 256x128, CLEAR, 12 steps",
        "compiling attention kernels for 256x128 (first run at this size)",
    ]
    assert lines[2:] == [
        "stage 2/2 step 1/12: 3.0 s, compilation included",
        "stage 2/2 step 6/12: 0.50 s/step, 3.0 s left",
        "stage 2/2 step 11/12: 0.50 s/step, 0.5 s left",
        "stage 2/2 step 12/12: 0.50 s/step, done",
    ]


def test_a_terminal_gets_bars_for_every_phase_and_stdout_stays_json(capsys):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    display = D.GenerateDisplay(console, as_json=True)
    assert isinstance(display.view, D.Bars)
    hooks = display.hooks()
    with display:
        hooks.phase("load", "FLUX.1 dev")
        tasks = display.view.progress.tasks
        assert [t.description for t in tasks] == ["loading FLUX.1 dev"] and tasks[0].total is None
        hooks.phase_done("load", 1.0)
        hooks.stage_start(0, 1, Stage(128, 128, False, 4, 3.5, False))
        hooks.phase("decode", "128x128")
        descriptions = [t.description for t in display.view.progress.tasks]
        assert descriptions == [
            "stage 1/1: 128x128, full attention, 4 steps",
            "decoding 128x128 with the VAE",
        ]
        record = ImageRecord(prompt="a", seed=1, model="dev", steps=4, guidance=3.5, width=128, height=128)
        hooks.image_done(ImageResult(Path("/x/a.png"), record, RunTiming(1.0, 0.5, [stage_timing()])))
    assert json.loads(capsys.readouterr().out)["path"] == "/x/a.png"  # not into the bars' console
    assert "a.png  (seed 1)" in console.file.getvalue()  # the timing table


# ---- the default attention -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, given, label",
    [
        (1024, {}, "none"),
        (512, {}, "none"),
        (1024, {"variant": "r8"}, "r8"),
        (1024, {"window": 2}, "custom"),
        (2048, {}, "r8-down4"),
    ],
)
def test_clear_runs_by_default_only_above_1024_px(size, given, label):
    choice = parse(GenerateOptions(prompts=["a"], width=size, height=size // 2, **given)).attention
    assert choice.label == label
    assert (choice.note is not None) == (label == "none")
    if choice.note:
        assert "full attention" in choice.note and "--variant or --window" in choice.note


# ---- end to end on the tiny pipeline -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _offline(request):
    if "tiny" in request.fixturenames:  # the end-to-end tests below: offline, empty cache
        request.getfixturevalue("offline_hub")


def in_order(text: str, parts: list[str]) -> bool:
    """Each of `parts` found in `text`, each after the one before."""
    at = 0
    for part in parts:
        at = text.find(part, at)
        if at < 0:
            return False
        at += len(part)
    return True


@pytest.mark.slow
def test_progress_lines_in_a_log(tiny, tmp_path):
    """A real process with stderr a pipe: lines as the work goes, stdout pure JSON."""
    args = [*common(tiny, tmp_path), "--backend", "flex", "--window", "2", "--res", "128", "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from clear_gen.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "a small house", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)  # one object and nothing else
    assert in_order(
        done.stderr,
        [
            f"loading FLUX.1 {tiny} with CLEAR r=2\n",
            "loaded in ",
            "encoding 1 prompt\n",
            "stage 1/1: 128x128, CLEAR, 2 steps\n",
            "compiling attention kernels for 128x128 (first run at this size)\n",
            "stage 1/1 step 1/2: ",
            "compilation included\n",
            "stage 1/1 step 2/2: ",
            " s/step, done\n",
            "timing full attention at 128x128",
            "decoding 128x128 with the VAE\n",
            f"saved {row['path']} (",
            "total",
        ],
    ), done.stderr


@pytest.mark.slow
def test_one_step_run_reports_compilation_apart_and_a_real_speedup(tiny, tmp_path, capsys, monkeypatch):
    from clear_gen.attention.backends import BACKENDS

    monkeypatch.setattr(BACKENDS["flex"], "seen", set())  # this process has compiled nothing yet
    args = ["a", *common(tiny, tmp_path), "--backend", "flex", "--window", "2", "--res", "128"]
    started = time.perf_counter()
    code, out, err = run([*args, "--steps", "1", "--json"], capsys)
    wall = time.perf_counter() - started
    assert code == 0, err
    timing = json.loads(out)["timings"]
    stage = timing["stages"][0]
    assert stage["steps"] == 1 and stage["step_s"] > 0 and stage["full_estimated"] is False
    assert stage["warmup_s"] == pytest.approx(max(stage["first_step_s"] - stage["step_s"], 0))
    assert stage["speedup"] == pytest.approx(stage["full_step_s"] / stage["step_s"])
    assert "compilation included" in err and "0.00x" not in err and "warm-up" in err
    # The parts add up to the image's wall time, which is about the whole run's.
    parts = [timing[k] for k in ("load_s", "encode_s", "compare_s", "decode_s", "save_s")]
    parts += [stage["seconds"]]
    assert sum(parts) + timing["other_s"] == pytest.approx(timing["total_s"])
    assert 0.5 * wall < sum(parts) <= timing["total_s"] <= wall
    assert re.search(r"^total +[\d.]+ *$", err, re.MULTILINE)


@pytest.mark.slow
def test_kept_stage_records_what_made_it_and_from_re_makes_it(tiny, tmp_path, capsys):
    args = ["a tower", *common(tiny, tmp_path / "a"), "--window", "4", "--down-factor", "4", "--seed", "1"]
    args += ["--width", "256", "--height", "128", "--upscale-from", "128", "--first-steps", "2"]
    code, out, err = run([*args, "--keep-stages", "--json", "--no-compare-full"], capsys)
    assert code == 0, err
    row = json.loads(out)
    first, final = Path(row["stage_paths"][0]), Path(row["path"])
    record = ImageRecord.from_png(first)
    assert (record.variant, record.window, record.down_factor, record.strength) == ("none", None, None, None)
    assert (record.width, record.height, record.stages, record.steps, record.guidance) == (
        128,
        64,
        [128],
        2,
        3.5,
    )
    assert [s["attention"] for s in record.timings["stages"]] == ["full"]
    assert ImageRecord.from_png(final).variant == "custom"
    for original, out_dir in ((first, "b"), (final, "c")):
        code, out, err = run(["--from", str(original), "--out", f"{tmp_path / out_dir}/", "--json"], capsys)
        assert code == 0, err
        again = Path(json.loads(out)["path"])
        assert again.name == original.name
        np.testing.assert_array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(again)))


@pytest.mark.slow
def test_json_line_is_self_contained_and_info_shows_a_timing_table(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(tiny)
    args = ["a hut", *common(Path(model), Path("out")), "--window", "2", "--res", "128", "--json"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    row = json.loads(out)
    assert Path(row["path"]).is_absolute() and Path(row["path"]).exists()
    assert row["model"] == str(tiny) and Path(row["model"]).is_absolute()
    assert (row["variant"], row["window"], row["down_factor"]) == ("custom", 2, 1)
    assert row["guidance"] == 3.5 and row["steps"] == 2 and row["extra"]["dtype"] == "fp32"
    assert row["timings"]["total_s"] > 0 and row["timings"]["stages"][0]["attention"] == "CLEAR r=2"
    code, out, err = run(["info", row["path"]], capsys)
    assert code == 0, err
    assert "warm-up" in out and "128x128" in out and "CLEAR r=2" in out and re.search(r"^total", out, re.M)
    assert not re.search(r"\d\.\d{5,}", out)  # no 17-digit floats
    assert "null" not in out and "None" not in out  # unset fields left out


@pytest.mark.slow
def test_small_default_is_full_attention_with_a_note_and_window_forces_clear(tiny, tmp_path, capsys):
    args = ["a hill", *common(tiny, tmp_path), "--res", "128", "--json"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["variant"] == "none" and row["timings"]["stages"][0]["attention"] == "full"
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 128x128: the original weights with full attention, as CLEAR is no faster at or below "
        "1024 px (--variant or --window forces CLEAR)"
    ]
    code, out, err = run([*args, "--window", "2"], capsys)
    assert code == 0, err
    assert json.loads(out)["timings"]["stages"][0]["attention"] == "CLEAR r=2" and "note:" not in err
