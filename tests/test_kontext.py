"""FLUX.1 Kontext [dev] (models/flux1/kontext.py): a reference picture's tokens after the image's, CLEAR's
pattern over both grids, and `clear-gen edit`, on tiny models built here (CPU, no network).

The references here are written from the pattern's definition (README, "Editing: FLUX.1 Kontext"), not from
clear_gen's code: a reference token (y', x') of an h_r x w_r grid sits at ((y' + 1/2) h / h_r - 1/2,
(x' + 1/2) w / w_r - 1/2) on the image's h x w grid, compared in integers scaled by 2 h_r and 2 w_r; an
explicit boolean mask over row-major [text ; image ; reference] tokens, pooled keys by explicit loops, SDPA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import grid_ids, run_cli, tiny_inputs, tiny_transformer
from PIL import Image

from clear_gen import models
from clear_gen.attention import apply_clear
from clear_gen.core.geometry import (
    BLOCK,
    block_mask,
    build_block_lists,
    dense_mask,
    image_geometry,
    image_order,
    needed_pairs,
)
from clear_gen.core.positions import Grid, exact_ids, find_grid

pytestmark = pytest.mark.usefixtures("offline_hub")

FLUX1 = models.family("flux1")


# ---------------------------------------------------------------- the pattern, from its definition


def pattern(text_len: int, h: int, w: int, rh: int, rw: int, r: int, f: int) -> torch.Tensor:
    """(T + N + N_r, T + N + N_r + M) over ROW-MAJOR tokens [text ; image ; reference ; pooled]: True where a
    query (row) sees a key. A reference token's place on the image grid, times 2 h_r (rows) and 2 w_r
    (columns): ((2y' + 1) h - h_r, (2x' + 1) w - w_r); the image's (2 h_r y, 2 w_r x)."""
    n, nr = h * w, rh * rw
    m = (n + nr) // (f * f) if f > 1 else 0
    length = text_len + n + nr
    mask = torch.zeros(length, length + m, dtype=torch.bool)
    mask[:text_len, :length] = True  # text rows: text, image, reference; no pooled key
    mask[text_len:, :text_len] = True  # image and reference rows: all text ...
    mask[text_len:, length:] = True  # ... and every pooled key
    y, x = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    ry, rx = (t.flatten() for t in torch.meshgrid(torch.arange(rh), torch.arange(rw), indexing="ij"))
    image, ref = slice(text_len, text_len + n), slice(text_len + n, length)
    mask[image, image] = (y[:, None] - y) ** 2 + (x[:, None] - x) ** 2 < r * r
    mask[ref, ref] = (ry[:, None] - ry) ** 2 + (rx[:, None] - rx) ** 2 < r * r  # its own grid; no image key
    dy = (2 * rh * y)[:, None] - ((2 * ry + 1) * h - rh)  # in 1 / (2 h_r) of an image row
    dx = (2 * rw * x)[:, None] - ((2 * rx + 1) * w - rw)
    mask[image, ref] = dy**2 * (2 * rw) ** 2 + dx**2 * (2 * rh) ** 2 < r * r * (2 * rh) ** 2 * (2 * rw) ** 2
    return mask


def tile_ordered(mask: torch.Tensor, geo) -> torch.Tensor:
    """A row-major pattern as CLEAR's sequence holds it: image and reference tokens in their tile orders
    (pooled keys are a set: their order does not matter, both sides put the image's cells first)."""
    t, n = geo.text_len, geo.image_len
    order = torch.cat([torch.arange(t), t + image_order(geo), torch.arange(t + n, mask.shape[1])])
    return mask[order[: mask.shape[0]]][:, order]


GEOMETRIES = [  # (T, h, w, r, f, (h_r, w_r)): non-square, the reference smaller, larger, of another shape
    (7, 12, 20, 3, 1, (8, 8)),
    (5, 8, 12, 4, 2, (6, 4)),
    (130, 16, 24, 5, 4, (8, 12)),
    (0, 9, 13, 2, 1, (5, 7)),
    (3, 6, 10, 3, 1, (12, 20)),
    (128, 16, 32, 6, 4, (16, 16)),
]


@pytest.mark.parametrize("spec", GEOMETRIES, ids=str)
def test_mask_and_pair_count_equal_the_definition(spec):
    t, h, w, r, f, ref = spec
    geo = image_geometry(t, h, w, r, f, ref)
    want = tile_ordered(pattern(t, h, w, *ref, r, f), geo)
    assert torch.equal(dense_mask(geo), want)
    assert needed_pairs(geo) == int(want.sum())


