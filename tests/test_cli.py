"""The command line as a new user meets it: errors that name the culprit and the fix, help and tables
that read at 80 columns, `--version`, comment lines in a prompts file. No model is loaded here: every
case ends before (the tiny-pipeline runs are in test_generate.py), and no test reaches the network.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from conftest import run_cli as run

from clear_gen import __version__
from clear_gen.cli import app
from clear_gen.cli.options import prompt_list
from clear_gen.weights.registry import load_registry

NOWHERE = "http://127.0.0.1:9"  # discard port: the connection is refused at once, never a real host


def _reload_hf() -> None:
    """huggingface_hub reads HF_ENDPOINT and HF_HUB_CACHE at import: re-read them."""
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, no token, and a Hub endpoint that refuses connections (not offline)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    _reload_hf()
    yield
    monkeypatch.undo()
    _reload_hf()


@pytest.fixture
def no_backoff(monkeypatch) -> list[float]:
    """The sleeps of huggingface_hub's retry loop (none expected): recorded, and not slept."""
    import huggingface_hub.utils._http as http

    slept: list[float] = []
    monkeypatch.setattr(http.time, "sleep", slept.append)
    return slept


def one_error_line(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def model_folder(tmp_path: Path) -> Path:
    """Enough of a diffusers folder for the checks that run before loading (model_index.json)."""
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


# ------------------------------------------------------------------------------- what a run needs


def test_nothing_cached_and_hub_unreachable_names_both_pieces_and_one_command(
    tmp_path, capsys, no_backoff, roomy_cpu
):
    started = time.monotonic()
    code, _, err = run(["a castle", "--res", "2048", "--out", f"{tmp_path}/out/"], capsys)  # CLEAR's size
    elapsed = time.monotonic() - started
    line = one_error_line(code, err)
    assert "base dev (black-forest-labs/FLUX.1-dev)" in line and "variant r8-down4" in line
    assert f"Hub ({NOWHERE}) is unreachable" in line
    assert "run `clear-gen download r8-down4` once online" in line  # base and variant, one command
    assert no_backoff == []  # no retry loop: one probe, then the error
    assert elapsed < 10  # generous (shared CPU); huggingface_hub's retries alone take ~25 s
    assert not list(tmp_path.glob("out/*.png"))


def test_only_the_variant_missing_offline(tmp_path, capsys, monkeypatch, roomy_cpu):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = str(model_folder(tmp_path))
    code, _, err = run(["a", "--res", "512", "--model", model, "--variant", "r16"], capsys)
    line = one_error_line(code, err)
    assert "variant r16 (Huage001/CLEAR/clear_local_16.safetensors)" in line and "base dev" not in line
    assert "HF_HUB_OFFLINE=1 is set: unset HF_HUB_OFFLINE and run `clear-gen download r16 --no-base`" in line


def test_only_the_base_missing_for_full_attention(capsys, no_backoff, roomy_cpu):
    code, _, err = run(["a", "--res", "128", "--model", "schnell", "--variant", "none"], capsys)
    line = one_error_line(code, err)
    assert "base schnell (black-forest-labs/FLUX.1-schnell)" in line and "variant" not in line
    assert "run `clear-gen download --base schnell` once online" in line and no_backoff == []


def test_a_variant_for_another_base_names_that_base(capsys, roomy_cpu):
    code, _, err = run(["a", "--res", "512", "--model", "schnell", "--variant", "r16"], capsys)
    assert "run `clear-gen download r16 --base schnell`" in one_error_line(code, err)


@pytest.mark.parametrize("where", ["missing", "not a model"])
def test_a_bad_model_folder_is_the_culprit_not_the_clear_weights(tmp_path, capsys, where):
    folder = tmp_path / "nonexistent" if where == "missing" else tmp_path  # tmp_path: no model_index.json
    code, _, err = run(["a", "--res", "128", "--model", str(folder)], capsys)
    line = one_error_line(code, err)
    assert f"--model {folder}: " in line and "variant" not in line and "download" not in line
    assert ("no such folder" if where == "missing" else "no model_index.json") in line
    assert "FluxPipeline.save_pretrained" in line  # what a valid folder is


# ---------------------------------------------------------------------------- values and conflicts


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "-1"], "--guidance must be at least 0, got -1.0"),
        (["--first-guidance", "-0.5"], "--first-guidance must be at least 0"),
        (["--ntk-factor", "0"], "--ntk-factor must be positive"),
        (["--max-sequence-length", "0"], "--max-sequence-length must be 1-512, got 0"),
        (["--max-sequence-length", "1000"], "--max-sequence-length must be 1-512, got 1000"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--first-steps", "-2"], "--first-steps must be at least 1"),
        (["--count", "0"], "--count must be at least 1, got 0"),
        (["--seed", "-1"], "--seed must be in 0 .. 2^64 - 1, got -1"),
        (["--stages", "0,128"], "each stage's long side must be 64-16384 px, got 0,128"),
        (["--upscale-from", "32"], "each stage's long side must be 64-16384 px, got 32,128"),
        (["--variant", "r8", "--window", "4"], "--variant r8 and --window 4 conflict"),
        (["--variant", "none", "--window", "4"], "--variant none and --window 4 conflict"),
        (["--variant", "r16", "--down-factor", "4"], "--variant r16 and --down-factor 4 conflict"),
        (["--down-factor", "4"], "--down-factor 4 needs --window"),
        (["--window", "0"], "--window must be a positive integer, got 0"),
        (["--window", "2", "--down-factor", "0"], "--down-factor must be a positive integer, got 0"),
        (["--window", "2", "--down-factor", "3", "--res", "128"], "not a multiple of 192; try --res 192"),
        (["--proportional-attention", "maybe"], "--proportional-attention takes on, off or auto"),
    ],
)
def test_bad_values_and_conflicts_are_refused_in_one_line(tmp_path, capsys, extra, message):
    args = ["a castle", "--model", str(model_folder(tmp_path)), "--out", f"{tmp_path}/out/"]
    code, _, err = run([*args, *(["--res", "128"] if "--res" not in extra else []), *extra], capsys)
    assert message in one_error_line(code, err)
    assert not (tmp_path / "out").exists()


