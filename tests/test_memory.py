"""The memory plan (memory.py, shapes.py, gpus.py), feed-forward chunking and `--dry-run`: CPU only.

Parameter counts are checked against diffusers' and transformers' own models built on the 'meta'
device; activations against the live bytes of a full-width FLUX forward pass on 'meta' (live_bytes.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run
from conftest import tiny_inputs, tiny_transformer
from live_bytes import LiveBytes, flash_like_clear, flash_like_sdpa

import clear_gen.attention as A
from clear_gen.attention import processor
from clear_gen.core.positions import Grid, GridCache
from clear_gen.errors import ConfigError
from clear_gen.models.flux1.activations import vae_activations
from clear_gen.models.flux1.chunking import chunk_feed_forward, chunk_tokens
from clear_gen.models.flux1.shapes import TransformerConfig, clear_params, transformer_params
from clear_gen.plan import footprint, gpus
from clear_gen.plan.footprint import step_activations, weight_bytes
from clear_gen.plan.memory import plan_run
from clear_gen.plan.spec import GenerateOptions
from clear_gen.weights.shapes import model_shapes

ROOT = Path(__file__).resolve().parents[1]
DEV = TransformerConfig()  # FLUX.1-dev's transformer config (shapes.toml)
DEV_SHAPES = model_shapes("dev")  # its shapes, as the plan reads them
C = 3072


def meta_flux(**config):
    """FluxTransformer2DModel with FLUX.1-dev's config (diffusers' defaults but for the guidance embedder)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**{"guidance_embeds": True, **config})


def counts(model) -> tuple[int, int, int]:
    """(all parameters, Linear weights, Linear output rows), counted on the module itself."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(p.numel() for p in model.parameters())
    return total, sum(m.weight.numel() for m in linears), sum(m.weight.shape[0] for m in linears)


def opts(**kw) -> GenerateOptions:
    return GenerateOptions(prompts=["a castle"], **kw)


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("guidance", [True, False])  # dev, schnell
def test_transformer_parameters_are_diffusers_own(guidance):
    total, linear, rows = counts(meta_flux(guidance_embeds=guidance))
    params = transformer_params(TransformerConfig(guidance_embeds=guidance))
    assert (params.total, params.linear, params.rows) == (total, linear, rows)
    if guidance:
        assert total == 11_901_408_320  # FLUX.1-dev: 23.8 GB in bf16


def test_weight_bytes_per_dtype_are_exact_and_quantized_ones_follow_the_table():
    total, linear, rows = counts(meta_flux())
    params = transformer_params(DEV)
    assert weight_bytes(params, "none", 2) == 2 * total == 23_802_816_640  # bf16 / fp16
    assert weight_bytes(params, "none", 4) == 4 * total  # fp32
    other, largest = total - linear, 6 * C * C  # a double block's adaLN modulation: C -> 6C
    assert weight_bytes(params, "fp8", 2) == linear + 4 * rows + 2 * (other + largest)
    assert weight_bytes(params, "int8", 2) == linear + 4 * rows + 2 * (other + largest)
    assert weight_bytes(params, "nf4", 2) == math.ceil(linear * (0.5 + 4 / 64)) + 2 * (other + largest)
    assert 6.5e9 < weight_bytes(params, "nf4", 2) < 7.0e9 < 11.9e9 < weight_bytes(params, "fp8", 2) < 12.1e9


def test_text_encoders_and_vae_are_their_libraries_own():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        t5 = T5EncoderModel(
            T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                     feed_forward_proj="gated-gelu")
        )  # fmt: skip
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
    shapes = model_shapes("dev")
    for mine, theirs in ((shapes.text_small, clip), (shapes.text, t5)):
        assert (mine.total, mine.linear, mine.rows) == counts(theirs)
    assert shapes.vae == counts(vae)[0] == 83_819_683


def test_clear_checkpoint_size_is_what_apply_clear_expects():
    model = meta_flux()
    for f in (1, 4):
        expected = sum(math.prod(s) for s in A.expected_checkpoint(model, f).values())
        assert clear_params(DEV, f) == expected
    assert clear_params(DEV, 1) * 2 / 1e9 == pytest.approx(3.587, abs=1e-3)  # "3.6 GB" in bf16


def test_gguf_bytes_from_the_file_or_its_type():
    params = transformer_params(DEV)
    q4, note = footprint.gguf_bytes("city96/FLUX.1-dev-gguf/flux1-dev-Q4_K_S.gguf", params, 2)
    assert note is None and q4 == math.ceil(params.linear * 144 / 256) + 2 * (params.other + params.largest)
    q8, note = footprint.gguf_bytes("flux.gguf", params, 2)
    assert "Q8_0 assumed" in note and q8 > q4


def test_gguf_file_here_counts_its_size(tmp_path):
    path = tmp_path / "flux1-dev-Q4_0.gguf"
    path.write_bytes(b"\0" * 1000)
    got, note = footprint.gguf_bytes(str(path), transformer_params(DEV), 2)
    assert note is None and got == 1000 + 2 * 6 * C * C


# ---------------------------------------------------------------- activations


def live_peak(monkeypatch, side: int, clear: tuple[int, int] | None, chunk: int | None, dtype) -> int:
    """Peak live bytes of one forward pass of a full-width FLUX (1 double + 1 single block) on 'meta'."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", flash_like_sdpa)
    monkeypatch.setattr(processor, "clear_attention", flash_like_clear)
    monkeypatch.setattr(GridCache, "__call__", lambda self, ids: Grid(side, side))
    model = torch.nn.Module.to(meta_flux(num_layers=1, num_single_layers=1), dtype)
    if clear:
        A.apply_clear(model, window=clear[0], down_factor=clear[1], backend="dense")
    chunk_feed_forward(model, chunk)
    n, t = side * side, 512
    with torch.device("meta"):
        inputs = dict(
            hidden_states=torch.empty(1, n, 64, dtype=dtype),
            encoder_hidden_states=torch.empty(1, t, 4096, dtype=dtype),
            pooled_projections=torch.empty(1, 768, dtype=dtype),
            timestep=torch.empty(1, dtype=dtype),
            guidance=torch.empty(1, dtype=dtype),
            img_ids=torch.empty(n, 3),
            txt_ids=torch.empty(t, 3),
        )
    with torch.no_grad(), LiveBytes() as live:
        model(**inputs, return_dict=False)
    return live.peak


