"""FLUX.2 [klein] (models/flux2) on tiny random models built here (CPU, no network): CLEAR against a dense
masked reference written here, generation through the CLI, distillation, and the memory plan's shapes.

The reference replaces only diffusers' attention kernel call inside the stock FLUX.2 processors: tokens stay
row-major ([text ; image], raster order), the circle mask is an explicit boolean matrix over them, the
down-sampled keys are pooled with explicit loops, and SDPA computes the attention.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli as run
from PIL import Image
from safetensors.torch import load_file, save_file

from clear_gen import models
from clear_gen.attention import apply_clear, original_attention
from clear_gen.attention.weights import expected_checkpoint
from clear_gen.files.record import ImageRecord

pytestmark = pytest.mark.usefixtures("offline_hub")

FLUX2 = models.family("flux2")
HEADS, HEAD_DIM, TEXT_DIM, CHANNELS = 2, 16, 48, 16


def test_every_family_defines_the_family_api():
    from conftest import tiny_transformer

    for name in models.FAMILIES:
        family = models.family(name)
        assert family.NAME == name and [a for a in models.FAMILY_API if not hasattr(family, a)] == []
    assert models.of(tiny_flux2()) is FLUX2 and models.of(tiny_transformer()) is models.family("flux1")
    assert models.checkpoint_family(expected_checkpoint(tiny_flux2(), 2)) == "flux2"
    assert models.checkpoint_family(expected_checkpoint(tiny_transformer(), 1)) == "flux1"
    assert models.checkpoint_family(["transformer_blocks.0.attn.to_q.lora_A.weight"]) is None


def tiny_flux2(seed: int = 0, layers: int = 1, single_layers: int = 1):
    """A Flux2Transformer2DModel of the tiny pipeline's configuration (tiny_pipeline.save_tiny_flux2)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )  # fmt: skip
    return model.eval()


