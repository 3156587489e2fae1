"""Exact VAE tiling (models/flux1/vae.py over core/tiles.py): the tiled decode and encode equal the untiled
ones to float rounding where diffusers' tiling does not; the receptive field the module documents; the tile
geometry at 8K; the memory model against the live bytes of a full-width VAE on 'meta'; and --vae-tiling /
--vae-tile from the command line into each stage, the PNG record and back (`--from`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from live_bytes import LiveBytes, flash_like_sdpa
from PIL import Image

from clear_gen.core.tiles import (
    LATENT_PX,
    clip,
    down_source,
    halo_source,
    releases,
    split,
    tile_grid,
    up_source,
)
from clear_gen.errors import ConfigError
from clear_gen.files.record import ImageRecord
from clear_gen.models.flux1 import vae as V
from clear_gen.models.flux1.activations import vae_activations
from clear_gen.models.flux1.random import build_vae
from clear_gen.plan.parse import parse
from clear_gen.plan.records import image_record, options_from_record
from clear_gen.plan.spec import GenerateOptions

CPU = torch.device("cpu")
LATENT = (13, 21)  # 104 x 168 px: neither square nor a multiple of the tile
TILE = 64  # px: 2 x 3 tiles of 6-7 latent px, against 1-2 px halos
FIXTURES = Path(__file__).parent / "fixtures"


def latents(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, *LATENT, generator=g).to(dtype)  # (B, 16, h, w)


def picture(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    h, w = (LATENT_PX * s for s in LATENT)
    return (torch.rand(1, 3, h, w, generator=g) * 2 - 1).to(dtype)  # (B, 3, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def vae():
    """A VAE of FLUX.1's layout (2 resnets a down block, 3 an up block, mid attention), 8 channels wide."""
    return build_vae(CPU, torch.float32, channels=8)


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- equal to the untiled VAE


def test_the_test_picture_is_really_split():
    grid = tile_grid(*LATENT, TILE // LATENT_PX)
    assert grid.shape == (2, 3) and grid.rows == (0, 6, 13) and grid.cols == (0, 7, 14, 21)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_exact_decode_and_encode_equal_the_untiled_ones(dtype, tolerance):
    model = build_vae(CPU, dtype, channels=8)
    z, x = latents(dtype), picture(dtype)
    with torch.no_grad():
        assert worst(V.decode(model, z, TILE), model.decoder(z)) < tolerance
        assert worst(V.encode(model, x, TILE), model.encoder(x)) < tolerance


def test_diffusers_tiling_differs_where_exact_does_not(vae):
    """The check above can fail: diffusers' own tiles (fast) are off by tens of times its tolerance."""
    z, x = latents(), picture()
    with torch.no_grad():
        decoded, encoded = vae.decoder(z), vae.encoder(x)
        V.set_vae_tiling(vae, "fast", TILE)
        fast_decode, fast_encode = vae.decode(z).sample, vae._encode(x)
        V.set_vae_tiling(vae, "off", TILE)
    assert worst(fast_decode, decoded) > 0.1 and (fast_decode - decoded).abs().mean() > 1e-3
    assert worst(fast_encode, encoded) > 0.1


def test_bf16_is_within_bf16_rounding(vae):
    """In bf16 the tiled result is as far from the float32 truth as the untiled one, no further."""
    bf16 = build_vae(CPU, torch.bfloat16, channels=8)
    z, x = latents(torch.bfloat16), picture(torch.bfloat16)
    with torch.no_grad():
        for run, tiled_run, truth in (
            (bf16.decoder, lambda t: V.decode(bf16, t, TILE), vae.decoder(z.float())),
            (bf16.encoder, lambda t: V.encode(bf16, t, TILE), vae.encoder(x.float())),
        ):
            given = z if run is bf16.decoder else x
            untiled = (run(given).float() - truth).abs()
            tiled = (tiled_run(given).float() - truth).abs()
            assert tiled.mean() < 1.2 * untiled.mean() and tiled.max() < 1.5 * untiled.max()


def test_the_vaes_own_encode_and_decode_run_exactly_once_set(vae):
    """set_vae_tiling routes AutoencoderKL.encode / decode (what the pipelines call) above one tile, parked
    tiles may wait on another device, and off / fast put diffusers' own methods back."""
    z, x = latents(), picture()
    with torch.no_grad():
        decoded, posterior = vae.decoder(z), vae.encoder(x)
        V.set_vae_tiling(vae, "exact", TILE, store=CPU)
        assert worst(vae.decode(z).sample, decoded) < 1e-4
        assert worst(vae.encode(x).latent_dist.mean, posterior[:, :16]) < 1e-4
        V.set_vae_tiling(vae, "fast", 128)
        assert "tiled_decode" not in vae.__dict__
        assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (128, 16)
        V.set_vae_tiling(vae, "off", 128)
        assert not vae.use_tiling and "_tiled_encode" not in vae.__dict__
        assert worst(vae.decode(z).sample, decoded) == 0.0


def test_exact_tiling_works_under_sequential_offload_hooks():
    """accelerate's sequential offload keeps weights on 'meta' between module calls: exact tiling calls
    every layer as a module, GroupNorm included, so it still matches."""
    from accelerate import cpu_offload

    model = build_vae(CPU, torch.float32, channels=8)
    z = latents()
    with torch.no_grad():
        decoded = model.decoder(z)
        cpu_offload(model, execution_device=CPU)
        assert model.decoder.conv_norm_out.weight.device.type == "meta"
        V.set_vae_tiling(model, "exact", TILE)
        assert worst(model.decode(z).sample, decoded) < 1e-4


def test_another_vae_layout_is_refused_in_one_line():
    from diffusers import AutoencoderKL

    blocks = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["AttnUpDecoderBlock2D"] * 2)
    other = AutoencoderKL(block_out_channels=[8, 8], norm_num_groups=4, latent_channels=4, **blocks)
    with pytest.raises(
        ConfigError, match="knows FLUX.1's VAE .* an AttnUpDecoderBlock2D: use --vae-tiling fast"
    ):
        V.set_vae_tiling(other, "exact", TILE)