def test_from_with_another_attention_replaces_the_recorded_one():
    from clear_gen.files.record import ImageRecord
    from clear_gen.plan.parse import parse
    from clear_gen.plan.records import options_from_record

    common = dict(prompt="a", seed=1, model="dev", steps=2, guidance=3.5, width=128, height=128)
    custom = ImageRecord(**common, variant="custom", window=2, down_factor=1)
    opts = options_from_record(custom, variant="r16")  # `--from custom.png --variant r16`
    assert (opts.variant, opts.window, opts.down_factor) == ("r16", None, None)
    assert parse(opts).attention.window == 16
    registry = ImageRecord(**common, variant="r8-down4", window=8, down_factor=4)
    opts = options_from_record(registry, window=3)  # `--from r8-down4.png --window 3`
    assert (opts.variant, opts.window, opts.down_factor) == (None, 3, None)
    assert options_from_record(registry, steps=5).variant == "r8-down4"  # other overrides keep it


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--res", "1000", "--window", "8"], "size 1000x1000 is not a multiple of 16; try --res 1008"),
        (["--res", "1000"], "is not a multiple of 64; try --res 1024"),  # the default variant, r8-down4
        (["--variant", "r8", "--window", "4"], "--variant r8 and --window 4 conflict"),
    ],
)
def test_bench_refuses_like_generate(capsys, extra, message):
    code, _, err = run(["bench", "--what", "plan", *extra], capsys)
    assert message in one_error_line(code, err)


# ------------------------------------------------------------------------------ prompts file


def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# castles, take 2\na castle\n\n  # indented comment\na tower # not a comment\n")
    assert prompt_list(None, prompts) == ["a castle", "a tower # not a comment"]
    assert prompt_list("first", prompts)[0] == "first"


# ------------------------------------------------------------------------------- help and tables


def _commands() -> dict:
    return typer.main.get_command(app).commands


@pytest.mark.parametrize("command", [None, "generate", "bench", "download", "weights", "info", "version"])
def test_help_reads_at_80_columns(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run([command, "--help"] if command else ["--help"], capsys)
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    params = _commands()[command].params if command else typer.main.get_command(app).params
    for param in params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), name  # whole, not cut


def test_generate_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    code, out, _ = run(["generate", "--help"], capsys)
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ --")}
    assert "[default: 1024]" in lines["--res"] and "[default: dev]" in lines["--model"]
    assert f"[default: {load_registry().default_variant}; none <= 1024 px]" in lines["--variant"]
    assert "[default: 20]" in lines["--steps"] and "comments" in lines["--prompts-file"]


def test_version(capsys):
    toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    pyproject = toml.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]  # one version, pyproject's
    assert run(["--version"], capsys) == (0, f"{__version__}\n", "")
    assert run(["version"], capsys) == (0, f"{__version__}\n", "")


def test_bench_table_fits_80_columns_with_a_legend(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run(["bench", "--what", "plan", "--res", "1024,2048,4096"], capsys)
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert re.search(r"┃ res +┃ +1024 ┃ +2048 ┃ +4096 ┃", out)  # turned: one column per size
    assert re.search(r"│ bound +│ +\d+\.\dx │", out)
    assert "PF: PFLOP" in out and "bound: step speedup" in out  # the legend of the terse headers


def test_weights_table_fits_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run(["weights"], capsys)
    assert code == 0, err
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert "CLEAR variants (Huage001/CLEAR)" in out
    from clear_gen.weights.registry import load_registry

    registry = load_registry()  # every name, file and repo id whole on one line (they were split mid-word)
    ids = [v.filename for v in registry.variants.values()] + [b.repo for b in registry.bases.values()]
    ids += [c.repo for c in registry.controlnets.values()] + list(registry.variants)
    lines = out.splitlines()
    assert all(any(i in line for line in lines) for i in ids), [
        i for i in ids if not any(i in x for x in lines)
    ]


@pytest.mark.parametrize(
    "args",
    [
        None,
        ["--help"],
        ["--version"],
        ["weights"],
        ["info", str(Path(__file__).parent / "fixtures" / "v0.1-castle-256x192.png")],
    ],
)
def test_import_help_version_weights_and_info_load_no_torch(args, tmp_path):
    """`import clear_gen` and the commands that compute nothing start fast: neither torch nor diffusers."""
    run = (
        ""
        if args is None
        else f"from clear_gen.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
    )
    code = f"import sys\nimport clear_gen\n{run}print(sorted({{'torch', 'diffusers'}} & set(sys.modules)))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
