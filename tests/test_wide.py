"""Wide pictures: the first pass's size at every aspect ratio (a table written by hand, and the rule's
properties from 1:1 to 64:1), records made before the rule keep their first pass (`--from`), and
2048x6144 and 6144x1536 through the whole recipe from the command line on a tiny pipeline in bf16: first
pass at the target's aspect, the CLEAR SDEdit stage guided (cosine-decay, beyond 2:1), exact VAE tiles in
the large stage, the PNG's size and record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from clear_gen.files.record import ImageRecord
from clear_gen.plan.parse import parse
from clear_gen.plan.records import options_from_record
from clear_gen.plan.spec import GenerateOptions

pytestmark = pytest.mark.usefixtures("offline_hub")


def stages(width: int, height: int, **kw):
    return parse(GenerateOptions(prompts=["a harbour"], width=width, height=height, **kw)).stages


# ---------------------------------------------------------------- the first pass's size


FIRST_PASS = {  # target: its first pass, worked out by hand (long side 1024, short side at least 256)
    (4096, 4096): (1024, 1024),
    (4096, 2048): (1024, 512),  # the reference notebook's 2:1 first pass
    (3072, 2048): (1024, 688),  # 682.7 -> 688 (16 px), not 704 (r8-down4's 64 px: a 3% stretch)
    (2048, 6144): (336, 1024),  # 341.3 -> 336, not 320 (a 6.7% stretch)
    (6144, 1536): (1024, 256),  # 4:1: the short side is exactly the least
    (8192, 1024): (2048, 256),  # 8:1: 1024x128 would be 8 tokens tall; the long side grows instead
    (8192, 768): (2736, 256),  # 10.7:1: 2730.7 -> 2736
    (1536, 16384): (256, 2736),  # 10.7:1 standing: 2730.7 -> 2736
    (16384, 1024): (4096, 256),  # 16:1
}


@pytest.mark.parametrize("target, first", FIRST_PASS.items(), ids=[f"{w}x{h}" for w, h in FIRST_PASS])
def test_the_first_pass_of_each_aspect_by_hand(target, first):
    first_pass, sdedit = stages(*target)
    assert (first_pass.width, first_pass.height) == first
    assert (sdedit.width, sdedit.height) == target and sdedit.clear and sdedit.sdedit
    assert not first_pass.clear and not first_pass.sdedit  # the original model, text-to-image
    assert (first_pass.ntk_factor, first_pass.proportional) == (1.0, False)  # at any long side
    assert (sdedit.ntk_factor, sdedit.proportional) == (10.0, True)


RATIOS = [1, 1.25, 1.5, 16 / 9, 2, 2.4, 3, 3.5, 4, 5, 6, 7.3, 8, 10, 12, 16, 20, 32, 64]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("long_side", [2048, 4096, 8192, 16384])
@pytest.mark.parametrize("standing", [False, True])
def test_the_first_pass_keeps_the_aspect_and_a_short_side_of_at_least_256(ratio, long_side, standing):
    """At every ratio the first pass keeps the target's aspect to within its 16 px rounding, its sides are
    whole tokens, its long side is 1024 px unless its short side would fall below 256 px, and it is smaller
    than the target; a target whose short side is 256 px or less is one full-attention pass."""
    short = max(64, round(long_side / ratio / 64) * 64)  # a valid r8-down4 target near this ratio
    width, height = (short, long_side) if standing else (long_side, short)
    made = stages(width, height)
    if short <= 256:
        assert [(s.width, s.height, s.clear, s.sdedit) for s in made] == [(width, height, False, False)]
        return
    first, target = made
    assert first.width % 16 == 0 and first.height % 16 == 0
    scale = max(first.width, first.height) / long_side  # the first pass's long side over the target's
    assert abs(first.width - width * scale) <= 8 and abs(first.height - height * scale) <= 8
    assert min(first.width, first.height) >= 256
    assert max(first.width, first.height) == 1024 or min(first.width, first.height) == 256
    assert first.width < width and first.height < height and (target.width, target.height) == (width, height)
    assert target.guide == ("cosine-decay" if long_side > 4096 or long_side > 2 * short else "none")


def test_a_short_side_of_256_or_less_is_one_pass_and_said_so(tiny, capsys):
    code, out, err = run_cli(
        ["a harbour", "--model", str(tiny), "--width", "4096", "--height", "256", "--dry-run", "--json"],
        capsys,
    )
    assert code == 0, err
    planned = json.loads(out)
    assert [(s["width"], s["height"]) for s in planned["stages"]] == [(4096, 256)]
    assert planned["notes"] == [
        "4096x256: the original weights with full attention, in one pass: a short side of 256 px or less "
        "is the first pass's own (--variant or --window forces CLEAR)"
    ]


# ---------------------------------------------------------------- the record and --from


def record(width: int, height: int, long_sides: list[int], **extra) -> ImageRecord:
    return ImageRecord(prompt="a harbour", seed=1, model="dev", variant="r8-down4", window=8, down_factor=4,
                       steps=20, guidance=7.5, width=width, height=height, stages=long_sides, strength=0.7,
                       extra={"first_steps": 20, "first_guidance": 3.5, **extra})  # fmt: skip


def test_a_record_from_before_the_rule_keeps_its_first_pass():
    """Made when the first pass was rounded to r8-down4's 64 px: --from makes it at 1024x704 again."""
    old = options_from_record(record(3072, 2048, [1024, 3072]))
    assert old.first_size == "1024x704"
    assert [(s.width, s.height) for s in parse(old).stages] == [(1024, 704), (3072, 2048)]
    new = options_from_record(record(3072, 2048, [1024, 3072], first_size="1024x688"))
    assert [(s.width, s.height) for s in parse(new).stages] == [(1024, 688), (3072, 2048)]


