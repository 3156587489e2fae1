"""The pictures `clear-gen upscale` starts from: which arguments they are, reading them, their prompt,
and the size to reach.

Any picture works: a clear-gen PNG, another FLUX tool's, a render or a photo (PNG, JPEG, WebP). The
prompt comes from the user, else from the picture's metadata (clear-gen's record; the A1111/Forge
`parameters` text; ComfyUI's `prompt` graph, the positive text encoder's input), else it is empty.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.sizes import MAX_SIDE, MIN_SIDE, check_size, round_size
from ..errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Source:
    path: Path
    image: object  # PIL.Image.Image, RGB
    sha256: str
    prompt: str | None = None  # from the picture's metadata
    prompt_from: str | None = None  # "clear-gen", "parameters (A1111/Forge)", "ComfyUI"
    notes: list[str] = field(default_factory=list)  # what was done to read it: alpha flattened, ...

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


# ---------------------------------------------------------------- arguments


def split_arguments(args: list[str], prompt: str | None) -> tuple[list[Path], str | None]:
    """(inputs, prompt): arguments that name existing files or folders are inputs, at most one other
    argument is the prompt (or --prompt). A missing path with an image extension is a missing file."""
    inputs, words = [], []
    for arg in args:
        path = Path(arg).expanduser()
        if path.exists():
            inputs.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise ConfigError(f"{arg}: no such file")
        else:
            words.append(arg)
    if prompt is not None:
        words.insert(0, prompt)
    if len(words) > 1:
        raise ConfigError(
            f"more than one prompt: {', '.join(repr(w) for w in words[:3])}; quote the prompt as one "
            "argument (the others are not existing files)"
        )
    if not inputs:
        raise ConfigError("no input image: give an image file or a folder of images")
    return inputs, words[0] if words else None


def edit_arguments(args: list[str], from_record: bool = False) -> tuple[Path | None, str | None]:
    """(picture, instruction) of `clear-gen edit IMAGE INSTRUCTION`: the argument naming an existing file is
    the picture, the other one the instruction. With --from (`from_record`) either may be left out: the
    record's then."""
    picture, words = None, []
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            raise ConfigError(f"{arg} is a folder: edit takes one picture")
        if path.is_file():
            if picture is not None:
                raise ConfigError(f"edit takes one picture; got {picture} and {arg}")
            picture = path
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise ConfigError(f"{arg}: no such file")
        else:
            words.append(arg)
    if len(words) > 1:
        raise ConfigError(
            f"more than one instruction: {', '.join(repr(w) for w in words[:3])}; quote the instruction as "
            "one argument (the others are not existing files)"
        )
    if picture is None and not from_record:
        raise ConfigError('no picture to edit: clear-gen edit IMAGE "what to change"')
    return picture, words[0] if words else None


def image_files(inputs: list[Path]) -> tuple[list[tuple[Path, bool]], list[str]]:
    """(file, found in a folder) for every input, folders expanded to their images (sorted); notes for
    folder entries that cannot be read (a batch skips them and goes on)."""
    files, notes = [], []
    for path in inputs:
        if not path.is_dir():
            files.append((path, False))
            continue
        try:
            entries = sorted(path.iterdir())
        except OSError as e:
            notes.append(f"skipped {path}: {e.strerror}")
            continue
        for entry in entries:
            if entry.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if entry.is_file() and os.access(entry, os.R_OK):
                files.append((entry, True))
            else:
                notes.append(f"skipped {entry}: not a readable file")
    return files, notes


# ---------------------------------------------------------------- reading


ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and/or rotated


def load_source(path: Path) -> Source:
    """The picture in RGB (EXIF orientation applied, alpha flattened onto white, 16-bit and palette
    images converted), its sha256 and the prompt its metadata holds; ConfigError when unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(path) as opened:
            info = dict(opened.info)
            orientation = opened.getexif().get(ORIENTATION, 1)
            image = ImageOps.exif_transpose(opened)
            image.load()  # a truncated file fails here, not later in the pipeline
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give image files, or the folder alone") from None
    except UnidentifiedImageError:
        raise ConfigError(f"{path} is not an image clear-gen can read (PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    image, notes = _to_rgb(image)
    if orientation != 1:
        notes.insert(0, f"EXIF orientation {orientation} applied ({image.size[0]}x{image.size[1]} upright)")
    prompt, where = prompt_from_metadata(info)
    return Source(path, image, hashlib.sha256(data).hexdigest(), prompt, where, notes)


def _to_rgb(image) -> tuple[object, list[str]]:
    """RGB, saying what was converted."""
    from PIL import Image

    notes = []
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grey: scale to 8 bits
        scale = 1 / 256 if image.mode.startswith("I;16") or image.mode == "I" else 255
        image = image.point(lambda v: v * scale).convert("L")
        notes.append("16-bit converted to 8-bit")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        notes.append("palette converted to RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("alpha flattened onto white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB"), notes


def prompt_from_metadata(info: dict) -> tuple[str | None, str | None]:
    """(prompt, where it was found) from a picture's text metadata, or (None, None)."""
    from .record import PARAMS_KEY

    if isinstance(info.get(PARAMS_KEY), str):
        try:
            prompt = json.loads(info[PARAMS_KEY]).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            prompt = None
        if isinstance(prompt, str) and prompt.strip():
            return prompt, "clear-gen"
    if isinstance(info.get("prompt"), str):
        prompt = _comfyui_prompt(info["prompt"])
        if prompt:
            return prompt, "ComfyUI"
    if isinstance(info.get("parameters"), str):
        prompt = _a1111_prompt(info["parameters"])
        if prompt:
            return prompt, "parameters (A1111/Forge)"
    return None, None


