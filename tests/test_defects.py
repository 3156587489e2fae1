"""What a new user tripped over (round 2): each test here failed before its fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run
from PIL import Image

pytestmark = [pytest.mark.usefixtures("offline_hub")]


def common(tiny: Path, *more: str) -> list[str]:
    return ["--model", str(tiny), "--max-sequence-length", "16", "--steps", "2", "--device", "cpu", *more]


def one_error(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err and lines[-1].startswith("error:"), err
    return lines[-1]


@pytest.mark.slow
def test_keep_stages_with_a_file_name_keeps_the_name_for_the_finished_image(tiny, tmp_path, capsys):
    out = tmp_path / "final.png"
    args = ["a tower", *common(tiny), "--width", "256", "--height", "128", "--upscale-from", "128"]
    code, stdout, err = run(
        [*args, "--keep-stages", "--out", str(out), "--json", "--no-compare-full"], capsys
    )
    assert code == 0, err
    row = json.loads(stdout)
    assert Path(row["path"]) == out and Image.open(out).size == (256, 128)
    assert [Path(p).name for p in row["stage_paths"]] == ["final-stage1.png"]
    assert Image.open(row["stage_paths"][0]).size == (128, 64)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, "4"])
def test_nan_latents_stop_the_run_naming_stage_backend_and_dtype_and_save_nothing(
    tiny, tmp_path, capsys, monkeypatch, window
):
    from diffusers import FluxTransformer2DModel

    real = FluxTransformer2DModel.forward

    def nan_forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(FluxTransformer2DModel, "forward", nan_forward)
    attention = ["--window", window, "--backend", "dense"] if window else []
    args = ["a tower", *common(tiny, *attention), "--res", "128", "--out", f"{tmp_path}/out/"]
    code, _, err = run(args, capsys)
    line = one_error(code, err)
    assert "stage 1/1's latents at 128x128 hold NaN or inf" in line and "fp32 on cpu" in line
    assert ("CLEAR on the dense backend" if window else "stock attention") in line
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-8"),
        lambda text: "\ufeff".encode() + text.encode("utf-8"),  # UTF-8 with a BOM (Notepad)
        lambda text: text.encode("utf-16"),  # UTF-16 with a BOM (PowerShell's > and Notepad)
        lambda text: text.encode("utf-16-be").join([b"\xfe\xff", b""]),  # big-endian, BOM first
    ],
)
def test_prompts_files_in_utf8_with_or_without_bom_and_utf16_read_the_same(tmp_path, encode):
    from clear_gen.cli.options import prompt_list

    path = tmp_path / "prompts.txt"
    path.write_bytes(encode("# castles\na red castle\n\na blue lake\n"))
    assert prompt_list(None, path) == ["a red castle", "a blue lake"]  # no \ufeff inside the first prompt


@pytest.mark.parametrize(
    "data, says",
    [
        ("a château".encode("latin-1"), "is not UTF-8 (byte 4: 0xe2); save it as UTF-8"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a text file (it holds NUL bytes"),
        ("a castle".encode("utf-16-le"), "is not a text file"),  # UTF-16 without its BOM
        (b"# only comments\n\n", "has no prompt (one a line; # starts a comment)"),
    ],
)
def test_a_prompts_file_that_is_not_text_is_one_line_naming_it(tmp_path, capsys, data, says):
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    code, _, err = run(["generate", "--prompts-file", str(path), "--dry-run"], capsys)
    line = one_error(code, err)
    assert f"--prompts-file {path}" in line and says in line


def test_distill_prompts_and_captions_read_as_the_cli_reads_them(tmp_path):
    from clear_gen.distill.data import _image_prompt, read_prompts
    from clear_gen.errors import ConfigError

    (tmp_path / "p.txt").write_bytes("a red castle\n".encode("utf-16"))
    assert read_prompts(tmp_path / "p.txt", "--prompts-file") == ["a red castle"]
    (tmp_path / "x.txt").write_bytes("\ufeffa caption".encode())
    assert _image_prompt(tmp_path / "x.png") == "a caption"
    (tmp_path / "y.txt").write_bytes("café".encode("cp1252"))
    with pytest.raises(ConfigError, match="is not UTF-8"):
        _image_prompt(tmp_path / "y.png")


def clear_checkpoint(tiny: Path, path: Path, down_factor: int = 1, metadata: dict | None = None) -> Path:
    """A CLEAR checkpoint for the tiny model in the published key format (random weights)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from clear_gen.attention.weights import expected_checkpoint

    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in expected_checkpoint(model, down_factor).items()}
    save_file(sd, str(path), metadata=metadata)
    return path