@pytest.mark.parametrize("spec", GEOMETRIES, ids=str)
def test_analytic_block_lists_cover_the_mask_exactly(spec):
    """The BlockMask (no mask evaluated to build it) covers the dense mask's blocks exactly, and every block
    it calls full is full."""
    t, h, w, r, f, ref = spec
    geo = image_geometry(t, h, w, r, f, ref)
    want = tile_ordered(pattern(t, h, w, *ref, r, f), geo)
    assert torch.equal(block_mask(geo, "cpu").to_dense()[0, 0], _blocks_touched(want))
    nq, nk = math.ceil(geo.q_len / BLOCK), math.ceil(geo.kv_len / BLOCK)
    padded = torch.ones(nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    padded[: geo.q_len, : geo.kv_len] = want
    truly_full = padded.view(nq, BLOCK, nk, BLOCK).all(3).all(1)
    lists = build_block_lists(geo)
    for i in range(nq):
        assert all(truly_full[i, j] for j in lists.full_idx[i, : lists.full_num[i]].tolist()), i


def _blocks_touched(mask: torch.Tensor) -> torch.Tensor:
    nq, nk = math.ceil(mask.shape[0] / BLOCK), math.ceil(mask.shape[1] / BLOCK)
    padded = torch.zeros(nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.view(nq, BLOCK, nk, BLOCK).any(3).any(1).int()


def test_a_window_wider_than_every_grid_is_one_geometry_and_the_same_mask():
    wide, wider = image_geometry(3, 6, 10, 40, 1, (12, 4)), image_geometry(3, 6, 10, 400, 1, (12, 4))
    assert wide == wider and torch.equal(
        dense_mask(wide), tile_ordered(pattern(3, 6, 10, 12, 4, 400, 1), wide)
    )


# ---------------------------------------------------------------- positions


def kontext_ids(h: int, w: int, rh: int, rw: int, dtype=torch.float32) -> torch.Tensor:
    """img_ids as FluxKontextPipeline passes them: the image's [0, row, col], then the reference's
    [1, row, col]."""
    ref = grid_ids(rh, rw)
    ref[:, 0] = 1
    return torch.cat([grid_ids(h, w), ref]).to(dtype)


def test_the_reference_grid_is_found_from_its_ids_in_any_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        grid = find_grid(kontext_ids(300, 20, 64, 48, dtype))  # bf16 rounds the image's rows above 256
        assert grid == Grid(300, 20, reference=Grid(64, 48, index=1))
        assert torch.equal(exact_ids(grid), kontext_ids(300, 20, 64, 48))
    assert find_grid(grid_ids(5, 7)).reference is None


# ---------------------------------------------------------------- the transformer against the dense one


def pooled(x: torch.Tensor, start: int, h: int, w: int, f: int) -> torch.Tensor:
    """Means over f x f cells of the h x w row-major tokens of x (B, L, H, D) from `start`: (B, M, H, D)."""
    grid = x[:, start : start + h * w].view(x.shape[0], h, w, *x.shape[2:])
    cells = [
        sum(grid[:, cy * f + i, cx * f + j] for i in range(f) for j in range(f)) / f**2
        for cy in range(h // f)
        for cx in range(w // f)
    ]
    return torch.stack(cells, 1)


def reference_forward(model, inputs: dict, text_len: int, h, w, rh, rw, r, f, monkeypatch):
    """The stock transformer with diffusers' attention kernel replaced by SDPA under `pattern`'s mask."""
    import diffusers.models.transformers.transformer_flux as T

    mask = pattern(text_len, h, w, rh, rw, r, f)

    def masked(query, key, value, attn_mask=None, **kwargs):  # (B, L, H, D) each
        assert attn_mask is None and query.shape[1] == text_len + h * w + rh * rw
        if f > 1:
            key = torch.cat(
                [key, pooled(key, text_len, h, w, f), pooled(key, text_len + h * w, rh, rw, f)], 1
            )
            value = torch.cat(
                [value, pooled(value, text_len, h, w, f), pooled(value, text_len + h * w, rh, rw, f)], 1
            )
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(T, "dispatch_attention_fn", masked)
        return model(**inputs).sample


def kontext_inputs(batch: int, text_len: int, h: int, w: int, rh: int, rw: int) -> dict:
    inputs = tiny_inputs(batch, text_len, h, w)
    g = torch.Generator().manual_seed(5)
    reference = torch.randn(batch, rh * rw, 4, generator=g)
    return {**inputs, "hidden_states": torch.cat([inputs["hidden_states"], reference], 1),
            "img_ids": kontext_ids(h, w, rh, rw)}  # fmt: skip


@pytest.mark.parametrize("backend", ["dense", "gather", "gather-evaluated"])
@pytest.mark.parametrize(
    ("h", "w", "rh", "rw", "r", "f"),
    [
        (6, 10, 4, 4, 2, 1),
        (8, 12, 4, 8, 3, 2),
        (8, 4, 12, 8, 3, 4),
        (16, 12, 8, 8, 4, 4),
        (20, 12, 12, 8, 5, 4),
    ],
)
def test_clear_with_a_reference_equals_the_dense_reference(h, w, rh, rw, r, f, backend, monkeypatch):
    """gather-evaluated: gather with no mask patterns kept (evaluated per chunk), as for references whose
    scale makes more than MAX_PATTERNS of them."""
    from clear_gen.attention import gather

    if backend == "gather-evaluated":
        monkeypatch.setattr(gather, "MAX_PATTERNS", 1)
        gather.patterns.cache_clear(), gather._on_device.cache_clear()
    model, text_len = tiny_transformer(layers=2, single_layers=2), 5
    inputs = kontext_inputs(2, text_len, h, w, rh, rw)
    want = reference_forward(model, inputs, text_len, h, w, rh, rw, r, f, monkeypatch)
    apply_clear(model, window=r, down_factor=f, backend=backend.removesuffix("-evaluated"))
    with torch.no_grad():
        got = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    gather.patterns.cache_clear(), gather._on_device.cache_clear()


@pytest.mark.slow
def test_flex_with_a_reference_equals_the_dense_reference(monkeypatch):
    """One compiled case (CPU compiles are slow): more than one block, the reference a block of its own."""
    h, w, rh, rw, r, f = 16, 12, 8, 8, 4, 4
    model, text_len = tiny_transformer(), 128
    inputs = kontext_inputs(1, text_len, h, w, rh, rw)
    want = reference_forward(model, inputs, text_len, h, w, rh, rw, r, f, monkeypatch)
    apply_clear(model, window=r, down_factor=f, backend="flex")
    with torch.no_grad():
        got = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- Kontext's call, through any FLUX.1 pipeline


def test_the_reference_size_is_kontexts_nearest_preferred_size():
    assert FLUX1.reference_size(3000, 2000, 16) == (1248, 832)  # diffusers' choice for 3:2
    assert FLUX1.reference_size(3000, 2000, 64) == (1280, 832)  # each grid divisible by f = 4
    assert FLUX1.reference_size(500, 500, 64) == (1024, 1024)
    assert FLUX1.reference_size(100, 1000, 16) == (672, 1568)


def picture(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("attention", ["stock", "clear"])
def test_flux_pipeline_with_the_reference_is_flux_kontext_pipeline(tiny_kontext, attention):
    """Kontext's text-to-image pass through FluxPipeline and reference_tokens is diffusers' own
    FluxKontextPipeline's, bit for bit, with stock attention and with CLEAR (which sees the same sequence)."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_kontext)  # the Kontext folder, as clear-gen loads it
    kontext = FluxKontextPipeline(**pipe.components)
    if attention == "clear":
        apply_clear(pipe.transformer, window=3, down_factor=2, backend="dense")
    call = dict(prompt="make it red", width=96, height=64, num_inference_steps=2, guidance_scale=2.5,
                max_sequence_length=16, output_type="latent")  # fmt: skip
    ref = picture(128, 64)  # a reference of another size and shape than the output
    want = kontext(
        image=ref, max_area=96 * 64, _auto_resize=False, generator=torch.Generator().manual_seed(1), **call
    )
    latents, grid = FLUX1.reference_latents(pipe, ref, 128, 64)
    assert latents.shape == (1, 8 * 4, 64) and grid == Grid(4, 8, index=1)
    with FLUX1.reference_tokens(pipe.transformer, latents, grid):
        got = pipe(generator=torch.Generator().manual_seed(1), **call)
    assert torch.equal(got.images, want.images)
    with torch.no_grad():  # and the hook is gone after
        pipe.transformer(**{**tiny_call(pipe, 4 * 6), "img_ids": grid_ids(4, 6)})


def tiny_call(pipe, tokens: int) -> dict:
    """A transformer call of the tiny pipeline on `tokens` image tokens."""
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, tokens, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        txt_ids=torch.zeros(4, 3),
        guidance=torch.tensor([2.5]),
    )


# ---------------------------------------------------------------- clear-gen edit


def edit_args(model: Path, picture_path: Path, out: Path, *extra: str) -> list[str]:
    small = ["--steps", "2", "--first-steps", "2", "--max-sequence-length", "16", "--seed", "3"]
    return ["edit", str(picture_path), "make it red", "--model", str(model), "--out", f"{out}/", *small,
            "--device", "cpu", "--json", *extra]  # fmt: skip


CLEAR_STAGES = ["--res", "256", "--stages", "128,256", "--window", "2", "--down-factor", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_edit_runs_kontext_then_clear_with_the_reference(tiny_kontext, tmp_path, capsys, dtype):
    """A 128 px first pass with the reference, then a CLEAR SDEdit stage at 256 x 192 with it (gather); the
    record names the picture (path, size, sha256) and `--from` edits it again, the same pixels."""
    import hashlib

    picture(300, 200).save(tmp_path / "photo.png")
    args = edit_args(tiny_kontext, tmp_path / "photo.png", tmp_path / "a", *CLEAR_STAGES, "--dtype", dtype)
    code, out, err = run_cli([*args, "--backend", "gather"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert Image.open(row["path"]).size == (256, 192)  # the picture's 3:2, in multiples of 64 px
    source = row["extra"]["edit_source"]
    digest = hashlib.sha256((tmp_path / "photo.png").read_bytes()).hexdigest()
    assert source == {"file": str(tmp_path / "photo.png"), "sha256": digest, "width": 300, "height": 200}
    assert row["extra"]["recipe"] == "kontext" and row["guidance"] == 2.5
    assert [s["attention"] for s in row["timings"]["stages"]] == ["full", "CLEAR r=2 f=2"]
    assert row["timings"]["stages"][1]["density"] < 0.3
    if dtype == "bf16":
        return
    code, out, err = run_cli(["--from", row["path"], "--out", f"{tmp_path / 'b'}/", "--json"], capsys)
    assert code == 0, err
    again = json.loads(out)
    assert again["extra"]["edit_source"] == source
    assert np.array_equal(*(np.asarray(Image.open(p)) for p in (row["path"], again["path"])))
    picture(300, 200, seed=1).save(tmp_path / "photo.png")  # the picture changed since: said, not refused
    code, out, err = run_cli(["edit", "--from", row["path"], "--dry-run", "--json"], capsys)
    assert code == 0 and any(
        "photo.png changed since the image was made" in n for n in json.loads(out)["notes"]
    )


def test_the_plan_counts_the_reference_tokens(tiny_kontext, tmp_path, capsys):
    picture(300, 200).save(tmp_path / "photo.png")
    args = edit_args(tiny_kontext, tmp_path / "photo.png", tmp_path, *CLEAR_STAGES, "--dry-run")
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    stages = json.loads(out)["stages"]
    reference = (1280 // 16) * (832 // 16)  # 3:2 -> Kontext's 1248 x 832, in multiples of 64 px
    first = 8 * 6  # the first pass at the target's 4:3, 128 x 96 px (16 px rounding)
    assert [s["tokens"] for s in stages] == [first + reference, 16 * 12 + reference]


def test_what_an_edit_cannot_take_is_one_line(tiny, tiny_kontext, tmp_path, capsys):
    picture(300, 200).save(tmp_path / "photo.png")
    photo = str(tmp_path / "photo.png")
    cases = [
        (["edit", str(tmp_path / "missing.png"), "make it red"], "no such file"),
        (["edit", "make it red"], "no picture to edit"),
        (["edit", photo, photo, "make it red"], "one picture"),
        (["edit", str(tmp_path), "make it red"], "is a folder"),
        (["edit", photo], "needs an instruction"),
        (["edit", photo, "make it red", "--model", str(tiny), "--dry-run"], "does not edit pictures"),
        (["edit", photo, "make it red", "--model", "dev", "--dry-run"], "does not edit pictures"),
        (
            ["edit", photo, "make it red", "--model", str(tiny_kontext), "--direct", "--stages", "1024"],
            "only one",
        ),
    ]
    for args, message in cases:
        code, out, err = run_cli(args, capsys)
        assert code == 1 and message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