def test_a_new_size_over_from_sizes_the_first_pass_again(tmp_path):
    from clear_gen.cli.options import generate_options
    from clear_gen.files.output import save_png

    path = save_png(Image.new("RGB", (64, 64)), tmp_path / "x.png", record(3072, 2048, [1024, 3072]))
    assert generate_options({"proportional_attention": "auto"}, path).first_size == "1024x704"
    resized = generate_options({"proportional_attention": "auto", "width": 2048, "height": 6144}, path)
    assert resized.first_size is None
    assert [(s.width, s.height) for s in parse(resized).stages] == [(336, 1024), (2048, 6144)]


# ---------------------------------------------------------------- the whole recipe, end to end


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """The tiny pipeline with a 4-channel VAE without its mid block's attention: exact tiling runs the mid
    block on the whole latent, untiled, so the attention adds nothing to what is tested here, and over the
    197K latent pixels of 2048x6144 px it alone would take ~35 s a decode on 2 CPU cores. (Exact against
    untiled, mid attention included: test_vae_tiling.py.)"""
    from tiny_pipeline import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("narrow"), vae_channels=4, vae_attention=False)


@pytest.fixture
def spies(monkeypatch):
    """What ran: exact tiled decodes and encodes (their latent's shapes) and guided steps."""
    import clear_gen.run.guide as G
    from clear_gen.models.flux1 import vae as V

    seen = {"decode": [], "encode": [], "guided": []}
    decode, encode, guided = V.decode, V.encode, G.guided_velocity

    def spy_decode(vae, z, *args, **kw):
        seen["decode"].append(tuple(z.shape[2:]))
        return decode(vae, z, *args, **kw)

    def spy_encode(vae, x, *args, **kw):
        seen["encode"].append(tuple(s // 8 for s in x.shape[2:]))
        return encode(vae, x, *args, **kw)

    def spy_guided(kind, *args):
        seen["guided"].append(kind)
        return guided(kind, *args)

    monkeypatch.setattr(V, "decode", spy_decode)
    monkeypatch.setattr(V, "encode", spy_encode)
    monkeypatch.setattr(G, "guided_velocity", spy_guided)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "width, height, first", [(2048, 6144, (336, 1024)), (6144, 1536, (1024, 256))], ids=["1x3", "4x1"]
)
def test_a_wide_picture_runs_the_whole_recipe(narrow, tmp_path, capsys, spies, width, height, first):
    """clear-gen at the target, CLEAR r = 8, f = 4 (r8-down4's geometry, training-free: the tiny model has
    no published weights), 2 steps, bf16, 1024 px VAE tiles (FLUX.1's)."""
    args = ["a harbour at dusk", "--model", str(narrow), "--width", str(width), "--height", str(height),
            "--window", "8", "--down-factor", "4", "--steps", "2", "--first-steps", "1", "--seed", "5",
            "--max-sequence-length", "16", "--dtype", "bf16", "--device", "cpu", "--vae-tile", "1024",
            "--no-compare-full", "--out", f"{tmp_path}/", "--json"]  # fmt: skip
    began = time.perf_counter()
    code, out, err = run_cli(args, capsys)
    seconds = time.perf_counter() - began
    assert code == 0, err
    made = json.loads(out.splitlines()[-1])
    # 1. The stages: a first pass at the target's aspect, then one CLEAR SDEdit stage at the target.
    ran = made["timings"]["stages"]
    assert [(s["width"], s["height"], s["attention"]) for s in ran] == [
        (*first, "full"),
        (width, height, "CLEAR r=8 f=4"),
    ]
    scale = max(first) / max(width, height)
    assert abs(first[0] - width * scale) <= 8 and abs(first[1] - height * scale) <= 8  # 16 px rounding
    assert f"stage 1/2: {first[0]}x{first[1]}, full attention, 1 step" in err
    # 2. Guided (beyond 2:1: the recipe's cosine-decay), at every step of the CLEAR stage only.
    assert f"stage 2/2: {width}x{height}, CLEAR, cosine-decay guidance, 2 steps" in err
    assert spies["guided"] == ["cosine-decay"] * 2
    # 3. The large stage's VAE in exact tiles: its start picture encoded, its result decoded; the first
    #    pass (at most 1024 px, one tile) decoded whole.
    latent = (height // 8, width // 8)
    assert spies["encode"] == [latent] and spies["decode"] == [latent]
    assert f"decoding {width}x{height} in exact tiles of 1024 px with the VAE" in err
    # 4. The PNG: its size and its record (what --from re-makes).
    path = Path(made["path"])
    assert Image.open(path).size == (width, height)
    saved = ImageRecord.from_png(path)
    assert (saved.width, saved.height, saved.stages) == (width, height, [max(first), max(width, height)])
    assert (saved.variant, saved.window, saved.down_factor, saved.steps, saved.strength) == (
        "custom", 8, 4, 2, 0.7
    )  # fmt: skip
    extra = saved.extra
    assert (extra["guide"], extra["guide_level"], extra["dtype"]) == ("cosine-decay", 1, "bf16")
    assert (extra["first_size"], extra["vae_tile"]) == (f"{first[0]}x{first[1]}", 1024)
    again = options_from_record(saved)
    assert [(s.width, s.height) for s in parse(again).stages] == [first, (width, height)]
    print(f"{width}x{height}: {seconds:.1f} s")  # pytest -s shows it
