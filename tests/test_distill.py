"""`clear-gen distill` on the tiny FLUX pipeline (CPU, no network): data, gradients, training, errors."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli as run
from conftest import tiny_inputs, tiny_transformer
from safetensors.torch import load_file

from clear_gen import models
from clear_gen.attention import apply_clear, original_attention
from clear_gen.attention.backends import clear_attention
from clear_gen.attention.processor import pool_keys
from clear_gen.attention.weights import expected_checkpoint
from clear_gen.core.geometry import (
    Geometry,
    block_mask,
    image_geometry,
    inverse_order,
    make_mask_mod,
    tile_order,
)
from clear_gen.distill import DataOptions, TrainOptions, make_data, train
from clear_gen.distill.data import Samples, base_id
from clear_gen.distill.losses import attention_layers, noised, sigmas
from clear_gen.distill.train import TrainHooks
from clear_gen.models.flux1 import pack_latents as pack

pytestmark = pytest.mark.usefixtures("offline_hub")

RES, WINDOW, DOWN = 128, 2, 2  # an 8 x 8 token grid
PROMPTS = "a red cube\n# a comment\na blue ball\na green tree\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tensors are tiny, and on a busy machine threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_options(tiny: Path, out: Path, prompts: Path, count: int = 4) -> DataOptions:
    return DataOptions(
        out=out, model=str(tiny), prompts_file=prompts, count=count, res=RES, steps=2, max_sequence_length=16,
        validation_prompts=prompts,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tiny, tmp_path_factory) -> Path:
    """Four samples of the tiny teacher at 128 px (module-wide, read-only: copy it to change it)."""
    root = tmp_path_factory.mktemp("distill")
    (root / "prompts.txt").write_text(PROMPTS)
    make_data(data_options(tiny, root / "data", root / "prompts.txt"))
    return root / "data"


def options(tiny: Path, data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(
        data=data, out=out, window=WINDOW, down_factor=DOWN, model=str(tiny), res=RES, steps=4, batch=2,
        accumulate=1, validate_steps=0, loss_weights=(1.0, 0.5, 0.5),
    )  # fmt: skip
    return TrainOptions(**(base | kw))


def train_args(tiny: Path, data: Path, out: Path, *extra: str) -> list[str]:
    common = ["--model", str(tiny), "--res", str(RES), "--window", str(WINDOW), "--down-factor", str(DOWN)]
    return ["distill", "train", "--data", str(data), "--out", str(out), *common, "--batch", "2", *extra]


# ---------------------------------------------------------------- data


def test_make_data_writes_samples_and_resumes_without_redoing_them(tiny, data, tmp_path, capsys):
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["res"] == RES and manifest["count"] == 4 and manifest["text_len"] == 16
    samples = sorted((data / "samples").glob("*.safetensors"))
    assert len(samples) == 4
    first = load_file(str(samples[0]))
    assert first["mean"].shape == first["std"].shape == (16, RES // 8, RES // 8)
    assert first["prompt_embeds"].shape == (16, 32) and first["pooled"].shape == (32,)
    assert bool((first["std"] > 0).all())
    assert len(list((data / "validation").glob("*.safetensors"))) == 3  # the prompts file's three prompts
    # An interrupted run (one sample missing) and a larger --count: only the missing ones are made.
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "samples" / "000002.safetensors").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "samples").iterdir()}
    args = ["distill", "make-data", "--model", str(tiny), "--res", str(RES), "--steps", "2"]
    prompts = data.parent / "prompts.txt"
    args += [
        "--max-sequence-length",
        "16",
        "--prompts-file",
        str(prompts),
        "--validation-prompts",
        str(prompts),
    ]
    code, _, err = run(args + ["--count", "5", "--out", str(copy)], capsys)
    assert code == 0, err
    assert "2 made now, 3 already there" in err
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "samples").iterdir()}
    assert len(after) == 5 and all(after[name] == t for name, t in before.items())
    remade = load_file(str(copy / "samples" / "000002.safetensors"))
    original = load_file(str(data / "samples" / "000002.safetensors"))
    assert all(torch.equal(remade[k], original[k]) for k in original)  # seed + index: the same sample


def test_make_data_from_images_with_prompt_files(tiny, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (160, 128), color).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a red square\n")
    (folder / "1.json").write_text(json.dumps({"prompt": "a green square"}))  # 2.png has no prompt
    notes = []
    opts = DataOptions(out=tmp_path / "d", model=str(tiny), images=folder, res=RES, max_sequence_length=16)
    summary = make_data(opts, note=notes.append)
    assert (summary.made, summary.count) == (2, 2)
    assert any("1 images skipped" in n for n in notes)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["source"] == str(folder.resolve())
    assert load_file(str(tmp_path / "d" / "samples" / "000001.safetensors"))["mean"].shape == (16, 16, 16)


def test_cost_model_counts_the_published_key_set():
    from clear_gen.core.flops import FluxShape
    from clear_gen.distill.cost import step_cost, trainable_parameters

    model = tiny_transformer()
    for f in (1, 2):
        shapes = expected_checkpoint(model, f).values()
        assert trainable_parameters(FluxShape(2, 16, 1, 1), f) == sum(math.prod(s) for s in shapes)
    cost = step_cost(FluxShape(), 1024, 16)  # FLUX.1-dev: 1.79B trainable, ~300 TFLOP a sample
    assert trainable_parameters(FluxShape()) == 1_793_648_640
    assert 2.9e14 < cost.flops < 3.1e14 and 60e9 < cost.peak_bytes < 80e9


def test_losses_pieces_follow_the_recipe():
    assert attention_layers(38) == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37]
    assert attention_layers(1) == [0] and attention_layers(2) == [1]
    assert sigmas(torch.tensor([0.0, 0.0005, 0.9999])).tolist() == pytest.approx([1.0, 1.0, 0.001])
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 4)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 6, 4))


# ---------------------------------------------------------------- masks and gradients


def q_lists(mask) -> list[tuple[set[int], set[int]]]:
    """Per key block: (query blocks computed with the mask_mod, query blocks computed without it)."""
    out = []
    for j in range(mask.q_num_blocks.shape[-1]):
        partial = mask.q_indices[0, 0, j, : mask.q_num_blocks[0, 0, j]].tolist()
        full = mask.full_q_indices[0, 0, j, : mask.full_q_num_blocks[0, 0, j]].tolist()
        out.append((set(partial), set(full)))
    return out


@pytest.mark.parametrize(
    "geo", [Geometry(128, 16, 32, 3), Geometry(256, 16, 16, 8), Geometry(128, 32, 64, 8, 4)], ids=str
)
def test_training_block_mask_has_the_query_block_lists_of_create_block_mask(geo):
    """Sequences of whole blocks. (With a partial last block, create_block_mask calls blocks that touch
    the padding partial where ours calls them full, as FlexAttention masks the padding anyway.)"""
    from torch.nn.attention.flex_attention import create_block_mask

    assert geo.q_len % 128 == 0 and geo.kv_len % 128 == 0
    ours = block_mask(geo, "cpu", True)
    exact = create_block_mask(make_mask_mod(geo), 1, 1, geo.q_len, geo.kv_len, device="cpu")
    assert block_mask(geo, "cpu").q_indices is None  # inference builds none
    assert q_lists(ours) == q_lists(exact)
    # A padded sequence: the same query blocks are computed, with or without the mask_mod.
    padded = Geometry(7, 20, 36, 4)
    exact = create_block_mask(make_mask_mod(padded), 1, 1, padded.q_len, padded.kv_len, device="cpu")
    union = lambda mask: [a | b for a, b in q_lists(mask)]  # noqa: E731
    assert union(block_mask(padded, "cpu", True)) == union(exact)


def reference_attention(q, k, v, s, text_len, h, w, r, scale):
    """CLEAR from its definition on row-major (B, L, H, D) tokens: loops for the mask and the pooling."""
    f = s.shape[0]
    n, m = h * w, (h // f) * (w // f)
    grid = lambda x: x[:, text_len:].unflatten(1, (h, w))  # noqa: E731  (B, h, w, H, D)
    pooled = []
    for x in (k, v):
        cells = [sum(s[i, j] * grid(x)[:, cy * f + i, cx * f + j] for i in range(f) for j in range(f))
                 for cy in range(h // f) for cx in range(w // f)]  # fmt: skip
        pooled.append(torch.cat([x, torch.stack(cells, 1)], 1))
    mask = torch.zeros(text_len + n, text_len + n + m, dtype=torch.bool)
    mask[:text_len, : text_len + n] = True
    mask[text_len:, :text_len] = mask[text_len:, text_len + n :] = True
    for a in range(n):
        for b in range(n):
            mask[text_len + a, text_len + b] = (a // w - b // w) ** 2 + (a % w - b % w) ** 2 < r * r
    scores = torch.einsum("bqhd,bkhd->bhqk", q, pooled[0]) * scale
    weights = scores.masked_fill(~mask, -math.inf).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, pooled[1])


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_backend_gradients_match_the_reference(backend):
    """q, k, v and spatial weights' gradients, as distill's CPU and MPS backward computes them (gather)."""
    text_len, h, w, r, f, heads, dim = 5, 8, 8, 3, 2, 2, 8
    geo = image_geometry(text_len, h, w, r, f)
    perm, inv = tile_order(h, w, geo.tile), inverse_order(h, w, geo.tile)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, text_len + h * w, heads, dim, generator=g) for _ in range(3))
    s = (torch.rand(f, f, generator=g) + 0.5).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    upstream = torch.randn(2, text_len + h * w, heads, dim, generator=g)

    def tiled(x):  # (B, L, H, D): image tokens into tile order
        return torch.cat([x[:, :text_len], x[:, text_len:][:, perm]], 1)

    # CLEAR's path: tile order, pooled keys, the backend; then back to row-major.
    qt, kt, vt = tiled(q), tiled(k), tiled(v)
    weight = s.view(1, 1, 1, f, 1, f, 1)
    kt = torch.cat([kt, pool_keys(kt[:, text_len:], geo, inv, weight)], 1)
    vt = torch.cat([vt, pool_keys(vt[:, text_len:], geo, inv, weight)], 1)
    out = clear_attention(*(t.transpose(1, 2) for t in (qt, kt, vt)), geo, dim**-0.5, backend).transpose(1, 2)
    ours = torch.cat([out[:, :text_len], out[:, text_len:][:, inv]], 1)
    grads = torch.autograd.grad(ours, (q, k, v, s), upstream)
    expected = reference_attention(q, k, v, s, text_len, h, w, r, dim**-0.5)
    want = torch.autograd.grad(expected, (q, k, v, s), upstream)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)  # pooling sums in float32
    for name, a, b in zip("qkvs", grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_gradients_match_dense_on_cuda():
    geo = image_geometry(512, 32, 32, 8, 4)
    g = torch.Generator("cuda").manual_seed(0)
    lengths = (geo.q_len, geo.kv_len, geo.kv_len)
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", generator=g) for n in lengths)
    upstream = torch.randn(1, 4, geo.q_len, 64, device="cuda", generator=g)
    results = []
    for backend in ("flex", "dense"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = clear_attention(*leaves, geo, 0.125, backend)
        results.append((out, *torch.autograd.grad(out, leaves, upstream)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_teacher_is_the_stock_model_inside_original_attention():
    stock, model = tiny_transformer(), tiny_transformer()
    inputs = tiny_inputs(1, 5, 8, 8)
    g = torch.Generator().manual_seed(5)
    trained = {k: torch.randn(s, generator=g) * 0.1 for k, s in expected_checkpoint(model, 2).items()}
    with torch.no_grad():
        want = stock(**inputs).sample
        apply_clear(model, window=2, down_factor=2, state_dict=trained, backend="dense")
        clear = model(**inputs).sample
        with original_attention(model):
            teacher = model(**inputs).sample
        again = model(**inputs).sample
    assert torch.equal(teacher, want)
    assert torch.equal(again, clear) and not torch.allclose(clear, want)


# ---------------------------------------------------------------- training


def prediction_gap(tiny: Path, data: Path, weights) -> float:
    """MSE between the tiny teacher's and a CLEAR student's velocities on fixed noised samples."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    vae = types.SimpleNamespace(config=types.SimpleNamespace(**AutoencoderKL.load_config(tiny / "vae")))
    batch = Samples(data, base_id(str(tiny)), RES).batch([0, 1, 2, 3], torch.device("cpu"), torch.float32)
    draws = [[torch.Generator().manual_seed(seed * 4 + i) for i in range(4)] for seed in range(3)]
    inputs = [noised(models.family("flux1"), batch, vae, 3.5, generators).inputs for generators in draws]
    with torch.no_grad():
        teacher = [model(**x)[0] for x in inputs]
        apply_clear(model, window=WINDOW, down_factor=DOWN, state_dict=weights, backend="dense")
        student = [model(**x)[0] for x in inputs]
    return sum(F.mse_loss(a, b).item() for a, b in zip(student, teacher, strict=True)) / len(inputs)