@pytest.mark.slow
def test_a_local_variant_file_is_recorded_with_its_path_and_sha256_and_from_uses_it(tiny, tmp_path, capsys):
    import hashlib

    from clear_gen.files.record import ImageRecord

    mine = clear_checkpoint(tiny, tmp_path / "mine.safetensors", metadata={"window": "2", "down_factor": "1"})
    args = ["a tower", *common(tiny, "--backend", "dense"), "--res", "128", "--no-compare-full"]
    code, out, err = run([*args, "--variant", str(mine), "--out", f"{tmp_path}/a/", "--json"], capsys)
    assert code == 0, err  # not a published name, but its metadata records its window
    record = ImageRecord.from_png(json.loads(out)["path"])
    assert (record.variant, record.window, record.down_factor) == ("custom", 2, 1)
    assert record.extra["clear_weights"] == str(mine.resolve())
    assert record.extra["clear_weights_sha256"] == hashlib.sha256(mine.read_bytes()).hexdigest()
    code, out, err = run(["--from", json.loads(out)["path"], "--out", f"{tmp_path}/b/", "--json"], capsys)
    assert code == 0, err
    again = ImageRecord.from_png(json.loads(out)["path"])
    assert again.extra["clear_weights"] == str(mine.resolve()) and "changed since" not in err
    clear_checkpoint(tiny, mine, metadata={"window": "2", "steps": "9"})  # same name, other file
    code, out, err = run(["--from", json.loads(out)["path"], "--out", f"{tmp_path}/c/", "--json"], capsys)
    assert code == 0 and "mine.safetensors changed since the image was made" in err


def test_clear_weights_that_are_a_lora_or_of_another_down_factor_are_refused_before_loading(
    tiny, tmp_path, capsys
):
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)}, str(lora))
    args = ["a tower", "--model", str(tiny / "missing"), "--res", "128", "--window", "2"]
    code, _, err = run([*args, "--clear-weights", str(lora)], capsys)
    assert "is a LoRA: give it with --lora" in one_error(code, err)  # before the (missing) model is read
    pooled = clear_checkpoint(tiny, tmp_path / "pooled.safetensors", down_factor=2)
    code, _, err = run([*args, "--clear-weights", str(pooled)], capsys)
    assert "is down-sampled (f = 2): give --down-factor 2" in one_error(code, err)


def test_a_window_wider_than_the_image_plans_at_once_and_says_it_is_full_attention(tmp_path):
    """`--window 100000` hung for minutes in an O(r^2) count; a window wider than the grid is full
    attention."""
    import subprocess
    import sys

    code = "from clear_gen.cli import main\nmain(['a', '--res', '2048', '--window', '100000', '--dry-run'])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (
        "--window 100000 covers the whole 128 x 128 token grid at 2048x2048: that is full attention"
        in out.stdout
    )
    from clear_gen.core.geometry import full_window, image_geometry, needed_pairs

    geo = image_geometry(16, 128, 128, 100_000)
    widest = 127**2 + 127**2  # the farthest pair's squared distance; a pair is inside when d^2 < r^2
    assert geo.window == full_window(128, 128) == min(r for r in range(1, 400) if r * r > widest)
    assert needed_pairs(geo) == geo.q_len * geo.q_len  # every pair


@pytest.mark.parametrize("as_json", [False, True])
def test_a_cpu_dry_run_is_planned_against_the_machines_memory(monkeypatch, capsys, as_json):
    """`--dry-run --device cpu` at 4K said `fits: true` with a 67.7 GB peak on a 23 GB machine, at 0
    TFLOP/s."""
    from clear_gen.plan import gpus

    monkeypatch.setattr(gpus, "available_memory", lambda: int(23e9))
    args = ["a castle", "--res", "4096", "--dry-run", "--device", "cpu", *(["--json"] if as_json else [])]
    code, out, err = run(args, capsys)
    assert code == 1, err  # a run that would be refused
    if as_json:
        plan = json.loads(out)
        assert not plan["fits"] and not plan["fits_any"] and plan["free_gb"] == pytest.approx(23)
        assert plan["peak_gb"] > 23 and 0 < plan["rate_tflops"] and not plan["gpu"]
        return
    assert "plan for the CPU, 23.0 GB free" in out and "does not fit: 4096x4096 on the CPU needs" in out
    assert "--dtype bf16, --quantize int8" in out
    rate = out.split("FLOP model at ")[1].split(" TFLOP/s")[0]
    assert float(rate) > 0, rate


