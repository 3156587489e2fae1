"""Output: slugs, never-overwriting names, atomic PNG saves with metadata, and `clear-gen info`."""

from __future__ import annotations

import errno
import io
import json
import os
import warnings
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from clear_gen.cli import app, main
from clear_gen.errors import OutputError
from clear_gen.files import output
from clear_gen.files.output import output_path, save_png, slugify
from clear_gen.files.record import PARAMS_KEY, ImageRecord, describe, record_from_image


def make_record(**overrides) -> ImageRecord:
    fields = dict(
        prompt="A castle on a hill at dawn",
        seed=7,
        model="flux-dev",
        variant="r16",
        window=16,
        down_factor=4,
        steps=20,
        guidance=3.5,
        width=64,
        height=48,
        stages=[1024, 4096],
        strength=0.6,
        timings={"stage 1": 12.25, "stage 2": 301.5, "total": 313.75},
        version="0.1.0",
        extra={"ntk_factor": 10.0, "proportional_attention": True, "max_sequence_length": 512},
    )
    return ImageRecord(**(fields | overrides))


def small_image() -> Image.Image:
    return Image.linear_gradient("L").resize((64, 48)).convert("RGB")


def saved(tmp_path: Path, record: ImageRecord | None = None, name: str = "img.png") -> Path:
    record = record or make_record()
    return save_png(small_image(), output_path(tmp_path / name, record), record)


# ---- slugify ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, slug",
    [
        ("A Castle on a Hill!", "a-castle-on-a-hill"),
        ("  café   crème brûlée  ", "cafe-creme-brulee"),
        ("photo, 8K, f/1.8 -- bokeh", "photo-8k-f-1-8-bokeh"),
        ("日本の城", "image"),
        ("", "image"),
        ("!!! ...", "image"),
        ("ﬁne Ⅻ", "fine-xii"),  # NFKD compatibility forms
    ],
)
def test_slugify(prompt: str, slug: str) -> None:
    assert slugify(prompt) == slug


def test_slugify_cuts_at_a_word() -> None:
    slug = slugify("a very long prompt about " + "castles " * 20, max_len=30)
    assert len(slug) <= 30 and not slug.endswith("-")
    assert slug == "a-very-long-prompt-about"
    assert slugify("x" * 100, max_len=10) == "x" * 10


# ---- names --------------------------------------------------------------------------------------------


def test_default_is_current_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = output_path(None, make_record())
    assert path.resolve() == tmp_path / "a-castle-on-a-hill-at-dawn-7-64x48.png"


def test_directory_and_trailing_slash(tmp_path: Path) -> None:
    path = output_path(tmp_path, make_record())
    assert path == tmp_path / "a-castle-on-a-hill-at-dawn-7-64x48.png"
    new = output_path(f"{tmp_path}/new/sub/", make_record(seed=3))
    assert new == tmp_path / "new" / "sub" / "a-castle-on-a-hill-at-dawn-3-64x48.png"
    assert new.parent.is_dir()
    indexed = output_path(tmp_path / "shot.png", make_record(), index=2)
    assert indexed == tmp_path / "shot-2.png"


def test_explicit_file(tmp_path: Path) -> None:
    path = output_path(tmp_path / "deep" / "castle.PNG", make_record())
    assert path == tmp_path / "deep" / "castle.PNG"
    with pytest.raises(OutputError, match=r"\.png"):
        output_path(tmp_path / "castle.jpg", make_record())


def test_collisions_never_overwrite(tmp_path: Path) -> None:
    first = saved(tmp_path)
    before = first.read_bytes()
    second = saved(tmp_path, make_record(prompt="another"))
    third = saved(tmp_path, make_record(prompt="third"))
    assert (first.name, second.name, third.name) == ("img.png", "img-1.png", "img-2.png")
    assert first.read_bytes() == before
    assert record_from_image(second).prompt == "another"


