"""`clear-gen PROMPT` end to end on a tiny FLUX pipeline saved in diffusers format (CPU, no network)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from PIL import Image
from safetensors.torch import save_file

from clear_gen.files.record import ImageRecord

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline_hub")]


@pytest.fixture(scope="module")
def clear_file(tiny, tmp_path_factory) -> Path:
    """A CLEAR checkpoint (r = 2, f = 1) for the tiny model, in the published key format."""
    from diffusers import FluxTransformer2DModel

    from clear_gen.attention.weights import expected_checkpoint

    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in expected_checkpoint(model, 1).items()}
    path = tmp_path_factory.mktemp("clear") / "clear_tiny_2.safetensors"
    save_file(sd, str(path))
    return path


def common(tiny: Path, out: Path) -> list[str]:
    return [
        "--model",
        str(tiny),
        "--out",
        f"{out}/",
        "--max-sequence-length",
        "16",
        "--steps",
        "2",
        "--backend",
        "dense",
    ]


def error_line(err: str) -> str:
    """The one error line, last; only progress lines of phases already begun may come before it."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if line.startswith("error:")] == lines[-1:]
    return lines[-1]


def images(out: Path) -> list[Path]:
    return sorted(out.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_text_to_image_with_json_and_metadata(tiny, clear_file, tmp_path, capsys):
    args = ["a red castle", *common(tiny, tmp_path), "--window", "2", "--clear-weights", str(clear_file)]
    code, out, err = run([*args, "--res", "128", "--seed", "7", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out.strip())
    path = Path(row["path"])
    assert path.name == "a-red-castle-7-128x128.png" and path.exists()
    assert Image.open(path).size == (128, 128)
    record = ImageRecord.from_png(path)
    assert (record.prompt, record.seed, record.window, record.width, record.height) == (
        "a red castle",
        7,
        2,
        128,
        128,
    )
    stage = row["timings"]["stages"][0]
    assert stage["attention"] == "CLEAR r=2" and stage["steps"] == 2
    assert stage["full_step_s"] > 0 and stage["full_estimated"] is False and stage["speedup"] > 0
    assert "speedup" in err and "s/step" in err  # the timing table, on stderr


def test_upscale_from_keeps_stages(tiny, tmp_path, capsys):
    args = ["a tower", *common(tiny, tmp_path), "--window", "4", "--down-factor", "4"]
    code, out, err = run(
        [
            *args,
            "--width",
            "256",
            "--height",
            "128",
            "--upscale-from",
            "128",
            "--seed",
            "1",
            "--keep-stages",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    row = json.loads(out)
    assert [(s["width"], s["height"], s["attention"]) for s in row["timings"]["stages"]] == [
        (128, 64, "full"),
        (256, 128, "CLEAR r=4 f=4"),
    ]
    assert Image.open(row["stage_paths"][0]).size == (128, 64)
    assert Image.open(row["path"]).size == (256, 128)
    record = ImageRecord.from_png(row["path"])
    assert record.stages == [128, 256] and record.strength == 0.7 and record.down_factor == 4


def test_progressive_stages_and_seed_reproducibility(tiny, tmp_path, capsys):
    args = ["a bridge", *common(tiny, tmp_path), "--window", "3", "--stages", "128,192,256", "--seed", "5"]
    code, out, err = run([*args, "--json"], capsys)
    assert code == 0, err
    first = Path(json.loads(out)["path"])
    assert [s["width"] for s in json.loads(out)["timings"]["stages"]] == [128, 192, 256]
    code, out, err = run([*args, "--json", "--no-compare-full"], capsys)
    second = Path(json.loads(out)["path"])
    assert second != first and second.name.endswith("-1.png")  # never overwritten
    np.testing.assert_array_equal(pixels(first), pixels(second))  # same seed, same image


def test_several_seeds_and_a_prompts_file(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# animals\na cat\n\n# a bird\na dog\n")  # comments and blank lines: no image
    out = tmp_path / "out"
    args = ["--prompts-file", str(prompts), *common(tiny, out), "--window", "2", "--res", "128"]
    code, stdout, err = run([*args, "--seed", "1", "--seed", "2", "--json", "--no-compare-full"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        ("a cat", 1),
        ("a cat", 2),
        ("a dog", 1),
        ("a dog", 2),
    ]
    assert len(images(out)) == 4


def test_from_image_reruns_the_same_image(tiny, tmp_path, capsys):
    args = ["a lighthouse", *common(tiny, tmp_path / "a"), "--window", "2", "--res", "128", "--count", "1"]
    code, out, err = run([*args, "--json", "--no-compare-full"], capsys)
    assert code == 0, err
    original = Path(json.loads(out)["path"])
    code, out, err = run(["info", str(original), "--json"], capsys)
    assert code == 0 and json.loads(out)["prompt"] == "a lighthouse"
    code, out, err = run(
        ["--from", str(original), "--out", f"{tmp_path / 'b'}/", "--json", "--no-compare-full"], capsys
    )
    assert code == 0, err
    again = Path(json.loads(out)["path"])
    assert again.name == original.name
    np.testing.assert_array_equal(pixels(original), pixels(again))


def test_full_attention_variant_none(tiny, tmp_path, capsys):
    code, out, err = run(
        ["a hill", *common(tiny, tmp_path), "--variant", "none", "--res", "128", "--json"], capsys
    )
    assert code == 0, err
    stage = json.loads(out)["timings"]["stages"][0]
    assert stage["attention"] == "full" and stage["speedup"] is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--res", "1000", "--window", "2"], "not a multiple of 16; try --res 1008"),
        (["--res", "1000"], "not a multiple of 16; try --res 1008"),  # full attention
        (["--res", "1000", "--variant", "r8-down4"], "not a multiple of 64; try --res 1024"),
        (["--res", "160", "--window", "2", "--down-factor", "4"], "160x160 is not a multiple of 64"),
        (["--res", "48"], "out of range"),
        (["--res", "128", "--variant", "r7"], "r8-down4"),
        (["--res", "128", "--variant", "r8"], "clear-gen download r8"),
        (["--res", "128", "--window", "2", "--device", "cuda"], "no CUDA GPU"),
        (["--res", "128", "--window", "2", "--dtype", "fp8"], "bf16, fp16, fp32"),
        (["--res", "128", "--window", "2", "--stages", "256,128"], "must grow"),
        (["--res", "128", "--window", "2", "--offload", "disk"], "choose auto, none, model or sequential"),
        (["--res", "128", "--window", "2", "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--res", "128", "--window", "2", "--seed", "1", "--count", "3"], "either --seed"),
    ],
)
def test_user_errors_are_one_line(tiny, tmp_path, capsys, extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run(["a castle", "--model", str(tiny), "--out", f"{tmp_path}/", *extra], capsys)
    assert code == 1
    assert message in error_line(err)
    assert images(tmp_path) == []


def test_empty_prompt_and_unwritable_output(tiny, tmp_path, capsys):
    code, _, err = run(["  ", "--model", str(tiny), "--window", "2", "--res", "128"], capsys)
    assert code == 1 and "prompt is empty" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(
        ["a", "--model", str(tiny), "--window", "2", "--res", "128", "--out", f"{blocker}/x/"], capsys
    )
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_model_folder_missing_files(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "transformer")
    code, _, err = run(
        ["a", "--model", str(broken), "--window", "2", "--res", "128", "--out", f"{tmp_path}/"], capsys
    )
    assert code == 1 and "clear-gen download" in err and "Traceback" not in err


def test_installed_executable(tiny, tmp_path):
    exe = shutil.which("clear-gen", path=str(Path(sys.executable).parent)) or shutil.which("clear-gen")
    if exe is None:
        pytest.skip("clear-gen is not installed in this environment (scripts/test.sh installs it)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = [
        exe,
        "a small house",
        *common(tiny, tmp_path),
        "--window",
        "2",
        "--res",
        "128",
        "--seed",
        "3",
        "--json",
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Path(json.loads(done.stdout)["path"]).exists()
    bad = subprocess.run([exe, "a", "--res", "100"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "try --res 96" in bad.stderr and "Traceback" not in bad.stderr


def test_out_of_gpu_memory_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    import clear_gen.run.render as R

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(R, "_run_stage", oom)
    code, _, err = run(["a", *common(tiny, tmp_path), "--window", "2", "--res", "128"], capsys)
    assert code == 1 and "--offload model" in error_line(err)
    assert images(tmp_path) == []


def test_base_missing_offline_names_the_download(tmp_path, capsys, roomy_cpu):
    code, _, err = run(
        ["a castle", "--model", "dev", "--window", "2", "--res", "128", "--out", f"{tmp_path}/"], capsys
    )
    assert code == 1 and "clear-gen download --base dev" in err and "Traceback" not in err


def test_full_attention_is_estimated_when_too_slow_to_measure(tiny, tmp_path, capsys, monkeypatch):
    import clear_gen.run.measure

    monkeypatch.setattr(clear_gen.run.measure, "FULL_MEASURE_BUDGET_S", 0.0)
    code, out, err = run(["a", *common(tiny, tmp_path), "--window", "2", "--res", "128", "--json"], capsys)
    assert code == 0, err
    stage = json.loads(out)["timings"]["stages"][0]
    assert stage["full_estimated"] is True and stage["full_step_s"] > 0
    assert re.search(r"\d\.\d+x\*", err)  # the speedup marked as estimated


def test_bare_command_and_bad_flags_print_usage_not_tracebacks(capsys):
    for args in ([], ["--no-such-flag"], ["generate", "a", "--res", "big"]):
        code, out, err = run(args, capsys)
        assert code == 2 and "Traceback" not in out + err and "Usage" in out + err


def test_variant_given_as_a_local_published_file(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    from clear_gen.plan.parse import parse
    from clear_gen.plan.spec import GenerateOptions

    tensors = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}
    tensors["transformer_blocks.0.attn.processor.spatial_weight"] = torch.zeros(1, 1, 1, 4, 1, 4, 1)
    published = tmp_path / "clear_local_16_down_4.safetensors"
    save_file(tensors, str(published))
    choice = parse(GenerateOptions(prompts=["a"], variant=str(published))).attention
    assert (choice.label, choice.window, choice.down_factor, choice.weights) == (
        "r16-down4",
        16,
        4,
        published,
    )
    other = tmp_path / "mine.safetensors"
    save_file(tensors, str(other))  # no window in its metadata
    code, _, err = run(["a", "--model", str(tiny), "--variant", str(other), "--res", "128"], capsys)
    assert code == 1 and f"use --window R --down-factor 4 --clear-weights {other}" in err


MODES = {
    "text-to-image": ["--res", "128", "--window", "2"],
    "upscale-from": ["--width", "256", "--height", "128", "--upscale-from", "128", "--window", "4",
                     "--down-factor", "4"],
    "stages": ["--stages", "128,192,256", "--window", "3"],
    "upscale-full-attention": ["--res", "256", "--upscale-from", "128", "--variant", "none"],
}  # fmt: skip


@pytest.mark.parametrize(
    "dtype, mode",
    [("bf16", m) for m in MODES] + [("fp16", "upscale-from"), ("fp16", "stages")],
)
def test_half_precision_end_to_end(tiny, clear_file, tmp_path, capsys, dtype, mode):
    """GPUs run bf16: every path runs in it on the CPU too (SDEdit stages, CLEAR and stock)."""
    args = ["a bridge", *common(tiny, tmp_path), *MODES[mode], "--dtype", dtype, "--device", "cpu"]
    if mode == "text-to-image":
        args += ["--clear-weights", str(clear_file)]  # a checkpoint in float32 into a half model: copied in
    code, out, err = run([*args, "--backend", "flex", "--seed", "2", "--json", "--first-steps", "2"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert Path(row["path"]).exists() and "Traceback" not in err
    image = pixels(Path(row["path"]))
    assert image.std() > 0  # not a blank or NaN-black image