def test_a_cpu_plan_that_fits_says_so_and_an_offload_asked_there_is_a_note(monkeypatch, capsys):
    from clear_gen.plan import gpus

    monkeypatch.setattr(gpus, "available_memory", lambda: int(512e9))
    code, out, err = run(["a", "--res", "1024", "--dry-run", "--device", "cpu", "--offload", "model"], capsys)
    assert code == 0, err
    assert "offload: none (the CPU: plan" in out and "fits (peak + 10% within 512.0 GB free)" in out
    assert "--offload model does nothing on the CPU" in out


@pytest.mark.slow
def test_a_cpu_run_that_cannot_fit_is_refused_before_loading(tiny, monkeypatch, capsys, tmp_path):
    from clear_gen.plan import gpus

    monkeypatch.setattr(gpus, "available_memory", lambda: 2**20)  # 1 MB: not even the tiny model
    code, _, err = run(["a", *common(tiny), "--res", "128", "--out", f"{tmp_path}/"], capsys)
    assert "128x128 on the CPU needs" in one_error(code, err) and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- 7. refused before loading


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_backend_that_cannot_serve_a_clear_stage_is_refused_at_parse(tiny, capsys, dry_run, tmp_path):
    """`--backend dense --res 2048 --stages 128,2048` passed the dry run and failed after the first pass."""
    args = ["a", "--res", "2048", "--stages", "128,2048", "--backend", "dense", "--device", "cpu"]
    args += ["--dry-run"] if dry_run else [*common(tiny), "--out", f"{tmp_path}/"]
    code, _, err = run(args, capsys)
    line = one_error(code, err)
    assert "stage 2/2 (2048x2048): the dense backend needs a" in line and "use --backend gather" in line


def test_an_unknown_backend_is_refused_for_a_full_attention_run_too(capsys):
    code, _, err = run(["a", "--res", "512", "--backend", "bogus", "--dry-run"], capsys)
    assert "unknown attention backend 'bogus'" in one_error(code, err)


def test_sequence_mode_heads_the_ranks_do_not_divide_are_refused_before_loading(tiny, monkeypatch):
    """The tiny model has 2 heads: 3 ranks cannot split them, and that is known from its config."""
    from clear_gen.errors import ConfigError
    from clear_gen.plan.spec import GenerateOptions
    from clear_gen.run import generate as G
    from clear_gen.run import world as W
    from clear_gen.run.render import Hooks

    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    opts = GenerateOptions(prompts=["a"], model=str(tiny), width=128, height=128, window=2, device="cpu",
                           max_sequence_length=16, steps=2)  # fmt: skip
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="2 heads cannot be split over 3"):
        G._check(opts, W.World(rank=0, size=3, mode="sequence"), cpu, Hooks(), None)
    G._check(opts, W.World(rank=0, size=2, mode="sequence"), cpu, Hooks(), None)


# ---------------------------------------------------------------- 8. a LoRA diffusers' converter rejects