def flux2_inputs(batch: int, text_len: int, h: int, w: int, seed: int = 1) -> dict:
    """As Flux2KleinPipeline calls the transformer: ids [0, row, col, 0] and [0, 0, 0, index], as integers."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], -1).view(-1, 4)
    txt_ids = torch.zeros(text_len, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(text_len)
    return dict(
        hidden_states=torch.randn(batch, h * w, CHANNELS, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TEXT_DIM, generator=g),
        timestep=torch.full((batch,), 0.7),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )


def reference_mask(text_len: int, h: int, w: int, r: int, f: int) -> torch.Tensor:
    """(T + N, T + N + M) True where a query (row) sees a key: text rows see text and image; image rows see
    text, the image tokens strictly inside the circle of radius r, and every down-sampled token."""
    n, m = h * w, (h // f) * (w // f) if f > 1 else 0
    mask = torch.zeros(text_len + n, text_len + n + m, dtype=torch.bool)
    mask[:text_len, : text_len + n] = True
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len + n :] = True
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            mask[text_len + i, text_len + j] = (yi - yj) ** 2 + (xi - xj) ** 2 < r * r
    return mask


def pooled(x: torch.Tensor, text_len: int, h: int, w: int, f: int) -> torch.Tensor:
    """Means of x's image tokens (B, N, H, D) over f x f cells, (B, M, H, D): the untrained spatial weight."""
    grid = x[:, text_len:].view(x.shape[0], h, w, *x.shape[2:])
    cells = [
        sum(grid[:, cy * f + i, cx * f + j] for i in range(f) for j in range(f)) / f**2
        for cy in range(h // f)
        for cx in range(w // f)
    ]
    return torch.stack(cells, 1)


def reference_forward(model, inputs: dict, text_len: int, h: int, w: int, r: int, f: int, monkeypatch):
    """The stock model with diffusers' attention kernel replaced by masked SDPA over row-major tokens."""
    import diffusers.models.transformers.transformer_flux2 as T

    mask = reference_mask(text_len, h, w, r, f)

    def masked(query, key, value, attn_mask=None, **kwargs):  # (B, L, H, D) each
        assert attn_mask is None and query.shape[1] == text_len + h * w
        if f > 1:
            key = torch.cat([key, pooled(key, text_len, h, w, f)], 1)
            value = torch.cat([value, pooled(value, text_len, h, w, f)], 1)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(T, "dispatch_attention_fn", masked)
        return model(**inputs).sample


@pytest.mark.parametrize(("h", "w", "r", "f"), [(8, 8, 3, 1), (6, 10, 2, 2), (8, 4, 4, 4)])
def test_clear_equals_the_dense_masked_reference(h, w, r, f, monkeypatch):
    model, text_len = tiny_flux2(layers=2, single_layers=2), 5
    inputs = flux2_inputs(2, text_len, h, w)
    want = reference_forward(model, inputs, text_len, h, w, r, f, monkeypatch)
    apply_clear(model, window=r, down_factor=f, backend="dense")
    with torch.no_grad():
        got = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_replaces_the_fused_single_block_projection(monkeypatch):
    """The CLEAR weights' key set (q, k, v, out of double blocks' image branch; single blocks' fused q, k, v
    and MLP input) go into the model: the result is the reference of the model holding those weights."""
    model, reference = tiny_flux2(), tiny_flux2()
    keys = expected_checkpoint(model, 1)
    assert set(keys) == {
        *(f"transformer_blocks.0.attn.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out.0")),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
    }
    assert keys["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"] == (3 * 32 + 2 * 96, 32)
    g = torch.Generator().manual_seed(4)
    state = {k: torch.randn(s, generator=g) * 0.2 for k, s in keys.items()}
    reference.load_state_dict(state, strict=False)
    inputs = flux2_inputs(1, 4, 6, 6)
    want = reference_forward(reference, inputs, 4, 6, 6, 3, 1, monkeypatch)
    with torch.no_grad():
        stock = model(**inputs).sample
        apply_clear(model, window=3, state_dict=state, backend="dense")
        got = model(**inputs).sample
        with original_attention(model):  # the distillation's teacher: the stock model, exactly
            assert torch.equal(model(**inputs).sample, stock)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_latents_pack_as_the_pipeline_packs_them():
    from diffusers import Flux2KleinPipeline as P

    latents = torch.randn(2, 4, 6, 10)
    patched = P._patchify_latents(latents)
    assert torch.equal(FLUX2.pack_latents(latents), P._pack_latents(patched))
    assert torch.equal(FLUX2.unpack_latents(FLUX2.pack_latents(latents), 80, 48), latents)


# ---------------------------------------------------------------- generation


def generate_args(model: Path, out: Path, *extra: str) -> list[str]:
    common = ["--model", str(model), "--out", f"{out}/", "--max-sequence-length", "16", "--steps", "2"]
    return ["a red cube", *common, "--backend", "dense", "--seed", "3", "--json", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generate_runs_clear_on_tiny_flux2_through_the_cli(tiny2, tmp_path, capsys, dtype):
    code, out, err = run(
        generate_args(tiny2, tmp_path, "--window", "2", "--res", "128", "--dtype", dtype), capsys
    )
    assert code == 0, err
    row = json.loads(out)
    record, stage = ImageRecord.from_png(Path(row["path"])), row["timings"]["stages"][0]
    assert Image.open(row["path"]).size == (128, 128)
    assert (record.window, record.model, record.extra["dtype"]) == (2, str(tiny2), dtype)
    assert stage["attention"] == "CLEAR r=2" and stage["steps"] == 2
    assert "loading FLUX.2" in err


@pytest.mark.slow
def test_down_sampled_training_free_windows_and_the_plan(tiny2, tmp_path, capsys):
    args = generate_args(tiny2, tmp_path, "--window", "3", "--down-factor", "4", "--width", "192")
    code, out, err = run([*args, "--height", "128"], capsys)
    assert code == 0, err
    assert json.loads(out)["timings"]["stages"][0]["attention"] == "CLEAR r=3 f=4"
    code, out, err = run([*args, "--height", "128", "--dry-run"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"] == str(tiny2) and plan["stages"][0]["attention"] == "CLEAR r=3 f=4"


def test_what_flux2_lacks_is_refused_in_one_line(tiny2, tmp_path, capsys):
    Image.new("RGB", (128, 128)).save(tmp_path / "edges.png")
    control = ["--controlnet", "upscaler", "--control", str(tmp_path / "edges.png")]
    cases = [
        (["--window", "2", "--res", "256", "--stages", "128,256"], "has no img2img pipeline"),
        (["--res", "2048", "--direct"], "no published CLEAR weights for FLUX.2"),
        (["--variant", "r8", "--res", "128"], "CLEAR variant r8 was made for FLUX.1 (flux1"),
        (["--window", "2", "--res", "128", *control], "FLUX.2 (flux2) has no ControlNet"),
    ]
    for extra, message in cases:
        code, _, err = run(generate_args(tiny2, tmp_path, *extra, "--dry-run"), capsys)
        lines = err.strip().splitlines()
        assert code == 1 and "Traceback" not in err and len(lines) == 1 and message in lines[0], (extra, err)
        assert "flux2" in lines[0]


def test_a_checkpoint_of_another_family_is_one_line_naming_both(tiny2, tiny, tmp_path, capsys):
    from conftest import tiny_transformer

    flux1 = tmp_path / "flux1.safetensors"
    save_file({k: torch.zeros(s) for k, s in expected_checkpoint(tiny_transformer(), 1).items()}, str(flux1))
    flux2 = tmp_path / "flux2.safetensors"
    save_file({k: torch.zeros(s) for k, s in expected_checkpoint(tiny_flux2(), 1).items()}, str(flux2))
    for model, weights, names in ((tiny2, flux1, ("FLUX.1 (flux1", "FLUX.2 (flux2)")),
                                  (tiny, flux2, ("FLUX.2 (flux2", "FLUX.1 (flux1)"))):  # fmt: skip
        args = generate_args(
            model, tmp_path, "--window", "2", "--res", "128", "--clear-weights", str(weights)
        )
        code, _, err = run(args, capsys)
        lines = err.strip().splitlines()
        assert code == 1 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
        assert all(name in lines[0] for name in names), lines[0]


def test_an_unknown_family_in_the_registry_is_one_line_naming_both(tmp_path, capsys, monkeypatch):
    from clear_gen.weights import registry

    text = registry.PACKAGED_REGISTRY.read_text().replace('family = "flux2"', 'family = "flux9"')
    (tmp_path / "weights.toml").write_text(text)
    monkeypatch.setattr(registry, "PACKAGED_REGISTRY", tmp_path / "weights.toml")
    code, _, err = run(["a castle", "--model", "klein", "--res", "512", "--dry-run"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "[bases.klein] family 'flux9' is not one of: flux1, flux2" in lines[0]


def test_the_family_of_a_folder_is_its_transformers(tiny, tiny2, tmp_path):
    from clear_gen.weights.shapes import model_family, model_shapes

    assert (model_family(str(tiny)), model_family(str(tiny2)), model_family("klein")) == (
        "flux1",
        "flux2",
        "flux2",
    )
    assert (
        model_family("krea") == "flux1" and model_family(str(tmp_path)) == "flux1"
    )  # no transformer: FLUX.1
    shapes = model_shapes(str(tiny2))
    assert (shapes.transformer.hidden, shapes.transformer.joint_attention_dim, shapes.text_len) == (
        32,
        48,
        512,
    )
    assert shapes.text.total > 0 and shapes.text_small.total == 0 and shapes.vae_tile == 32


# ---------------------------------------------------------------- distillation


RES, WINDOW, DOWN = 128, 2, 2


@pytest.fixture(scope="module")
def data2(tiny2, tmp_path_factory) -> Path:
    """Four samples of the tiny FLUX.2 teacher at 128 px."""
    from clear_gen.distill import DataOptions, make_data

    root = tmp_path_factory.mktemp("distill2")
    (root / "prompts.txt").write_text("a red cube\na blue ball\n")
    opts = DataOptions(
        out=root / "data", model=str(tiny2), prompts_file=root / "prompts.txt", count=4, res=RES, steps=2,
        max_sequence_length=16, validation_prompts=root / "prompts.txt",
    )  # fmt: skip
    make_data(opts)
    return root / "data"


def prediction_gap(tiny2: Path, data: Path, weights) -> float:
    """MSE between the tiny FLUX.2 teacher's and a CLEAR student's velocities on fixed noised samples."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from clear_gen.distill.data import Samples, base_id
    from clear_gen.distill.losses import noised

    model = Flux2Transformer2DModel.from_pretrained(tiny2 / "transformer")
    vae = AutoencoderKLFlux2.from_pretrained(tiny2 / "vae")
    batch = Samples(data, base_id(str(tiny2)), RES).batch([0, 1, 2, 3], torch.device("cpu"), torch.float32)
    draws = [[torch.Generator().manual_seed(seed * 4 + i) for i in range(4)] for seed in range(3)]
    inputs = [noised(FLUX2, batch, vae, None, generators).inputs for generators in draws]
    with torch.no_grad():
        teacher = [model(**x)[0] for x in inputs]
        apply_clear(model, window=WINDOW, down_factor=DOWN, state_dict=weights, backend="dense")
        student = [model(**x)[0] for x in inputs]
    return sum(F.mse_loss(a, b).item() for a, b in zip(student, teacher, strict=True)) / len(inputs)


@pytest.mark.slow
def test_distilling_flux2_lowers_the_prediction_loss(tiny2, data2, tmp_path):
    from diffusers import Flux2Transformer2DModel

    from clear_gen.distill import TrainOptions, train

    sample = load_file(str(data2 / "samples" / "000000.safetensors"))
    assert sample.keys() == {"mean", "std", "prompt_embeds"} and sample["mean"].shape == (
        4,
        RES // 8,
        RES // 8,
    )
    validation = load_file(str(next((data2 / "validation").glob("*.safetensors"))))
    assert validation.keys() == {"prompt_embeds", "negative_prompt_embeds"}  # the base model runs CFG
    out = tmp_path / "clear2.safetensors"
    opts = TrainOptions(
        data=data2, out=out, window=WINDOW, down_factor=DOWN, model=str(tiny2), res=RES, steps=60, batch=2,
        accumulate=1, validate_steps=2, optimizer="adamw", lr=3e-3, loss_weights=(0.0, 1.0, 1.0),
    )  # fmt: skip
    result = train(opts)
    saved = load_file(str(out))
    model = Flux2Transformer2DModel.from_pretrained(tiny2 / "transformer")
    assert saved.keys() == expected_checkpoint(model, DOWN).keys()
    before, after = prediction_gap(tiny2, data2, None), prediction_gap(tiny2, data2, saved)
    assert after < 0.75 * before, (before, after)
    assert result.validation["ssim"] > 0 and Path(result.validation["path"]).is_file()


# ---------------------------------------------------------------- the memory plan


def test_klein_shapes_count_diffusers_own_modules():
    """shapes.toml's klein against the modules built on 'meta' from the configs it cites."""
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shapes = FLUX2.shapes.shipped_shapes("klein", "test")
    cfg = shapes.transformer
    with torch.device("meta"):
        model = models.family("flux2").transformer_class()(
            in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
            guidance_embeds=False,
        )  # fmt: skip
        qwen = Qwen3ForCausalLM(
            Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
        )  # fmt: skip
        vae = AutoencoderKLFlux2()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    params = shapes.transformer_params()
    assert params.total == sum(p.numel() for p in model.parameters()) == 3_875_544_576
    assert (params.linear, params.rows) == (
        sum(m.weight.numel() for m in linears),
        sum(m.out_features for m in linears),
    )
    assert shapes.text.total == sum(p.numel() for p in qwen.parameters()) == 4_022_468_096
    assert shapes.vae == sum(p.numel() for p in vae.parameters()) and shapes.vae_tile == 1024
    for f in (1, 4):
        assert shapes.clear_params(f) == sum(math.prod(s) for s in expected_checkpoint(model, f).values())
    assert cfg.flux_shape.block_macs == 13 and cfg.text_len == 512


@pytest.mark.parametrize("clear", [None, (8, 1), (8, 4)])
def test_step_activations_match_live_bytes_of_a_full_width_forward(monkeypatch, clear):
    """klein's width (24 heads x 128), 1 double + 1 single block, 2048 px, bf16, on 'meta'."""
    from diffusers import Flux2Transformer2DModel
    from live_bytes import LiveBytes, flash_like_clear, flash_like_sdpa

    from clear_gen.attention import processor
    from clear_gen.core.positions import Grid, GridCache
    from clear_gen.plan.footprint import step_activations

    side, text_len, dtype = 128, 512, torch.bfloat16
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", flash_like_sdpa)
    monkeypatch.setattr(processor, "clear_attention", flash_like_clear)
    monkeypatch.setattr(GridCache, "__call__", lambda self, ids: Grid(side, side))
    with torch.device("meta"):
        model = Flux2Transformer2DModel(
            in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=7680, axes_dims_rope=(32, 32, 32, 32),
            guidance_embeds=False,
        )  # fmt: skip
    model = torch.nn.Module.to(model, dtype)
    if clear:
        apply_clear(model, window=clear[0], down_factor=clear[1], backend="dense")
    n = side * side
    with torch.device("meta"):
        inputs = dict(
            hidden_states=torch.empty(1, n, 128, dtype=dtype),
            encoder_hidden_states=torch.empty(1, text_len, 7680, dtype=dtype),
            timestep=torch.empty(1, dtype=dtype),
            img_ids=torch.empty(n, 4),
            txt_ids=torch.empty(text_len, 4),
        )
    with torch.no_grad(), LiveBytes() as live:
        model(**inputs, return_dict=False)
    shapes = FLUX2.shapes.shipped_shapes("klein", "test")
    planned = step_activations(text_len, n, shapes, 2, clear is not None, None, clear[1] if clear else 1)
    assert planned == pytest.approx(live.peak, rel=0.02)


def test_a_dry_run_of_klein_plans_its_shapes(capsys):
    code, out, err = run(["a castle", "--model", "klein", "--res", "4096", "--direct", "--window", "8",
                          "--down-factor", "4", "--dry-run", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"] == "black-forest-labs/FLUX.2-klein-4B (shipped shapes)"
    assert plan["transformer_gb"] == pytest.approx(3_875_544_576 * 2 / 1e9)
    assert plan["text_encoders_gb"] == pytest.approx(4_022_468_096 * 2 / 1e9)
    assert [s["attention"] for s in plan["stages"]] == ["CLEAR r=8 f=4"]


def test_flux2_vae_decodes_and_encodes_exactly_in_tiles():
    """FLUX.2's VAE (AutoencoderKLFlux2) has FLUX.1's encoder and decoder blocks: the family's exact tiling
    equals its untiled decode and encode, as it does FLUX.1's (test_vae_tiling.py)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
    ).double().eval()  # fmt: skip
    family = models.family("flux2")
    z, x = torch.randn(1, 4, 13, 21, dtype=torch.float64), torch.rand(1, 3, 104, 168, dtype=torch.float64)
    with torch.no_grad():
        family.set_vae_tiling(vae, "off", 64)
        whole = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        family.set_vae_tiling(vae, "exact", 64)  # 2 x 3 tiles of 8 latent px
        tiled = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        family.set_vae_tiling(vae, "fast", 64)
        fast = vae.decode(z).sample
    for a, b in zip(tiled, whole, strict=True):
        assert (a - b).abs().max().item() < 1e-10
    assert (fast - whole[0]).abs().max().item() > 1e-3  # diffusers' tiles differ: the check above can fail
