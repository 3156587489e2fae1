"""ControlNet residuals with CLEAR: tile-ordered in the transformer; CLEAR on the ControlNet's own blocks."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_inputs, tiny_transformer
from test_attention import ReferenceProcessor, clear_checkpoint, rel_err
from tiny_pipeline import tiny_controlnet as controlnet_for_config

import clear_gen
from clear_gen.core.geometry import choose_tile, tile_order


def tiny_controlnet(transformer, union: bool, seed: int = 7):
    """A FluxControlNetModel for the tiny transformer, its zero-initialised layers made random."""
    return controlnet_for_config(dict(transformer.config), union, seed)


def reference_processors(model, sd, text_len, h, w, r, f):
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(model, kind)):
            weight = sd.get(f"{kind}.{i}.attn.processor.spatial_weight") if sd else None
            block.attn.set_processor(ReferenceProcessor(text_len, h, w, r, f, weight, False))


def control_then_transformer(net, transformer, inputs, cond, mode):
    with torch.no_grad():
        blocks, singles = net(
            hidden_states=inputs["hidden_states"], controlnet_cond=cond, controlnet_mode=mode,
            conditioning_scale=0.8, encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
            img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=inputs["guidance"],
            return_dict=False,
        )  # fmt: skip
        return transformer(
            **inputs, controlnet_block_samples=blocks, controlnet_single_block_samples=singles
        ).sample


@pytest.mark.parametrize("union", [False, True], ids=["plain", "union"])
@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_clear_with_controlnet_residuals_matches_the_dense_reference(union, backend):
    text_len, h, w, r, f = 5, 12, 20, 3, 2
    assert not torch.equal(tile_order(h, w, choose_tile(h, w)), torch.arange(h * w))  # tiles reorder
    base = tiny_transformer()
    net = tiny_controlnet(base, union)
    sd = clear_checkpoint(base, f)
    inputs = tiny_inputs(2, text_len, h, w)
    cond = torch.randn(2, h * w, 4, generator=torch.Generator().manual_seed(9))
    mode = torch.tensor([[1], [2]]) if union else None
    # Reference: row-major tokens, the dense mask, CLEAR's weights loaded by hand, in both models.
    ref, ref_net = copy.deepcopy(base), copy.deepcopy(net)
    ref.load_state_dict({k: v for k, v in sd.items() if "spatial" not in k}, strict=False)
    reference_processors(ref, sd, text_len, h, w, r, f)
    reference_processors(ref_net, None, text_len + int(union), h, w, r, 1)
    expected = control_then_transformer(ref_net, ref, inputs, cond, mode)
    clear_gen.apply_clear(base, window=r, down_factor=f, state_dict=sd, backend=backend)
    clear_gen.apply_clear(net, window=r, backend=backend)  # the ControlNet: training-free CLEAR
    got = control_then_transformer(net, base, inputs, cond, mode)
    assert rel_err(got, expected) < 1e-5
    with torch.no_grad():  # the residuals do change the output: a misplaced one would show
        assert rel_err(ref(**inputs).sample, expected) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("img2img", [False, True], ids=["text-to-image", "img2img"])
def test_diffusers_controlnet_pipelines_with_clear_match_the_dense_reference(tiny, img2img):
    """FluxControlNetPipeline and its img2img twin call the ControlNet and the transformer with their own
    arguments: with CLEAR on both, the latents equal those of the row-major dense reference processors."""
    import inspect

    from diffusers import FluxControlNetImg2ImgPipeline, FluxControlNetPipeline, FluxPipeline
    from PIL import Image

    base = FluxPipeline.from_pretrained(tiny)
    net = tiny_controlnet(base.transformer, union=True)
    kind = FluxControlNetImg2ImgPipeline if img2img else FluxControlNetPipeline
    wanted = inspect.signature(kind.__init__).parameters
    pipe = kind(controlnet=net, **{k: v for k, v in base.components.items() if k in wanted})
    pipe.set_progress_bar_config(disable=True)
    h, w, text_len, r = 12, 20, 16, 3  # tokens: 192 x 320 px; tiles of 8 x 16 reorder them
    noise = torch.rand(h * 16, w * 16, 3, generator=torch.Generator().manual_seed(2))
    picture = Image.fromarray((noise * 255).byte().numpy())
    extra = dict(image=picture, strength=0.7) if img2img else {}

    def run():
        return pipe(
            "a hill", control_image=picture, control_mode=1, controlnet_conditioning_scale=0.8, width=w * 16,
            height=h * 16, num_inference_steps=2, max_sequence_length=text_len, output_type="latent",
            generator=torch.Generator().manual_seed(1), **extra,
        ).images  # fmt: skip

    reference_processors(pipe.transformer, None, text_len, h, w, r, 1)
    reference_processors(net, None, text_len + 1, h, w, r, 1)  # the union ControlNet's mode token
    expected = run()
    clear_gen.apply_clear(pipe.transformer, window=r, backend="flex")
    clear_gen.apply_clear(net, window=r, backend="flex")
    got = run()
    assert got.shape == expected.shape and got.shape[1] == h * w
    assert rel_err(got, expected) < 1e-5


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def nets(tiny, tmp_path_factory) -> dict[str, Path]:
    """Tiny ControlNets for the tiny pipeline (plain, union, one of another model), a control picture and a
    file that is not a picture."""
    from PIL import Image
    from tiny_pipeline import save_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    noise = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(2))
    Image.fromarray((noise * 255).byte().numpy()).save(root / "edges.png")
    (root / "notes.png").write_text("not a picture")
    return {
        "plain": save_tiny_controlnet(root / "plain", tiny, union=False),
        "union": save_tiny_controlnet(root / "union", tiny, union=True),
        "other": save_tiny_controlnet(root / "other", tiny, union=False, joint_attention_dim=48),
        "picture": root / "edges.png",
        "notes": root / "notes.png",
    }


def cli_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["a lighthouse", "--model", str(tiny), "--out", f"{out}/", "--max-sequence-length", "16",
            "--steps", "2", "--first-steps", "2", "--backend", "dense", "--window", "2", "--stages", "64,128",
            "--seed", "3", "--dtype", "bf16", "--json", "--no-compare-full", *extra]  # fmt: skip


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.slow
@pytest.mark.usefixtures("offline_hub")
def test_cli_controlnet_runs_every_stage_is_recorded_and_rerun_by_from(
    tiny, nets, tmp_path, capsys, monkeypatch
):
    """bf16, a stock first pass then a CLEAR stage; the ControlNet gets CLEAR in the CLEAR stage (its
    threshold lowered from 1024 px to 64 for the tiny sizes)."""
    from dataclasses import replace

    from PIL import Image

    import clear_gen.run.render as R
    from clear_gen.plan.recipe import RECIPES

    monkeypatch.setitem(RECIPES, "clear", replace(RECIPES["clear"], controlnet_clear_above=64))
    applied, real = [], R.apply_clear
    monkeypatch.setattr(R, "apply_clear", lambda model, **kw: (applied.append(type(model).__name__),
                                                               real(model, **kw)))  # fmt: skip
    control = [
        "--controlnet",
        str(nets["plain"]),
        "--control",
        str(nets["picture"]),
        "--control-scale",
        "0.8",
    ]
    code, out, err = run_cli(cli_args(tiny, tmp_path / "a", *control), capsys)
    assert code == 0, err
    row = json.loads(out)
    sha = hashlib.sha256(nets["picture"].read_bytes()).hexdigest()
    expected = {"controlnet": str(nets["plain"]), "scale": 0.8, "image": str(nets["picture"]), "sha256": sha}
    assert row["extra"]["control"] == expected and row["extra"]["dtype"] == "bf16"
    assert applied == ["FluxTransformer2DModel", "FluxControlNetModel"]  # the second stage, both models
    assert "ControlNet " + str(nets["plain"]) in err  # the loading line names it
    code, out, err = run_cli(["info", row["path"], "--json"], capsys)
    assert code == 0 and json.loads(out)["extra"]["control"] == expected
    code, out, err = run_cli(["--from", row["path"], "--out", f"{tmp_path / 'b'}/", "--json"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(pixels(row["path"]), pixels(json.loads(out)["path"]))
    assert "changed since" not in err
    copy = tmp_path / "edges.png"  # the picture edited since: --from says so, and the image differs
    copy.write_bytes(nets["picture"].read_bytes())
    args = cli_args(tiny, tmp_path / "d", *control[:3], str(copy), *control[4:])
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    edited = json.loads(out)["path"]
    Image.fromarray(255 - pixels(nets["picture"]).astype(np.uint8)).save(copy)
    code, out, err = run_cli(["--from", edited, "--out", f"{tmp_path / 'e'}/", "--json"], capsys)
    assert code == 0 and "note: --control edges.png changed since the image was made (sha256 " in err
    assert not np.array_equal(pixels(edited), pixels(json.loads(out)["path"]))
    code, out, err = run_cli(cli_args(tiny, tmp_path / "c"), capsys)  # the same without the ControlNet
    assert code == 0, err
    assert np.abs(pixels(row["path"]) - pixels(json.loads(out)["path"])).max() > 8


@pytest.mark.slow
@pytest.mark.usefixtures("offline_hub")
def test_cli_upscale_with_a_controlnet_controls_with_the_picture_itself(tiny, nets, tmp_path, capsys):
    args = ["upscale", str(nets["picture"]), "a hill", "--model", str(tiny), "--res", "192", "--steps", "2",
            "--max-sequence-length", "16", "--backend", "dense", "--window", "2", "--seed", "1", "--dtype",
            "bf16", "--json", "--no-compare-full"]  # fmt: skip
    union = ["--controlnet", str(nets["union"]), "--control-mode", "2"]
    code, out, err = run_cli([*args, *union, "--out", f"{tmp_path / 'a'}/"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["extra"]["control"] == {"controlnet": str(nets["union"]), "scale": 1.0, "mode": "2"}
    code, out, err = run_cli([*args, "--out", f"{tmp_path / 'b'}/"], capsys)
    assert code == 0, err
    assert np.abs(pixels(row["path"]) - pixels(json.loads(out)["path"])).max() > 8


@pytest.mark.usefixtures("offline_hub")
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--control", "PICTURE"], "--control needs --controlnet NAME_OR_REPO"),
        (["--controlnet", "PLAIN"], "--controlnet .*plain needs --control IMAGE"),
        (["--controlnet", "PLAIN", "--control", "NOTES"], "--control .*notes.png is not an image clear-gen"),
        (["--controlnet", "PLAIN", "--control", "nowhere.png"], "--control nowhere.png: no such file"),
        (["--controlnet", "OTHER", "--control", "PICTURE"],
         "other is a ControlNet for another model: its joint_attention_dim is 48, .* 32"),
        (["--controlnet", "UNION", "--control", "PICTURE"], "union is a union ControlNet .*-mode 0-2"),
        (["--controlnet", "UNION", "--control", "PICTURE", "--control-mode", "3"], "union has modes 0-2"),
        (["--controlnet", "PLAIN", "--control", "PICTURE", "--control-mode", "1"], "not a union ControlNet"),
        (["--controlnet", "PLAIN", "--control", "PICTURE", "--control-scale", "-1"], "-scale must be"),
        (["--controlnet", "union-pro", "--control", "PICTURE", "--control-mode", "edges"],
         "--control-mode edges: ControlNet union-pro has canny, tile, depth"),
        (["--controlnet", "union-pro", "--control", "PICTURE"], "union-pro is a union model: give"),
        (["--controlnet", "upscaler", "--control", "PICTURE", "--control-mode", "tile"], "not a union model"),
        (["--controlnet", "upscaler", "--control", "PICTURE"],
         "not in the cache .*ControlNet upscaler .*run `clear-gen download --controlnet upscaler`"),
        (["--controlnet", "upscaler", "--control", "PICTURE", "--model", "schnell"],
         "ControlNet upscaler is for black-forest-labs/FLUX.1-dev, not black-forest-labs/FLUX.1-schnell"),
        (["--controlnet", "no-such-net", "--control", "PICTURE"], "not a local folder, a registry"),
    ],
)  # fmt: skip
def test_cli_bad_controlnet_input_is_one_line(tiny, nets, tmp_path, capsys, extra, match):
    names = {"PLAIN": "plain", "UNION": "union", "OTHER": "other", "PICTURE": "picture", "NOTES": "notes"}
    extra = [str(nets[names[a]]) if a in names else a for a in extra]
    args = cli_args(tiny, tmp_path, *extra)
    if "--model" in extra:  # a registry base instead of the tiny folder
        del args[1:3]
    code, out, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert re.search(match, lines[-1]) and lines[-1].startswith("error: "), lines[-1]
    assert not list(tmp_path.glob("*.png"))


def test_from_with_another_controlnet_replaces_the_record_s_as_a_whole():
    from clear_gen.files.record import ImageRecord
    from clear_gen.plan.records import options_from_record

    control = {"controlnet": "union-pro", "mode": "tile", "scale": 0.4, "image": "/a.png", "sha256": "0" * 64}
    record = ImageRecord(prompt="a", seed=1, model="dev", steps=2, guidance=1.0, width=64, height=64,
                         extra={"control": control})  # fmt: skip
    opts = options_from_record(record)
    assert (opts.controlnet, opts.control, opts.control_mode, opts.control_scale) == (
        "union-pro",
        "/a.png",
        "tile",
        0.4,
    )
    opts = options_from_record(record, controlnet="upscaler")
    assert (opts.controlnet, opts.control, opts.control_mode, opts.control_scale) == (
        "upscaler",
        None,
        None,
        None,
    )


def test_a_16_bit_depth_map_is_scaled_to_8_bits_not_clipped(tmp_path):
    from PIL import Image

    from clear_gen.weights.control import read_control_image

    depth = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # near = bright, 16 bits
    Image.fromarray(depth).save(tmp_path / "depth.png")
    notes = []
    picture = np.asarray(read_control_image(tmp_path / "depth.png", notes.append).image)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert picture[0, 0, 0] == 0 and picture[-1, -1, 0] == 255 and len(np.unique(picture)) > 200
    assert notes == ["--control depth.png: 16-bit converted to 8-bit"]