def kohya_lora(path: Path, up_rows: int) -> Path:
    """A kohya-format FLUX LoRA as people share them (lora_unet_* keys, lora_down/lora_up/alpha, non-zero):
    its single block's linear1 is fused q, k, v and MLP, which diffusers' converter splits by FLUX.1-dev's
    sizes, asserting the rows add up."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    key = "lora_unet_single_blocks_0_linear1"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(4, 32, generator=g),
        f"{key}.lora_up.weight": torch.randn(up_rows, 4, generator=g),
        f"{key}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(path))
    return path


@pytest.mark.slow
def test_a_lora_the_converter_asserts_on_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    lora = kohya_lora(tmp_path / "mine.safetensors", up_rows=100)
    args = ["a", *common(tiny), "--res", "128", "--lora", str(lora), "--out", f"{tmp_path}/out/"]
    line = one_error(*run(args, capsys)[::2])
    assert "mine.safetensors is not a FLUX.1 LoRA diffusers can read" in line
    assert "lora_unet_single_blocks_0_linear1" in line and "AssertionError" in line


@pytest.mark.slow
def test_a_lora_diffusers_cannot_load_into_the_transformer_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    from diffusers import FluxPipeline

    def refuse(self, *args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for FluxTransformer2DModel: size mismatch")

    from diffusers import FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict
    from test_lora import add_lora

    model = FluxTransformer2DModel.from_pretrained(tiny, subfolder="transformer")
    add_lora(model, "x", seed=8)  # a LoRA of the tiny transformer, saved as diffusers does
    layers = get_peft_model_state_dict(model, adapter_name="x")
    FluxPipeline.save_lora_weights(tmp_path / "l", transformer_lora_layers=layers)
    monkeypatch.setattr(FluxPipeline, "load_lora_weights", refuse)
    lora = tmp_path / "l" / "pytorch_lora_weights.safetensors"
    args = ["a", *common(tiny), "--res", "128", "--lora", str(lora), "--out", f"{tmp_path}/out/"]
    line = one_error(*run(args, capsys)[::2])
    assert "pytorch_lora_weights.safetensors is not a FLUX.1 LoRA diffusers can load" in line
    assert "Error(s) in loading state_dict for FluxTransformer2DModel" in line


# ---------------------------------------------------------------- 9. a mistyped command


@pytest.mark.parametrize(
    "typed, meant", [("weight", "weights"), ("upscal", "upscale"), ("dowlnoad", "download")]
)
def test_a_mistyped_command_is_refused_not_generated_from(capsys, monkeypatch, typed, meant):
    from clear_gen.cli import generating

    monkeypatch.setattr(generating, "generate", lambda *a, **k: pytest.fail("generated"))
    code, _, err = run([typed, "x.png"], capsys)
    line = one_error(code, err)
    hint = f"(quote a one-word prompt: clear-gen -- {typed})"
    assert line == f"error: no such command {typed!r}; did you mean {meant!r}? {hint}"


def test_a_one_word_prompt_after_a_double_dash_and_prompts_far_from_commands_generate(capsys):
    for argv in (["--", "weight"], ["castle"], ["a weight"]):
        code, out, err = run([*argv, "--res", "512", "--dry-run", "--json"], capsys)
        assert code == 0 and json.loads(out)["stages"][0]["width"] == 512, err


# ---------------------------------------------------------------- 10. bench's documented CPU shape


def test_bench_measurements_on_a_cpu_default_to_the_documented_small_shape():
    """`bench --what step --res 256` on a CPU refused with FLUX.1-dev's 24 x 128 heads ("needs 47.3 GB")."""
    from clear_gen.bench.spec import bench_options, parse_bench

    for what in ("attention", "step", "image"):
        spec = parse_bench(bench_options(what, device="cpu"))
        assert (spec.heads, spec.head_dim, spec.vae_channels) == (2, 64, 8), what
    plan = parse_bench(bench_options("plan", device="cpu"))  # measures nothing: FLUX.1-dev's shape
    assert (plan.heads, plan.head_dim) == (24, 128)
    given = parse_bench(bench_options("step", device="cpu", heads=4, head_dim=32))
    assert (given.heads, given.head_dim) == (4, 32)


# ---------------------------------------------------------------- smaller ones


def saved(path: Path, **fields) -> Path:
    """A PNG with a clear-gen record, as generate or compare writes it."""
    from clear_gen.files.output import save_png
    from clear_gen.files.record import ImageRecord

    record = ImageRecord(**{"prompt": "a red castle", "seed": 3, "model": "dev", "steps": 2, "guidance": 3.5,
                            "width": 256, "height": 192, "variant": "r8", "window": 8, "down_factor": 1,
                            "stages": [128, 256], "strength": 0.6, **fields})  # fmt: skip
    return Path(save_png(Image.new("RGB", (record.width, record.height)), path, record))