def test_reserved_names_are_not_handed_out_twice(tmp_path: Path) -> None:
    names = output.Names()  # a run's: its images are named before they are saved
    a = output_path(tmp_path, make_record(), names=names)
    b = output_path(tmp_path, make_record(), names=names)
    assert a != b and b.name.endswith("-1.png")
    names.release(a)
    assert output_path(tmp_path, make_record(), names=names) == a  # released names are free again
    assert output_path(tmp_path, make_record()) == a  # another run's names are not this run's


def test_name_taken_between_output_path_and_save(tmp_path: Path) -> None:
    record = make_record()
    path = output_path(tmp_path / "img.png", record)
    path.write_bytes(b"someone else's file")
    final = save_png(small_image(), path, record)
    assert final == tmp_path / "img-1.png"
    assert path.read_bytes() == b"someone else's file"
    assert record_from_image(final) == record


def test_unwritable_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker / "x.png", f"{blocker}/dir/"):
        with pytest.raises(OutputError) as e:
            output_path(out, make_record())
        message = str(e.value)
        assert str(blocker) in message and "\n" not in message and "choose another --out" in message
    with pytest.raises(OutputError, match="cannot write"):
        save_png(small_image(), blocker / "x.png", make_record())


# ---- save and read back -------------------------------------------------------------------------------


def test_round_trip_every_field(tmp_path: Path) -> None:
    record = make_record(prompt="Ein Schloß 🏰 on a hill, «dawn»\nsecond line", extra={"negative": "blur"})
    path = saved(tmp_path, record)
    loaded = ImageRecord.from_png(path)
    assert loaded == record
    assert ImageRecord.from_png(saved(tmp_path, make_record(stages=(1024, 2048)))).stages == [1024, 2048]
    assert loaded.timings == {"stage 1": 12.25, "stage 2": 301.5, "total": 313.75}
    with Image.open(path) as im:
        assert im.size == (64, 48) and im.mode == "RGB"
        text = im.text
    assert text["clear-gen:prompt"] == record.prompt
    assert json.loads(text["clear-gen:seed"]) == 7
    assert json.loads(text["clear-gen:stages"]) == [1024, 4096]
    assert text["parameters"].startswith(record.prompt + "\nNegative prompt: blur\nSteps: 20, Seed: 7")
    assert "Size: 64x48" in text["parameters"]


def test_round_trip_minimal_record(tmp_path: Path) -> None:
    record = ImageRecord(prompt="", seed=0, model="flux-schnell", steps=4, guidance=0.0, width=64, height=48)
    assert record.variant is None and record.version  # version defaults to the package's
    assert ImageRecord.from_png(saved(tmp_path, record)) == record


