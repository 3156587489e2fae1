"""clear_gen.files.source: what `clear-gen upscale` reads, the prompt it finds, and the size it aims for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from clear_gen.errors import ConfigError
from clear_gen.files.output import save_png
from clear_gen.files.record import ImageRecord
from clear_gen.files.source import (
    check_larger,
    image_files,
    load_source,
    prompt_from_metadata,
    split_arguments,
    target_size,
)


def gradient(w: int = 40, h: int = 24, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2)
    return Image.fromarray(x).convert(mode)


def test_arguments_split_into_inputs_and_one_prompt(tmp_path):
    a, folder = tmp_path / "a.png", tmp_path / "dir"
    gradient().save(a)
    folder.mkdir()
    assert split_arguments([str(a), "a castle", str(folder)], None) == ([a, folder], "a castle")
    assert split_arguments([str(a)], "from --prompt") == ([a], "from --prompt")
    with pytest.raises(ConfigError, match="missing.png: no such file"):
        split_arguments([str(tmp_path / "missing.png"), "a castle"], None)
    with pytest.raises(ConfigError, match="more than one prompt"):
        split_arguments([str(a), "a castle", "at dawn"], None)
    with pytest.raises(ConfigError, match="no input image"):
        split_arguments(["a castle"], None)


def test_folder_expands_to_its_images_and_notes_what_it_skips(tmp_path):
    for name in ("b.png", "a.jpg", "c.webp"):
        gradient().save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link: unreadable
    files, notes = image_files([tmp_path])
    assert [(f.name, from_folder) for f, from_folder in files] == [
        ("a.jpg", True), ("b.png", True), ("c.webp", True)
    ]  # fmt: skip
    assert notes == [f"skipped {tmp_path / 'gone.png'}: not a readable file"]


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_formats_load_as_rgb_with_their_hash(tmp_path, fmt, suffix):
    path = tmp_path / f"x{suffix}"
    gradient().save(path, format=fmt)
    source = load_source(path)
    assert source.image.mode == "RGB" and source.size == (40, 24) and source.notes == []
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_alpha_16_bit_and_palette_are_converted(tmp_path):
    rgba = gradient(mode="RGBA")
    rgba.putalpha(0)  # fully transparent: white after flattening
    rgba.save(tmp_path / "alpha.png")
    source = load_source(tmp_path / "alpha.png")
    assert source.notes == ["alpha flattened onto white"]
    assert np.asarray(source.image).min() == 255
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    source = load_source(tmp_path / "deep.png")
    assert source.notes == ["16-bit converted to 8-bit"] and np.asarray(source.image).min() >= 254
    gradient().convert("P").save(tmp_path / "palette.png")
    source = load_source(tmp_path / "palette.png")
    assert source.image.mode == "RGB" and source.notes == ["palette converted to RGB"]  # said, as promised


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    gradient(40, 24).save(tmp_path / "rotated.jpg", exif=exif)
    source = load_source(tmp_path / "rotated.jpg")
    assert source.size == (24, 40) and source.notes == ["EXIF orientation 6 applied (24x40 upright)"]


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ConfigError, match="not an image clear-gen can read"):
        load_source(tmp_path / "text.png")
    gradient(200, 200).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot read .*cut.png"):
        load_source(tmp_path / "cut.png")


def test_prompt_from_a_clear_gen_png(tmp_path):
    record = ImageRecord(
        prompt="a red castle", seed=1, model="dev", steps=2, guidance=3.5, width=40, height=24
    )
    path = save_png(gradient(), tmp_path / "made.png", record)
    source = load_source(path)
    assert (source.prompt, source.prompt_from) == ("a red castle", "clear-gen")


def test_prompt_from_a1111_parameters_and_comfyui_graph(tmp_path):
    a1111 = "a castle,\nat dawn\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, Seed: 1"
    assert prompt_from_metadata({"parameters": a1111}) == ("a castle,\nat dawn", "parameters (A1111/Forge)")
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"positive": ["9", 0], "negative": ["7", 0]}},
        "9": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly", "clip": ["4", 1]}},
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    gradient().save(tmp_path / "comfy.png", pnginfo=info)
    source = load_source(tmp_path / "comfy.png")
    assert (source.prompt, source.prompt_from) == ("a lighthouse", "ComfyUI")
    assert prompt_from_metadata({}) == (None, None)


def test_target_size_keeps_the_ratio_and_says_when_it_rounds():
    w, h, note = target_size((1000, 700), 16, scale=2)
    assert (w % 16, h % 16) == (0, 0) and abs(w / h - 1000 / 700) < 0.02 and "2000x1400 exactly" in note
    assert target_size((1024, 768), 64, res=4096) == (4096, 3072, None)
    assert target_size((1024, 1024), 16) == (2048, 2048, None)  # the default: twice the size
    assert target_size((1024, 768), 16, width=2048) == (2048, 1536, None)
    with pytest.raises(ConfigError, match="not a multiple of 64"):
        target_size((1024, 768), 64, width=2000, height=1500)
    with pytest.raises(ConfigError, match="one of --res, --scale"):
        target_size((1024, 768), 16, res=2048, scale=2)
    with pytest.raises(ConfigError, match="beyond 16384"):
        target_size((4096, 4096), 16, scale=8)


def test_a_source_larger_than_the_target_is_refused():
    check_larger((1024, 768), (2048, 1536), Path("x.png"))
    with pytest.raises(ConfigError, match="upscale makes images larger.*--res 4096"):
        check_larger((2048, 1536), (1024, 768), Path("x.png"))