@pytest.mark.parametrize(
    "args, says",
    [
        (["--res", "1000"], "size 1000x1000 is not a multiple of 16; try --res 1008"),
        (["--width", "1000", "--height", "600"], "try --width 1008 --height 608"),
        (["--res", "256", "--upscale-from", "512"], "--upscale-from 512 must be smaller than the target's"),
    ],
)
def test_size_errors_name_the_flags_the_user_gave(capsys, args, says):
    code, _, err = run(["a", *args, "--dry-run"], capsys)
    assert says in one_error(code, err)


def test_from_with_a_new_size_recomputes_the_stages(tmp_path, capsys):
    """`--from x.png --res 512` refused: the record's stages (128, 256) did not end at the size given."""
    png = saved(tmp_path / "x.png")
    code, out, err = run(["--from", str(png), "--res", "2048", "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert [max(s["width"], s["height"]) for s in json.loads(out)["stages"]] == [1024, 2048]


def test_from_on_a_compare_grid_says_it_is_one(tmp_path, capsys):
    compared = {"variants": ["full", "r8"], "panels": ["/x/a-full.png", "/x/a-r8.png"]}
    png = saved(tmp_path / "grid.png", variant="none,r8", window=None, extra={"compare": compared})
    code, _, err = run(["--from", str(png), "--dry-run"], capsys)
    line = one_error(code, err)
    assert (
        "is a compare grid of none,r8: --from takes one of its panels' images (a-full.png, a-r8.png)" in line
    )


@pytest.mark.parametrize("failure", [KeyboardInterrupt, None])
def test_ctrl_c_says_interrupted_and_leaves_no_empty_out_folder_it_made(
    tiny, tmp_path, capsys, monkeypatch, failure
):
    """Ctrl-C exited 130 silently (Typer swallows it) and left the empty --out folder it had created; a run
    refused after creating it (here: no memory) leaves none either."""
    from clear_gen.plan import gpus
    from clear_gen.run import generate

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    if failure is KeyboardInterrupt:
        monkeypatch.setattr(generate, "make_image", stop)  # Ctrl-C in the first image
    else:
        monkeypatch.setattr(gpus, "available_memory", lambda: 2**20)
    kept = tmp_path / "kept"
    kept.mkdir()
    args = ["a", *common(tiny), "--res", "128", "--no-compare-full"]
    code, _, err = run([*args, "--out", f"{tmp_path}/new/deeper/"], capsys)
    assert not (tmp_path / "new").exists()
    if failure is KeyboardInterrupt:
        assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted: the images saved so far")
        code, _, err = run([*args, "--out", f"{kept}/"], capsys)
        assert code == 130 and kept.is_dir()  # a folder that was there stays
    else:
        assert code == 1


@pytest.mark.parametrize("command", [[], ["generate"], ["upscale"], ["compare"], ["bench"], ["download"]])
def test_help_shows_no_bool_metavars_no_parenthesised_defaults_and_one_line_descriptions(
    capsys, monkeypatch, command
):
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0 and "<bool>" not in out and "[default: (" not in out
    assert re.search(r"--help +Show this message", out)  # no type between the flag and its help
    if not command:  # each command's description on one line of the list
        rows = [line for line in out.splitlines() if line.startswith("│ ")]
        listed = rows[rows.index(next(r for r in rows if r.startswith("│ version "))) :]
        assert all(not r.startswith("│           ") for r in listed), listed


def test_an_assumed_gpu_of_a_size_no_card_has_is_not_labelled_as_that_card(capsys):
    code, out, err = run(["a", "--gpu-memory", "4", "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["rate_source"].startswith("no 4 GB card in the table: RTX 4080's rate assumed")
    code, out, err = run(["a", "--gpu-memory", "24", "--dry-run", "--json"], capsys)
    assert json.loads(out)["rate_source"].startswith("table: RTX 4090")


@pytest.mark.slow
def test_a_prompt_longer_than_the_text_encoders_read_gets_one_note(tiny, tmp_path, capsys):
    long = " ".join(["a red castle on a hill"] * 200)  # 1,200 words
    args = [*common(tiny), "--res", "128", "--steps", "1", "--no-compare-full", "--out", f"{tmp_path}/"]
    code, _, err = run([long, *args], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "is cut:" in line]
    assert len(notes) == 1 and "CLIP 77 of" in notes[0] and "T5 16 of" in notes[0], notes
    code, _, err = run(["a red castle", *args], capsys)
    assert code == 0 and "is cut:" not in err


@pytest.mark.parametrize(
    "given, split",
    [
        ("C:/loras/x.safetensors", ("C:/loras/x.safetensors", 1.0)),  # the drive letter is not a scale
        ("C:\\loras\\x.safetensors:0.5", ("C:\\loras\\x.safetensors", 0.5)),
        ("style.safetensors:0.8", ("style.safetensors", 0.8)),
        ("owner/repo", ("owner/repo", 1.0)),
    ],
)
def test_a_lora_path_with_a_drive_letter_keeps_it(given, split):
    from clear_gen.weights.lora import _split_scale

    assert _split_scale(given) == split


@pytest.mark.slow
def test_the_record_names_the_backend_that_ran_and_from_asks_what_was_asked(tiny, tmp_path, capsys):
    from clear_gen.files.record import record_from_image
    from clear_gen.plan.records import options_from_record

    args = ["a", *common(tiny, "--window", "2"), "--res", "128", "--steps", "1", "--no-compare-full"]
    code, out, err = run([*args, "--out", f"{tmp_path}/", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    extra = row["extra"]  # auto's choice for 80 keys on a CPU, and what was asked
    assert extra["backend"] == "dense" and extra["backend_asked"] == "auto"
    assert options_from_record(record_from_image(Path(row["path"]))).backend == "auto"
    code, out, err = run(["info", row["path"]], capsys)
    assert code == 0 and re.search(r"backend +│ dense", out), out


def test_the_plan_says_when_quantizing_would_offload_less(capsys):
    """At 24 GB the plan chose sequential offload without saying that --quantize fp8 would avoid it."""
    code, out, err = run(["a", "--res", "2048", "--dry-run", "--gpu-memory", "24", "--json"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["offload"] == "sequential", err
    assert plan["hint"].startswith("--quantize fp8 would run with --offload model (~")
    code, out, err = run(["a", "--res", "2048", "--dry-run", "--gpu-memory", "24"], capsys)
    assert "; --quantize fp8 would run with --offload model" in out  # on the offload line
    for more in (["--quantize", "fp8"], ["--offload", "sequential"], ["--gpu-memory", "80"]):
        args = ["a", "--res", "2048", "--dry-run", "--gpu-memory", "24", *more, "--json"]
        code, out, err = run(args, capsys)
        assert code == 0 and json.loads(out.splitlines()[-1])["hint"] is None, more


def test_auto_takes_the_exact_dense_kernel_below_one_flex_block_on_a_cpu():
    """Item 1: the compiled CPU flex kernel was reported wrong below one 128-token block (fresh inductor
    cache); auto passes it over there. An asked flex still runs flex (test_attention's fresh-cache test)."""
    from clear_gen.attention.backends import choose
    from clear_gen.core.geometry import image_geometry

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    short, long = image_geometry(16, 8, 8, 2), image_geometry(16, 16, 16, 2)  # 80 and 272 keys
    assert short.kv_len < 128 <= long.kv_len
    assert choose("auto", cpu, short).name == "dense" and choose("auto", cpu, long).name == "flex"
    assert choose("auto", cuda, short).name == "flex" and choose("flex", cpu, short).name == "flex"


def test_diffusers_own_deprecation_warnings_do_not_reach_cli_users():
    """diffusers' ControlNet warns that FluxPosEmbed moved (a FutureWarning on every ControlNet run); without
    the CLI's main the same process prints it."""
    import subprocess
    import sys

    code = (
        "from clear_gen.cli.app import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "from diffusers import FluxControlNetModel\n"
        "FluxControlNetModel(num_layers=1, num_single_layers=0, attention_head_dim=16,\n"
        "                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,\n"
        "                    in_channels=16)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "FutureWarning" not in done.stderr, done.stderr


def test_a_huge_count_is_refused_at_once(capsys):
    """`--count 100000000` allocated 2.2 GB of seeds and jobs before the first image."""
    import tracemalloc

    run(["a", "--count", "20000", "--dry-run"], capsys)  # every module imported before measuring
    tracemalloc.start()
    code, _, err = run(["a", "--count", "100000000", "--dry-run"], capsys)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "--count 100000000 is more than 10000 images; run several batches" in one_error(code, err)
    assert peak < 20e6  # bytes: nothing sized by the count was made (its seeds alone: 800 MB)