def test_reading_does_not_decode_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = saved(tmp_path)

    def no_load(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    assert ImageRecord.from_png(path) == make_record()


def test_chunks_after_image_data_are_found(tmp_path: Path) -> None:
    record = make_record()
    info = PngImagePlugin.PngInfo()
    for key, value in record.to_text_chunks().items():
        info.add_text(key, value)
    plain = io.BytesIO()
    small_image().save(plain, format="PNG")
    raw = plain.getvalue()
    iend = raw.rindex(b"IEND") - 4  # the chunk starts with its 4-byte length
    late = io.BytesIO()
    for cid, data, *_ in info.chunks:
        PngImagePlugin.putchunk(late, cid, data)
    (tmp_path / "a.png").write_bytes(raw[:iend] + late.getvalue() + raw[iend:])  # as some editors write
    with Image.open(tmp_path / "a.png") as im:
        assert "clear-gen:params" not in im.info  # really after the image data
    assert ImageRecord.from_png(tmp_path / "a.png") == record


def test_per_field_chunks_suffice_and_unknown_keys_go_to_extra(tmp_path: Path) -> None:
    record = make_record(variant=None, prompt="null")
    info = PngImagePlugin.PngInfo()
    for key, value in record.to_text_chunks().items():
        if key != PARAMS_KEY:
            info.add_text(key, value)
    info.add_text("clear-gen:future_field", "42")
    small_image().save(tmp_path / "x.png", pnginfo=info)
    loaded = ImageRecord.from_png(tmp_path / "x.png")
    assert loaded.extra.pop("future_field") == 42
    assert loaded == record


class Interrupting:
    """An image whose save writes part of a PNG, then fails like Ctrl-C or a full disk."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def save(self, fp, **kwargs) -> None:
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
        raise self.exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_failed_save_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    record = make_record()
    names = output.Names()
    path = output_path(tmp_path, record, names=names)
    with pytest.raises(KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else OutputError):
        save_png(Interrupting(exc), path, record, names)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []  # neither the final name nor the .part file
    assert output_path(tmp_path, record, names=names) == path  # and the name was released


def test_temp_file_is_hidden_part_beside_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_link = os.link

    def spy(src, dst, *args, **kwargs):
        seen.append(Path(src))
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", spy)
    final = saved(tmp_path)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".part")
    assert not tmp.exists() and os.listdir(tmp_path) == [final.name]


def test_falls_back_to_rename_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "img.png").write_bytes(b"existing")
    final = saved(tmp_path)
    assert final.name == "img-1.png" and (tmp_path / "img.png").read_bytes() == b"existing"
    assert sorted(os.listdir(tmp_path)) == ["img-1.png", "img.png"]
    assert record_from_image(final) == make_record()


def test_read_errors(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    cases = {
        "missing.png": "no such file",
        "text.png": "not an image",
        "photo.jpg": "JPEG image, not a PNG",
        "plain.png": r"was not made by clear-gen \(no clear-gen metadata\)",
    }
    for name, message in cases.items():
        with pytest.raises(OutputError, match=message):
            ImageRecord.from_png(tmp_path / name)


def test_huge_and_corrupt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = saved(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 3)  # 64x48 is now a "bomb" (> 2x limit)
    with pytest.raises(OutputError, match="larger than any image"):
        ImageRecord.from_png(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 - 1)  # now only a warning, silenced
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageRecord.from_png(path) == make_record()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(OutputError, match="truncated.png"):
        ImageRecord.from_png(truncated)


def test_incomplete_metadata(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("clear-gen:params", json.dumps({"prompt": "p", "seed": 1}))
    small_image().save(tmp_path / "x.png", pnginfo=info)
    with pytest.raises(OutputError, match=r"x\.png: clear-gen metadata is incomplete"):
        ImageRecord.from_png(tmp_path / "x.png")


def test_describe_leaves_out_unset_fields_and_timings() -> None:
    record = make_record(variant=None, extra={"ntk_factor": 10.0, "max_sequence_length": None})
    rows = dict(describe(record))
    assert rows["prompt"] == "A castle on a hill at dawn"
    assert rows["size"] == "64x48" and rows["stages"] == "1024 -> 4096"
    assert rows["ntk_factor"] == "10.0"
    assert "variant" not in rows and "max_sequence_length" not in rows  # None: not shown
    assert not any("time" in name for name in rows)  # `info` shows them as a table of their own


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_info_table_and_json(tmp_path: Path) -> None:
    path = saved(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "A castle on a hill at dawn" in result.output and "1024 -> 4096" in result.output
    assert '"stage 2": 301.5' in result.output  # timings not written by clear-gen: shown as they are
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == make_record().to_dict()


def test_cli_info_bad_file_with_runner(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["info", str(tmp_path / "missing.png")])
    assert result.exit_code == 1 and isinstance(result.exception, OutputError)


def test_main_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["info", str(path), "--json"])
    assert e.value.code == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 7


@pytest.mark.parametrize("name", ["missing[1].png", "plain.png"])
def test_main_info_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    bad = tmp_path / ("a-long-directory-name-" * 4) / name
    bad.parent.mkdir()
    if name == "plain.png":
        (tmp_path / "plain.png").rename(bad)
    with pytest.raises(SystemExit) as e:
        main(["info", str(bad)])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "Traceback" not in captured.err