def _a1111_prompt(text: str) -> str | None:
    """The prompt of an A1111/Forge `parameters` text: the lines before `Negative prompt:` or `Steps:`."""
    lines = []
    for line in text.splitlines():
        if line.startswith(("Negative prompt:", "Steps:")):
            break
        lines.append(line)
    return "\n".join(lines).strip() or None


TEXT_INPUTS = ("text", "t5xxl", "clip_l", "text_g", "text_l")  # CLIPTextEncode(Flux/SDXL) prompt inputs


def _comfyui_prompt(text: str) -> str | None:
    """The positive prompt of a ComfyUI API graph: follow a sampler's (or guider's) `positive` input back
    through conditioning nodes to a text encoder, and take its text."""
    try:
        graph = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(graph, dict):
        return None
    for node in graph.values():
        if isinstance(node, dict) and "positive" in node.get("inputs", {}):
            found = _text_of(graph, node["inputs"]["positive"], depth=0)
            if found:
                return found
    return None


def _text_of(graph: dict, link, depth: int) -> str | None:
    """The text behind a [node_id, output] link, through up to 8 conditioning nodes."""
    if depth > 8 or not (isinstance(link, list) and link and str(link[0]) in graph):
        return None
    inputs = graph[str(link[0])].get("inputs", {})
    for name in TEXT_INPUTS:
        if isinstance(inputs.get(name), str) and inputs[name].strip():
            return inputs[name].strip()
    for value in inputs.values():  # FluxGuidance, ConditioningCombine, ...: follow their conditioning
        found = _text_of(graph, value, depth + 1) if isinstance(value, list) else None
        if found:
            return found
    return None


# ---------------------------------------------------------------- the size to reach


@dataclass(frozen=True)
class UpscaleTarget:
    """How big to make each picture: one of a long side, a factor, or explicit sides (default: x2)."""

    res: int | None = None  # long side in px, aspect ratio kept
    scale: float | None = None  # factor, aspect ratio kept
    width: int | None = None  # explicit sides (one alone keeps the aspect ratio)
    height: int | None = None

    def size(self, source: tuple[int, int], multiple: int) -> tuple[int, int, str | None]:
        return target_size(source, multiple, self.res, self.scale, self.width, self.height)


def target_size(
    source: tuple[int, int],
    multiple: int,
    res: int | None = None,
    scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
) -> tuple[int, int, str | None]:
    """(width, height, note): --res (long side) or --scale keep the source's aspect ratio, rounded to
    `multiple` px (the note says so); --width/--height are taken as given (checked by the plan)."""
    given = [name for name, v in (("--res", res), ("--scale", scale), ("--width/--height", width or height))
             if v is not None]  # fmt: skip
    if len(given) > 1:
        raise ConfigError(f"give one of --res, --scale and --width/--height, not {' and '.join(given)}")
    sw, sh = source
    if width is not None or height is not None:
        w, h = width or round(height * sw / sh), height or round(width * sh / sw)
        check_size(w, h, multiple)
        return w, h, None
    if res is not None and not MIN_SIDE <= res <= MAX_SIDE:
        raise ConfigError(f"--res {res} is out of range: {MIN_SIDE}-{MAX_SIDE} px")
    if scale is not None and not scale > 0:
        raise ConfigError(f"--scale must be positive, got {scale:g}")
    factor = res / max(sw, sh) if res is not None else (scale if scale is not None else 2.0)
    exact = (sw * factor, sh * factor)
    w, h = round_size(*exact, multiple)
    if max(w, h) > MAX_SIDE:
        raise ConfigError(f"{sw}x{sh} x {factor:g} = {w}x{h} is beyond {MAX_SIDE} px; use a smaller --res")
    note = None
    if (w, h) != tuple(round(s) for s in exact) or any(s != int(s) for s in exact):
        note = f"target {w}x{h} (multiples of {multiple} px; {exact[0]:g}x{exact[1]:g} exactly)"
    return w, h, note


def check_larger(source: tuple[int, int], target: tuple[int, int], path: Path) -> None:
    """Upscale makes pictures larger: a source larger than the target is a user error."""
    if source[0] > target[0] or source[1] > target[1]:
        raise ConfigError(
            f"{path} is {source[0]}x{source[1]}, larger than the target {target[0]}x{target[1]}: upscale "
            f"makes images larger; ask for more with --res (e.g. --res {2 * max(source)}) or --scale"
        )
