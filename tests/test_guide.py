"""Projected-flow guidance (--guide): its formulas against references written here, the schedule of its
weight over a stage, its wiring into an img2img call (tiny pipeline), the CLI, the record and --from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from PIL import Image

from clear_gen.core.guide import guided_velocity, lowpass
from clear_gen.files.record import ImageRecord
from clear_gen.plan.spec import Stage
from clear_gen.run.guide import projected_flow, schedule

pytestmark = pytest.mark.usefixtures("offline_hub")


def block_mean(x: torch.Tensor, level: int) -> torch.Tensor:
    """The Haar approximation by its definition: `level` times, the mean of each pair of rows, then of
    each pair of columns; then every coarse value repeated back over the 2^L x 2^L cells it came from."""
    k = 2**level
    for _ in range(level):
        x = (x[..., 0::2, :] + x[..., 1::2, :]) / 2
        x = (x[..., 0::2] + x[..., 1::2]) / 2
    return x.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_lowpass_is_the_block_mean_at_an_8k_latent_grid(level):
    """8192 px: a 1024 x 1024 VAE latent grid (2 channels of FLUX's 16, to stay light)."""
    x = torch.randn(1, 2, 1024, 1024, generator=torch.Generator().manual_seed(level))
    torch.testing.assert_close(lowpass(x, level), block_mean(x, level), atol=1e-6, rtol=0)
    y = torch.randn(2, 1, 96, 160, dtype=torch.float64)  # not square, batch of 2, float64
    torch.testing.assert_close(lowpass(y, level), block_mean(y, level), atol=1e-12, rtol=0)


def tensors(seed: int = 0, shape=(2, 3, 16, 24)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("sigma, c", [(0.875, 0.79), (0.3, 0.2), (0.05, 0.006)])
def test_each_kind_moves_the_predictions_low_frequencies_towards_the_guide(level, sigma, c):
    """x0 = x_t - sigma v, the clean image a step predicts. cosine-decay: LP(x0') = c LP(x_g) + (1 - c)
    LP(x0), the high frequencies untouched; constant: LP(x0') = LP(x_g); cosine-shift: that, and
    HP(x0') = c HP(x_g) + (1 - c) HP(x0)."""
    v, x_t, x_g = tensors(level)
    s = sigma + 1e-6  # the projection's own sigma: 1e-6 more keeps v_p finite at sigma = 0

    def x0(kind: str) -> torch.Tensor:
        return x_t - s * guided_velocity(kind, v, x_t, x_g, sigma, c, level)

    def lp(x):
        return block_mean(x, level)

    plain = x_t - s * v
    tol = dict(atol=1e-12, rtol=0)  # float64 rounding
    torch.testing.assert_close(lp(x0("cosine-decay")), c * lp(x_g) + (1 - c) * lp(plain), **tol)
    torch.testing.assert_close(x0("cosine-decay") - lp(x0("cosine-decay")), plain - lp(plain), **tol)
    torch.testing.assert_close(lp(x0("constant")), lp(x_g), **tol)
    torch.testing.assert_close(x0("constant") - lp(x0("constant")), plain - lp(plain), **tol)
    shifted = x0("cosine-shift")
    torch.testing.assert_close(lp(shifted), lp(x_g), **tol)
    torch.testing.assert_close(
        shifted - lp(shifted), c * (x_g - lp(x_g)) + (1 - c) * (plain - lp(plain)), **tol
    )


def stage(guide: str = "cosine-decay", steps: int = 20, strength: float = 0.7, **kw) -> Stage:
    return Stage(256, 128, True, steps, 7.5, True, strength, guide=guide, **kw)


def test_the_weight_over_a_stage_counts_from_the_start_of_the_whole_schedule():
    c = schedule(stage())  # strength 0.7 of 20 steps: steps 6-19 run
    expected = [(1 + math.cos(math.pi * i / 20)) / 2 for i in range(6, 20)]
    assert len(c) == stage().denoising_steps == 14
    np.testing.assert_allclose(c, expected, rtol=0, atol=1e-15)
    assert c[0] == pytest.approx(0.7939, abs=1e-4) and c[-1] == pytest.approx(0.00616, abs=1e-5)
    assert all(a > b for a, b in zip(c, c[1:], strict=False))  # less every step
    assert schedule(stage(strength=1.0))[0] == 1.0  # a whole schedule starts at 1
    assert schedule(stage("constant")) == [1.0] * 14
    assert schedule(stage("cosine-shift")) == c


# ---------------------------------------------------------------- in an img2img call (tiny pipeline)


@pytest.fixture(scope="module")
def img2img(tiny):
    """FluxImg2ImgPipeline of the tiny model in a dtype, as generate builds it, loaded once a dtype."""
    from diffusers import FluxPipeline

    from clear_gen.weights.loading import img2img_pipeline

    loaded = {}

    def load(dtype: torch.dtype):
        if dtype not in loaded:
            loaded[dtype] = img2img_pipeline(FluxPipeline.from_pretrained(tiny, dtype=dtype))
        return loaded[dtype]

    return load


def denoise(img2img, s: Stage, dtype: torch.dtype, calls: list | None = None) -> tuple[torch.Tensor, ...]:
    """One guided img2img call at the stage's size: (final packed latents, the clean start latent x_g)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = img2img(dtype)
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 8, 32, generator=g).to(dtype), torch.randn(1, 32, generator=g).to(dtype)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (s.height, s.width, 3), np.uint8))
    seen = []
    scale_noise = FlowMatchEulerDiscreteScheduler.scale_noise

    def spy(self, sample, *args, **kwargs):
        seen.append(sample)
        return scale_noise(self, sample, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FlowMatchEulerDiscreteScheduler, "scale_noise", spy)
        if calls is not None:
            import clear_gen.run.guide as G

            def guided(kind, v, x_t, x_g, sigma, c, level):
                calls.append((sigma, c))
                return guided_velocity(kind, v, x_t, x_g, sigma, c, level)

            mp.setattr(G, "guided_velocity", guided)
        with torch.no_grad(), projected_flow(pipe, s):
            assert ("step" in vars(pipe.scheduler)) == (s.guide != "none")  # none wraps nothing
            out = pipe(
                image=picture, prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=s.width,
                height=s.height, num_inference_steps=s.steps, strength=s.strength, guidance_scale=s.guidance,
                sigmas=np.linspace(1.0, 1.0 / s.steps, s.steps).tolist(),
                generator=torch.Generator().manual_seed(1), output_type="latent",
            ).images  # fmt: skip
    assert "step" not in vars(pipe.scheduler) and "scale_noise" not in vars(pipe.scheduler)  # unwrapped
    return out, seen[0]


def grid(latents: torch.Tensor, s: Stage) -> torch.Tensor:
    """Packed (1, (h/2)(w/2), 64) latents on their (1, 16, h, w) grid, unpacked here by hand."""
    h, w = s.height // 16, s.width // 16
    x = latents.float().view(1, h, w, 16, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (1, 16, h, 2, w, 2)
    return x.reshape(1, 16, 2 * h, 2 * w)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["constant", "cosine-shift"])
def test_the_guided_image_keeps_the_start_pictures_low_frequencies(img2img, kind, dtype):
    """The last step lands on x0' (its next sigma is 0), and with these kinds LP(x0') = LP(x_g): the final
    latent's block means are the start picture's, exactly as far as float rounding goes (and not at all
    without guidance). Checks x_g, sigma and the packing together."""
    s = stage(kind, steps=4, guide_level=2)
    out, x_g = denoise(img2img, s, dtype)
    unguided, _ = denoise(img2img, stage("none", steps=4), dtype)
    lp_out, lp_g = block_mean(grid(out, s), 2), block_mean(x_g.float(), 2)
    off = (block_mean(grid(unguided, s), 2) - lp_g).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the latents are rounded at every step (1.7e-3)
    assert (lp_out - lp_g).abs().max().item() < tol < off / 5
    assert not torch.equal(out, unguided)


@pytest.mark.slow
def test_the_guided_call_sees_the_schedules_sigmas_and_weights(img2img):
    calls: list = []
    s = stage(steps=4)  # strength 0.7 of 4 steps: steps 1-3 run
    denoise(img2img, s, torch.float32, calls)
    sigmas = img2img(torch.float32).scheduler.sigmas.tolist()  # shifted: 3 s / (1 + 2 s)
    assert calls == [(sigmas[i], (1 + math.cos(math.pi * i / 4)) / 2) for i in (1, 2, 3)]
    assert [c for _, c in calls] == schedule(s)


# ---------------------------------------------------------------- the command line, the record, --from


def args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["a red castle", "--model", str(tiny), "--out", f"{out}/", "--max-sequence-length", "16",
            "--steps", "4", "--first-steps", "2", "--backend", "dense", "--window", "2", "--seed", "4",
            "--no-compare-full", "--json", "--width", "256", "--height", "128", "--upscale-from", "128",
            *extra]  # fmt: skip


def made(tiny, out, capsys, *extra) -> tuple[Path, ImageRecord, str]:
    code, stdout, err = run(args(tiny, out, *extra), capsys)
    assert code == 0, err
    path = Path(json.loads(stdout.splitlines()[-1])["path"])
    return path, ImageRecord.from_png(path), err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_guide_none_is_todays_image_and_a_guide_is_recorded_and_remade(tiny, tmp_path, capsys, dtype):
    """At 256x128 (2:1, not above 4096 px) the default is no guidance: --guide none is the same image bit
    for bit (the scheduler is never wrapped). A guide changes it, is recorded, and --from re-makes it."""
    plain, record, _ = made(tiny, tmp_path / "a", capsys, "--dtype", dtype)
    none, none_record, _ = made(tiny, tmp_path / "b", capsys, "--dtype", dtype, "--guide", "none")
    np.testing.assert_array_equal(pixels(plain), pixels(none))
    assert "guide" not in record.extra and "guide" not in none_record.extra
    guided, record, err = made(
        tiny, tmp_path / "c", capsys, "--dtype", dtype, "--guide", "cosine-shift", "--guide-level", "2"
    )
    assert "stage 2/2: 256x128, CLEAR, cosine-shift guidance, 3 steps" in err
    assert "stage 1/2: 128x64, full attention, 2 steps" in err  # the first pass is not guided
    assert (record.extra["guide"], record.extra["guide_level"]) == ("cosine-shift", 2)
    assert np.abs(pixels(guided).astype(int) - pixels(plain)).mean() > 1
    code, stdout, err = run(["--from", str(guided), "--out", f"{tmp_path / 'd'}/", "--json"], capsys)
    assert code == 0, err
    again = json.loads(stdout)
    np.testing.assert_array_equal(pixels(Path(again["path"])), pixels(guided))
    assert (again["extra"]["guide"], again["extra"]["guide_level"]) == ("cosine-shift", 2)


@pytest.mark.slow
def test_the_default_guides_beyond_2_to_1_and_from_keeps_an_unguided_record_unguided(tiny, tmp_path, capsys):
    wide = ["--width", "512", "--height", "128", "--upscale-from", "256"]  # 4:1
    default, record, err = made(tiny, tmp_path / "a", capsys, *wide)
    assert record.extra["guide"] == "cosine-decay" and record.extra["guide_level"] == 1
    assert "CLEAR, cosine-decay guidance" in err
    explicit, _, _ = made(tiny, tmp_path / "b", capsys, *wide, "--guide", "cosine_decay")  # _ reads as -
    np.testing.assert_array_equal(pixels(default), pixels(explicit))
    unguided, record, _ = made(tiny, tmp_path / "c", capsys, *wide, "--guide", "none")
    assert "guide" not in record.extra
    code, stdout, err = run(["--from", str(unguided), "--out", f"{tmp_path / 'd'}/", "--json"], capsys)
    assert code == 0, err  # a record without guidance (an image made before it, too) re-makes none
    np.testing.assert_array_equal(pixels(Path(json.loads(stdout)["path"])), pixels(unguided))


def test_from_with_a_new_size_asks_the_recipes_guidance_again(tmp_path):
    """The recipe picks the guidance by size, as the stages: a size over --from asks both again."""
    from clear_gen.cli.options import generate_options
    from clear_gen.files.output import save_png

    image = Image.new("RGB", (64, 64))
    extra = {"guide": "constant", "guide_level": 2}
    record = ImageRecord(prompt="a", seed=1, model="dev", steps=2, guidance=7.5, width=2048, height=1024,
                         stages=[1024, 2048], strength=0.7, extra=extra)  # fmt: skip
    path = save_png(image, tmp_path / "x.png", record)
    same = generate_options({"proportional_attention": "auto"}, path)
    assert (same.guide, same.guide_level) == ("constant", 2)
    resized = generate_options({"proportional_attention": "auto", "res": 8192}, path)
    assert (resized.guide, resized.guide_level) == (None, None)
    given = generate_options({"proportional_attention": "auto", "res": 8192, "guide": "none"}, path)
    assert given.guide == "none"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guide", "Cosine"], "unknown --guide 'Cosine'; choose none, cosine-decay, constant or "
         "cosine-shift"),
        (["--guide-level", "0"], "--guide-level must be 1-8, got 0"),
        (["--guide", "constant", "--guide-level", "5"], "--guide-level 5 averages blocks of 256 px: the "
         "guided stage 512x128 is not a multiple of 256 px; give a lower --guide-level"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["generate", "upscale", "compare"])
def test_bad_guide_options_are_one_line(tiny, tmp_path, capsys, extra, message, command):
    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 16)).save(picture)
    common = ["--model", str(tiny), "--max-sequence-length", "16", "--dry-run", *extra]
    wide = ["--width", "512", "--height", "128", "--upscale-from", "256"]
    line = {
        "generate": ["a castle", *common, "--window", "2", *wide],
        "upscale": ["upscale", str(picture), *common, "--window", "2", "--res", "512"],
        "compare": ["compare", "a castle", *common, *wide],  # none and r8-down4
    }[command]
    code, _, err = run(line, capsys)
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"error: {message}", err


def test_a_guide_with_no_stage_to_guide_is_a_note(tiny, capsys):
    line = ["a castle", "--model", str(tiny), "--max-sequence-length", "16", "--res", "256", "--window", "2"]
    code, out, err = run([*line, "--direct", "--guide", "constant", "--dry-run"], capsys)
    assert code == 0, err
    assert "note: --guide constant: no stage to guide (only CLEAR's SDEdit stages are guided)" in out + err