@pytest.mark.parametrize(
    "side, clear, chunk, dtype",
    [
        (128, None, None, torch.bfloat16),  # stock blocks and processor, 2048 px
        (128, None, 4096, torch.bfloat16),
        (128, (8, 1), None, torch.bfloat16),
        (256, (8, 4), 4096, torch.bfloat16),  # the default variant at 4096 px, chunked
        (256, (8, 1), None, torch.float32),
        (128, None, 4096, torch.float32),
    ],
)
def test_step_activations_match_live_bytes_of_a_full_width_forward(monkeypatch, side, clear, chunk, dtype):
    measured = live_peak(monkeypatch, side, clear, chunk, dtype)
    e = torch.empty(0, dtype=dtype).element_size()
    planned = step_activations(
        512, side * side, DEV_SHAPES, e, clear is not None, chunk, clear[1] if clear else 1
    )
    assert planned == pytest.approx(measured, rel=0.03)


def test_activations_at_8k_by_hand_and_chunking_halves_them():
    L, x = 512 + 512 * 512, (512 + 512 * 512) * C  # 262,656 tokens x 3072 channels
    tables = 2 * L * 128 * 4  # RoPE cos and sin, float32
    stock = tables + max(11 * x * 2 + 12 * x, 15 * x * 2)  # MLP alive through attention + RoPE's fp32
    assert step_activations(512, 512 * 512, DEV_SHAPES, 2, False, None) == stock == 27_702_853_632
    clear = step_activations(512, 512 * 512, DEV_SHAPES, 2, True, None)
    assert clear == tables + 15 * x * 2  # the stock block's concatenated output dominates
    chunked = step_activations(512, 512 * 512, DEV_SHAPES, 2, True, 4096)
    assert chunked == tables + 7 * x * 2 == 11_565_268_992  # 3 carried + q, k, v + 1: under half
    pooled = step_activations(512, 512 * 512, DEV_SHAPES, 2, True, 4096, down=4)
    assert pooled == chunked + 3 * (512 * 512 // 16) * C * 2  # pooled keys and values


def test_vae_memory_tiles_above_the_tile_size():
    assert vae_activations(1024, 1024, 2, "off", 1024, encode=False) == 768 * 2 * 1024 * 1024
    assert vae_activations(1024, 1024, 2, "exact", 1024, encode=False) == 768 * 2 * 1024 * 1024  # one tile
    fast = vae_activations(8192, 8192, 2, "fast", 1024, encode=False)
    untiled = vae_activations(8192, 8192, 2, "off", 1024, encode=False)
    assert fast == 768 * 2 * 1024 * 1024 + 5 * 2 * 8192 * 8192 < untiled / 30


# ---------------------------------------------------------------- chunking is exact


def _outputs(model, inputs, chunk):
    chunk_feed_forward(model, chunk)
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("clear", [None, (2, 1), (3, 2)])
def test_chunked_feed_forward_gives_identical_outputs(clear):
    model = tiny_transformer(layers=2, single_layers=2)
    inputs = tiny_inputs(1, 16, 16, 16)  # 16 text + 256 image tokens, float32
    if clear:
        A.apply_clear(model, window=clear[0], down_factor=clear[1], backend="dense")
    whole = _outputs(model, inputs, None)
    for chunk in (64, 100, 272):
        assert torch.equal(_outputs(model, inputs, chunk), whole)
    assert chunk_tokens(model) == 272


def test_unchunking_restores_the_stock_forwards():
    model = tiny_transformer(layers=1, single_layers=1)
    chunk_feed_forward(model, 64)
    chunk_feed_forward(model, 32)  # again: replaces, does not stack
    assert model.single_transformer_blocks[0].forward.args[2] == 32
    chunk_feed_forward(model, None)
    for module in (model.transformer_blocks[0].ff, model.single_transformer_blocks[0]):
        assert "forward" not in vars(module)
    assert chunk_tokens(model) is None
    with pytest.raises(ValueError):
        chunk_feed_forward(model, 0)


def test_clear_norm_and_rope_in_slices_give_identical_outputs(monkeypatch):
    model = tiny_transformer(layers=1, single_layers=1)
    inputs = tiny_inputs(1, 16, 16, 16)
    A.apply_clear(model, window=3, down_factor=2, backend="dense")
    with torch.no_grad():
        whole = model(**inputs, return_dict=False)[0]
        monkeypatch.setattr(processor, "ROPE_CHUNK_TOKENS", 50)  # text and image in several slices each
        sliced = model(**inputs, return_dict=False)[0]
    assert torch.equal(sliced, whole)


# ---------------------------------------------------------------- the plan and --offload auto


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU as torch would report it, with `free` GB free (set by calling the fixture)."""

    def install(free_gb: float, name: str = "NVIDIA GeForce RTX 4090", capability=(8, 9)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gb * 1e9), int(80e9)))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(gpus, "probe_tflops", lambda *a, **k: 100.0)

    return install


@pytest.mark.parametrize(
    "free_gb, offload",
    [(40, "none"), (30, "model"), (10, "sequential")],  # FLUX.1-dev bf16 at 1024 px: 34.0 / 24.5 / 1.9 GB
)
def test_auto_offload_follows_free_memory(fake_gpu, free_gb, offload):
    fake_gpu(free_gb)
    plan = plan_run(opts(variant="none"))
    assert (plan.offload, plan.fits, plan.device) == (offload, True, "NVIDIA GeForce RTX 4090")
    assert plan.peak_gb * 1.1 <= free_gb
    assert plan.offload_line().startswith(f"offload: {offload} (")


def test_offload_line_says_why(fake_gpu):
    fake_gpu(30)
    line = plan_run(opts(variant="none")).offload_line()
    assert line.startswith(
        "offload: model (none: plan 34.0 GB > 27.3 GB usable of 30.0 GB free; "
        "model: plan 24.5 GB <= 27.3 GB usable of 30.0 GB free); "
    )
    assert line.endswith("--quantize fp8 would run with --offload none (~18 s instead of ~20 s of denoising)")


def test_stage_weights_are_exact_with_everything_on_the_gpu():
    plan = plan_run(opts(variant="none", gpu_memory=200))  # no GPU here: a 200 GB one assumed
    assert plan.offload == "none" and plan.fits
    assert plan.stages[0].weights_gb * 1e9 == pytest.approx((11_901_408_320 + 83_819_683) * 2, abs=1)
    assert plan.encode_gb * 1e9 == pytest.approx(
        (11_901_408_320 + 83_819_683 + 4_762_310_656 + 123_060_480) * 2 + footprint.TEXT_ACTIVATIONS, abs=1
    )


def test_8k_with_fp8_or_nf4_fits_a_24_gb_card_thanks_to_chunking():
    for quantize in ("fp8", "nf4"):
        plan = plan_run(opts(width=8192, height=8192, quantize=quantize))
        assert plan.fits and plan.free_gb == 24.0 and plan.ff_chunk is not None
        assert plan.unchunked_peak_gb * 1.1 > 24.0  # it would not fit without chunking
        assert plan.stages[-1].attention == "CLEAR r=8 f=4" and plan.stages[-1].tokens == 262_144


def test_an_asked_offload_is_kept_and_said_not_to_fit():
    plan = plan_run(opts(width=4096, height=4096, offload="none"))
    assert plan.offload == "none" and not plan.fits and plan.fits_any
    assert plan.offload_line().startswith("offload: none (asked; plan ")


def test_cannot_fit_names_the_size_that_would():
    plan = plan_run(opts(width=8192, height=8192, gpu_memory=8))
    assert not plan.fits and not plan.fits_any and plan.offload == "sequential"
    w, h = plan.fits_at
    assert w == h and w < 8192 and w % 64 == 0
    line = plan.cannot_fit_line()
    assert "8192x8192 needs" in line and "even with --offload sequential" in line
    assert f"{w}x{h} would fit" in line
    assert plan_run(opts(width=w, height=h, gpu_memory=8)).fits
    bigger = w + 64
    assert not plan_run(opts(width=bigger, height=bigger, gpu_memory=8)).fits


def test_device_problems_are_reported_not_raised(fake_gpu):
    plan = plan_run(opts(quantize="nf4", quantize_text="nf4"))  # no CUDA on this machine
    assert len(plan.problems) == 2 and all("needs a CUDA GPU" in p for p in plan.problems)
    assert "int8 or fp8" in plan.problems[0]
    fake_gpu(24, "NVIDIA GeForce RTX 3090", (8, 6))
    plan = plan_run(opts(quantize="fp8dq"))
    assert plan.problems == [  # the one device check, quantize.device_problems, on the planned card
        "--quantize fp8dq needs fp8 matmuls (compute capability 8.9+: RTX 40xx, L4, H100); "
        "NVIDIA GeForce RTX 3090 is 8.6: use --quantize fp8 (same memory) or int8"
    ]


def test_unknown_modes_are_config_errors():
    for bad in (dict(quantize="q2"), dict(quantize_text="fp8dq"), dict(offload="disk"), dict(gpu_memory=0)):
        with pytest.raises(ConfigError):
            plan_run(opts(**bad))


def test_a_cpu_run_plans_no_gpu(monkeypatch):
    monkeypatch.setattr(gpus, "available_memory", lambda: 512 * 2**30)  # room for fp32 FLUX.1-dev
    plan = plan_run(opts(device="cpu", width=512, height=512))
    assert not plan.gpu and plan.fits and plan.offload == "none" and plan.dtype == "fp32"
    assert plan.rate_tflops > 0 and plan.stages[0].time_s > 0


def test_table_card_rates():
    assert gpus.card_named("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert gpus.card_named("NVIDIA A100-SXM4-80GB").name == "A100"
    assert gpus.card_named("NVIDIA A10").name == "A10"
    assert gpus.card_named("NVIDIA L40S").name == "L40S" and gpus.card_named("NVIDIA L4").name == "L4"
    assert gpus.card_for_memory(24).name == "RTX 4090" and gpus.card_for_memory(80).name == "H100"


# ---------------------------------------------------------------- --dry-run and the real run


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way weights come in fails the test."""
    import huggingface_hub

    import clear_gen.weights.hub
    import clear_gen.weights.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded or fetched weights")

    for module, name in (
        (clear_gen.weights.loading, "load_pipeline"),
        (clear_gen.weights.loading, "load_clear_weights"),
        (clear_gen.weights.hub, "fetch_base"),
        (clear_gen.weights.hub, "fetch_variant"),
        (huggingface_hub, "snapshot_download"),
        (huggingface_hub, "hf_hub_download"),
    ):
        monkeypatch.setattr(module, name, refuse)


def test_dry_run_json_has_every_field(nothing_loads, capsys):
    code, out, err = run(["a castle", "--res", "8192", "--dry-run", "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert {"offload", "quantize", "fits", "stages", "peak_gb", "time_s", "device", "problems"} <= plan.keys()
    assert plan["offload"] == "sequential" and plan["fits"] is True and plan["estimate"] is True
    for stage in plan["stages"]:
        assert {"width", "height", "tokens", "peak_gb", "time_s", "density", "attention"} <= stage.keys()
    assert [(s["width"], s["tokens"]) for s in plan["stages"]] == [(1024, 4096), (8192, 262_144)]


def test_dry_run_prints_the_plan(nothing_loads, capsys):
    code, out, _ = run(["a castle", "--res", "4096", "--dry-run", "--gpu-memory", "48"], capsys)
    assert code == 0
    assert "plan for a 48 GB GPU, 48.0 GB free" in out and "4096x4096" in out and "CLEAR r=8 f=4" in out
    assert "offload: none (" in out and "fits" in out and "estimate" in out


def test_compare_dry_run_plans_each_variant(nothing_loads, capsys):
    code, out, err = run(["compare", "a castle", "--res", "2048", "--dry-run", "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["variant"] for r in rows] == ["none", "r8-down4"]
    assert rows[0]["stages"][-1]["attention"] == "full"


def test_dry_run_works_with_the_hub_unreachable_and_nothing_cached(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "clear_gen", "a castle", "--res", "8192", "--dry-run", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["fits"] and plan["model"] == "black-forest-labs/FLUX.1-dev (shipped shapes)"
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_a_run_that_cannot_fit_stops_before_loading(fake_gpu, nothing_loads, tmp_path, capsys):
    fake_gpu(1.5)  # FLUX.1-dev at 1024 px needs 1.9 GB with sequential offload (the VAE decode's 1.6)
    code, _, err = run(["a castle", "--model", "dev", "--res", "1024", "--out", f"{tmp_path}/"], capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: 1024x1024 needs") and "even with --offload sequential" in line
    assert "would fit" in line


def test_the_docs_table_is_the_scripts_output():
    import runpy

    table = runpy.run_path(str(ROOT / "scripts" / "memory_table.py"))["markdown"]()
    docs = (ROOT / "docs" / "memory.md").read_text()
    marker = "<!-- table: scripts/memory_table.py -->\n"
    start = docs.index(marker) + len(marker)
    assert docs[start : docs.index("<!-- end of table -->")] == table


# ---------------------------------------------------------------- measured peaks


def test_timing_table_shows_measured_peaks_only_when_there_are_some():
    from rich.console import Console

    from clear_gen.cli.display import timing_table
    from clear_gen.files.record import RunTiming, StageTiming

    def text(stage: StageTiming) -> str:
        console = Console(width=200, record=True)
        console.print(timing_table(RunTiming(stages=[stage], total_s=9.0), "t"))
        return console.export_text()

    stage = StageTiming(2048, 2048, "CLEAR r=8", 20, 8.0, 0.4)
    assert "peak GB" not in text(stage)  # a CPU run
    stage.peak_allocated_gb, stage.peak_reserved_gb = 12.34, 13.01
    shown = text(stage)
    assert "peak GB" in shown and "12.3 (13.0)" in shown
    again = StageTiming.from_json(stage.to_json())
    assert (again.peak_allocated_gb, again.peak_reserved_gb) == (12.34, 13.01)
    older = {k: v for k, v in stage.to_json().items() if "peak" not in k}  # a record from before
    assert StageTiming.from_json(older).peak_reserved_gb is None


@pytest.mark.slow
def test_a_cpu_run_records_no_peak(tmp_path, monkeypatch, capsys):
    from tiny_pipeline import save_tiny_flux

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = save_tiny_flux(tmp_path / "model")
    args = ["a castle", "--model", str(tiny), "--out", f"{tmp_path}/", "--res", "64", "--steps", "2"]
    code, out, err = run([*args, "--max-sequence-length", "16", "--json"], capsys)
    assert code == 0, err
    stage = json.loads(out)["timings"]["stages"][0]
    assert stage["peak_allocated_gb"] is None and stage["peak_reserved_gb"] is None
    assert "offload:" not in err  # said on a GPU only


def test_full_attention_comparison_is_estimated_when_its_step_would_not_fit():
    plan = plan_run(opts(width=4096, height=4096, quantize="fp8", gpu_memory=22))
    assert plan.fits and plan.offload == "model" and plan.stages[-1].peak_gb == pytest.approx(18.8, abs=0.05)
    assert plan.full_step_too_big == [(4096, 4096)]  # stock attention's step: 5.3 GB, not CLEAR's 3.0
    assert plan_run(opts(width=4096, height=4096, gpu_memory=80)).full_step_too_big == []


# ---------------------------------------------------------------- a ControlNet


@pytest.mark.parametrize("blocks", [(5, 10), (4, 1), (5, 0)])
@pytest.mark.parametrize("num_mode", [None, 10])
def test_controlnet_parameters_are_diffusers_own(blocks, num_mode):
    from diffusers import FluxControlNetModel

    from clear_gen.models.flux1.shapes import controlnet_params

    with torch.device("meta"):
        net = FluxControlNetModel(
            num_layers=blocks[0], num_single_layers=blocks[1], num_mode=num_mode, guidance_embeds=True
        )
    params = controlnet_params(DEV, *blocks, num_mode or 0)
    assert (params.total, params.linear, params.rows) == counts(net)


def test_a_controlnet_adds_its_weights_and_its_residuals_to_every_stage(tmp_path):
    """union-pro from the registry (5 + 10 blocks, not downloaded): its weights at 2 bytes each, and 15
    residuals of N x C bf16 elements in every stage's activations."""
    from PIL import Image

    from clear_gen.models.flux1.shapes import controlnet_params
    from clear_gen.weights.registry import load_registry

    net = load_registry().controlnet("union-pro")
    kw = dict(width=4096, height=4096, offload="none", gpu_memory=500, dtype="bf16")
    plain = plan_run(opts(**kw))
    Image.new("RGB", (64, 64)).save(tmp_path / "edges.png")
    control = plan_run(
        opts(**kw, controlnet="union-pro", control_mode="tile", control=str(tmp_path / "edges.png"))
    )
    weights = controlnet_params(DEV, net.num_layers, net.num_single_layers, 10).total * 2
    assert control.controlnet_gb * 1e9 == pytest.approx(weights, abs=1) and plain.controlnet_gb == 0
    for a, b in zip(plain.stages, control.stages, strict=True):
        assert (b.weights_gb - a.weights_gb) * 1e9 == pytest.approx(weights, abs=16)
        residuals = 15 * a.tokens * C * 2
        assert (b.activations_gb - a.activations_gb) * 1e9 == pytest.approx(residuals, abs=16)
        assert b.time_s > a.time_s  # its blocks run every step too
    assert (control.encode_gb - plain.encode_gb) * 1e9 == pytest.approx(weights, abs=16)


@pytest.mark.usefixtures("offline_hub")
def test_loras_count_beside_the_transformer_and_an_absent_one_is_noted(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "style.safetensors"
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(16, C),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(C, 16),
    }
    save_file(tensors, str(file))
    kw = dict(width=2048, height=2048, offload="none", gpu_memory=500, dtype="bf16")
    plain, styled = plan_run(opts(**kw)), plan_run(opts(**kw, loras=[f"{file}:0.8"]))
    assert styled.lora_gb * 1e9 == 2 * 16 * C * 2 and plain.lora_gb == 0
    assert (styled.transformer_gb - plain.transformer_gb) * 1e9 == pytest.approx(2 * 16 * C * 2, abs=16)
    assert (styled.peak_gb - plain.peak_gb) * 1e9 == pytest.approx(2 * 16 * C * 2, abs=16)
    hub = plan_run(opts(**kw, loras=["someone/style-lora"]))
    assert hub.lora_gb == 0
    missing = "LoRA someone/style-lora/pytorch_lora_weights.safetensors:1 not downloaded yet"
    assert any(missing in note for note in hub.notes)