def test_the_receptive_field_the_docs_give():
    """Perturb one latent px before the up blocks, every GroupNorm held to its unperturbed statistics: the
    output moves 98 px on every side of the px's own 8, 12.25 latent px (vae.py's docstring)."""
    model = build_vae(CPU, torch.float64, channels=8)
    dec = model.decoder
    frozen: dict = {}

    def hold(norm, args, out):
        x = args[0]
        flat = x.reshape(x.shape[0], norm.num_groups, -1)  # (B, G, C/G * h * w)
        if norm not in frozen:
            frozen[norm] = torch.var_mean(flat, dim=-1, correction=0)
        var, mean = frozen[norm]
        y = ((flat - mean[..., None]) / torch.sqrt(var[..., None] + norm.eps)).reshape(x.shape)
        return y * norm.weight[:, None, None] + norm.bias[:, None, None]

    for norm in [m for b in dec.up_blocks for m in b.modules() if isinstance(m, torch.nn.GroupNorm)]:
        norm.register_forward_hook(hold)
    dec.conv_norm_out.register_forward_hook(hold)

    def up(x):
        for block in dec.up_blocks:
            x = block(x)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))

    x = torch.randn(1, 32, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = up(x)
        x[0, :, 20, 20] += 1.0  # latent px 20: picture px 160-167
        moved = (up(x) - before).abs().sum(dim=(0, 1)) > 0  # (H, W)
    rows, cols = moved.any(1).nonzero().flatten(), moved.any(0).nonzero().flatten()
    assert (160 - rows.min().item(), rows.max().item() - 167) == (98, 98)
    assert (160 - cols.min().item(), cols.max().item() - 167) == (98, 98)
    assert math.ceil(98 / LATENT_PX) == 13  # a one-pass tiling's halo, in latent px


# ---------------------------------------------------------------- the geometry at 8K, no VAE run


def _sweep_reads(grid, source, scale: int, source_scale: int):
    """Simulate a sweep: every read comes before its tile is freed, each tile is freed once, and the
    live tiles (the source's left plus the output's made) never exceed one grid plus a row and a tile."""
    after = releases(grid, source, scale, source_scale)
    freed, n_rows, n_cols = set(), *grid.shape
    for k, tile in enumerate(grid.tiles()):
        read = grid.touching(source(grid.core(tile, scale)), source_scale)
        assert not freed & set(read)
        assert all(abs(i - tile[0]) <= 1 and abs(j - tile[1]) <= 1 for i, j in read)  # neighbours only
        freed |= set(after[tile])
        live = (n_rows * n_cols - len(freed)) + (k + 1)
        assert live <= n_rows * n_cols + n_cols + 1
    assert len(freed) == n_rows * n_cols and sum(map(len, after.values())) == n_rows * n_cols


@pytest.mark.parametrize("height, width", [(1024, 1024), (576, 1024), (1000, 1016)])  # latent px: 8K's
def test_tile_geometry_at_8k(height, width):
    grid = tile_grid(height, width, 1024 // LATENT_PX)
    assert grid.shape == (math.ceil(height / 128), math.ceil(width / 128))
    for side, bounds in ((height, grid.rows), (width, grid.cols)):
        sizes = {b - a for a, b in zip(bounds, bounds[1:], strict=False)}
        assert bounds == split(side, 128) and max(sizes) <= 128 and max(sizes) - min(sizes) <= 1
    for scale in (1, 2, 4, 8):  # every level of the VAE: the same tiles, scaled
        cores = [grid.core(t, scale) for t in grid.tiles()]
        assert sum((b - t) * (r - left) for t, b, left, r in cores) == height * width * scale**2
    for scale in (1, 2, 4, 8):  # decode: a block's 2 px halo at its level; the upsampler from the level below
        _sweep_reads(grid, _reads(grid, scale, scale), scale, scale)
        if scale > 1:
            _sweep_reads(grid, _reads(grid, scale, scale // 2, up_source), scale, scale // 2)
    for scale in (4, 2, 1):  # encode: the downsampler from the level above
        _sweep_reads(grid, _reads(grid, scale, 2 * scale, down_source), scale, 2 * scale)


def _reads(grid, scale: int, source_scale: int, resample=lambda box: box):
    """What a block's sweep at `scale` reads of the parked level at `source_scale`: its cores grown by the
    2 px halo, through the resampling between the two levels."""
    return lambda box: clip(resample(halo_source(box, 2, grid.bounds(scale))), grid.bounds(source_scale))


# ---------------------------------------------------------------- memory: the model against live bytes


@pytest.mark.parametrize("encode", [False, True])
def test_exact_memory_model_matches_live_bytes(monkeypatch, encode):
    """A full-width VAE (128 channels) in bf16 on 'meta', 1024 x 768 px in 256 px tiles (4 x 3)."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", flash_like_sdpa)
    meta = torch.device("meta")
    model = build_vae(meta, torch.bfloat16)
    with torch.device(meta):
        given = torch.empty(1, 3, 768, 1024) if encode else torch.empty(1, 16, 96, 128)
    with torch.no_grad(), LiveBytes() as live:
        (V.encode if encode else V.decode)(model, given.bfloat16(), 256)
    assert vae_activations(1024, 768, 2, "exact", 256, encode) == pytest.approx(live.peak, rel=0.03)


def test_exact_memory_at_8k_by_hand():
    pixels, e = 8192 * 8192, 2
    stream = 128 * e * pixels * (1 + 1 / 8 + 1 / 64)  # the top level's residual stream, 8 x 8 tiles
    tile = 528 * e * 1024 * 1024  # one tile's working set
    assert vae_activations(8192, 8192, e, "exact", 1024, False) == math.ceil(stream) + tile  # 20.7 GB
    assert (
        vae_activations(8192, 8192, e, "exact", 1024, False, parked=False) == 64 * e * pixels
    )  # the mid block
    fast, untiled = (vae_activations(8192, 8192, e, t, 1024, False) for t in ("fast", "off"))
    assert fast < vae_activations(8192, 8192, e, "exact", 1024, False) < untiled / 4


# ---------------------------------------------------------------- the options


def opts(**kw) -> GenerateOptions:
    return GenerateOptions(prompts=["a castle"], **kw)


def test_auto_is_exact_where_the_recipe_tiled_before():
    stages = parse(opts(width=4096, height=4096)).stages
    assert [(s.long_side, s.vae_tiling, s.vae_tile, s.vae_tiles) for s in stages] == [
        (1024, "off", 1024, "off"),
        (4096, "exact", 1024, "exact"),
    ]


@pytest.mark.parametrize("asked", ["exact", "fast", "off"])
def test_an_asked_tiling_holds_in_every_stage(asked):
    stages = parse(opts(width=2048, height=2048, vae_tiling=asked, vae_tile=512)).stages
    assert [(s.vae_tiling, s.vae_tile) for s in stages] == [(asked, 512)] * 2
    assert [s.vae_tiles for s in stages] == ["off" if asked == "off" else asked] * 2


@pytest.mark.parametrize(
    "given, message",
    [
        ({"vae_tiling": "exakt"}, "unknown --vae-tiling 'exakt'; choose auto, exact, fast, off"),
        ({"vae_tile": 100}, "--vae-tile takes a multiple of 32 px, 64-16384; got 100"),
        ({"vae_tile": 32}, "--vae-tile takes a multiple of 32 px, 64-16384; got 32"),
        ({"vae_tile": 80}, "--vae-tile takes a multiple of 32 px, 64-16384; got 80"),
    ],
)
def test_bad_vae_options_are_one_clear_line(given, message, capsys):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(opts(**given))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in given.items()]
    code, out, err = run_cli(["a castle", *flags, "--dry-run"], capsys)
    assert code == 1 and err.strip() == f"error: {message}"


def _record(spec) -> ImageRecord:
    job = SimpleNamespace(prompt="a castle", seed=1, first=None, source=None, control_info=None)
    record = image_record(spec, job, list(spec.stages), {}, "bf16", "cpu")
    return ImageRecord.from_dict(json.loads(json.dumps(record.to_dict())))  # through the PNG's JSON


def test_the_record_keeps_what_was_asked_and_from_asks_it_again():
    record = _record(parse(opts(vae_tiling="fast", vae_tile=512)))
    assert (record.extra["vae_tiling"], record.extra["vae_tile"]) == ("fast", 512)
    again = options_from_record(record)
    assert (again.vae_tiling, again.vae_tile) == ("fast", 512)
    assert options_from_record(record, vae_tiling="exact").vae_tiling == "exact"  # a flag wins
    default = _record(parse(opts()))
    assert "vae_tiling" not in default.extra and "vae_tile" not in default.extra  # the default: left out
    assert (options_from_record(default).vae_tiling, options_from_record(default).vae_tile) == ("auto", None)


def test_a_record_from_before_the_field_loads_with_auto():
    old = ImageRecord.from_png(FIXTURES / "v0.1-castle-256x192.png")
    asked = options_from_record(old)
    assert (asked.vae_tiling, asked.vae_tile) == ("auto", None)
    assert [s.vae_tiles for s in parse(asked).stages] == ["off", "off"]  # 256 px: untiled, as it was made


def test_bench_image_takes_the_vae_tiling_only_there():
    from clear_gen.bench.spec import bench_options, parse_bench

    assert parse_bench(bench_options("image", vae_tiling="exact", device="cpu")).image == {
        "vae_tiling": "exact"
    }
    with pytest.raises(ConfigError, match="--vae-tiling is an option of --what image only"):
        parse_bench(bench_options("plan", vae_tiling="exact"))


# ---------------------------------------------------------------- a whole run


@pytest.mark.slow
@pytest.mark.usefixtures("offline_hub")
def test_generate_decodes_and_encodes_exactly_and_from_keeps_it(tiny, tmp_path, capsys):
    """Two stages (128 then 256 px, SDEdit: an encode and two decodes) in 64 px tiles: exact tiling makes
    the untiled image's pixels, diffusers' tiles do not; the PNG records it and --from asks it again."""
    args = ["a castle", "--model", str(tiny), "--stages", "128,256", "--seed", "3", "--steps", "2",
            "--first-steps", "2", "--max-sequence-length", "16", "--vae-tile", "64", "--no-compare-full",
            "--json"]  # fmt: skip
    made = {}
    for tiling in ("exact", "off", "fast"):
        code, out, err = run_cli([*args, "--vae-tiling", tiling, "--out", f"{tmp_path / tiling}/"], capsys)
        assert code == 0, err
        made[tiling] = json.loads(out.splitlines()[-1])
    exact, off, fast = (
        np.asarray(Image.open(made[t]["path"]), dtype=np.int16) for t in ("exact", "off", "fast")
    )
    assert np.abs(exact - off).max() <= 1 and np.abs(fast - off).mean() > 5 * np.abs(exact - off).mean()
    assert (made["exact"]["extra"]["vae_tiling"], made["exact"]["extra"]["vae_tile"]) == ("exact", 64)
    code, out, err = run_cli(["--from", made["exact"]["path"], "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert [s["vae_tiles"] for s in json.loads(out)["stages"]] == ["exact", "exact"]