def test_distilling_lowers_the_prediction_loss_and_saves_the_published_keys(tiny, data, tmp_path):
    out = tmp_path / "clear.safetensors"
    opts = options(tiny, data, out, steps=30, optimizer="adamw", lr=3e-3, loss_weights=(0.0, 1.0, 1.0))
    result = train(opts)
    saved = load_file(str(out))
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    assert saved.keys() == expected_checkpoint(model, DOWN).keys()
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    before, after = prediction_gap(tiny, data, None), prediction_gap(tiny, data, saved)
    assert after < 0.75 * before, (before, after)
    rows = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "loss_fm", "loss_pred", "loss_attn"} <= rows[0].keys()


def test_resumed_run_reaches_the_same_weights(tiny, data, tmp_path, capsys):
    whole = options(tiny, data, tmp_path / "a" / "w.safetensors", steps=4, validate_steps=2)
    (tmp_path / "a").mkdir()
    result = train(whole)
    assert result.validation["ssim"] > 0 and Path(result.validation["path"]).is_file()
    # Ctrl-C after step 2: the step ends, everything is saved, and the same command with --resume goes on.
    out = tmp_path / "b" / "w.safetensors"
    (tmp_path / "b").mkdir()

    def interrupt(record: dict) -> None:
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(options(tiny, data, out, steps=4), TrainHooks(step=interrupt))
    assert stopped.interrupted and stopped.step == 2
    more = ["--steps", "4", "--accumulate", "1", "--validate-steps", "0", "--resume", str(stopped.resume)]
    code, _, err = run(train_args(tiny, data, out, *more), capsys)
    assert code == 0, err
    a, b = load_file(str(result.out)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in stopped.log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # The weights load as published ones do.
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    apply_clear(model, window=WINDOW, down_factor=DOWN, state_dict=b)
    # Another (r, f) cannot continue this run.
    code, _, err = run(train_args(tiny, data, tmp_path / "c.safetensors", "--window", "3", "--resume",
                                  str(stopped.resume)), capsys)  # fmt: skip
    assert code == 1 and "r=2, f=2" in err and "Traceback" not in err


def test_two_process_ddp_matches_one_process_with_the_same_batch(tiny, data, tmp_path):
    """torchrun with gloo on the CPU: 2 processes x batch 1 train on the draws of 1 process x batch 2."""
    one = train(options(tiny, data, tmp_path / "one.safetensors", steps=2, optimizer="adamw", lr=1e-3))
    args = train_args(tiny, data, tmp_path / "two.safetensors", "--steps", "2", "--optimizer", "adamw")
    args[args.index("--batch") + 1] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "clear_gen", *args, "--accumulate", "1", "--lr", "1e-3", "--validate-steps", "0"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(one.resume, weights_only=True)["weights"]  # full precision, unlike the bf16 output
    b = torch.load(tmp_path / "two.resume.pt", weights_only=True)["weights"]
    base = load_file(str(tiny / "transformer" / "diffusion_pytorch_model.safetensors"))
    key = "single_transformer_blocks.0.attn.to_q.weight"
    assert (a[key] - base[key]).abs().max() > 1e-3  # they trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    steps = [json.loads(line) for line in (tmp_path / "two.log.jsonl").read_text().splitlines()]
    first = json.loads(one.log.read_text().splitlines()[0])
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(first["loss"], rel=1e-5)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(tiny, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "w.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (train_args(tiny, empty, out), "has no samples"),
        (train_args(tiny, data, out, "--res", "256"), "at 128 px"),
        (train_args(tiny, data, out, "--window", "12"), "covers the whole 8 x 8 token grid"),
        (train_args(tiny, data, out, "--down-factor", "3"), "not a multiple of 192"),
        (train_args(tiny, data, out, "--loss-weights", "1,2"), "three numbers"),
        (train_args(tiny, data, out, "--optimizer", "sgd"), "unknown --optimizer"),
        (["distill", "make-data", "--model", str(tiny), "--out", str(tmp_path / "d")], "--prompts-file"),
    ]
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    cases.append((train_args(other, data, out), f"holds data of {tiny.resolve()}"))
    for args, message in cases:
        code, _, err = run(args, capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    # An earlier run's resume file is not overwritten by a fresh start.
    (tmp_path / "w.resume.pt").write_bytes(b"")
    code, _, err = run(train_args(tiny, data, out), capsys)
    assert code == 1 and "--resume" in err
    # A missing optimiser package, and running out of GPU memory, say what to do.
    T = importlib.import_module(
        "clear_gen.distill.train"
    )  # the module (the package's `train` is the function)

    real = importlib.util.find_spec
    missing = lambda name: None if name == "prodigyopt" else real(name)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    code, _, err = run(train_args(tiny, data, tmp_path / "x.safetensors"), capsys)
    assert code == 1 and "pip install prodigyopt" in err
    monkeypatch.undo()

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(T, "_prepare", oom)
    code, _, err = run(train_args(tiny, data, tmp_path / "y.safetensors"), capsys)
    assert code == 1 and "--batch 1" in err and "adamw8bit" in err and "checkpointing" in err


def test_distill_bench_runs_the_training_loop_on_random_weights():
    import runpy

    bench = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "distill_bench.py"))
    tiny = (
        "--device cpu --layers 3 --heads 2 --head-dim 32 --res 128 --text-len 16 --window 4 --down-factor 2"
    )
    result = bench["main"](tiny.split() + ["--steps", "2"])
    assert result["step_s"] > 0 and result["peak_gb"] is None and result["estimated_tflop_per_sample"] > 0


def test_distill_is_a_command_group_not_a_prompt(capsys):
    code, out, _ = run(["distill", "--help"], capsys)
    assert code == 0 and "make-data" in out and "train" in out
