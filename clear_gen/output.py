"""Output PNGs: file names that never overwrite, atomic saves, and the generation record stored in them.

Every PNG carries one text chunk per `ImageRecord` field (`clear-gen:prompt`, `clear-gen:seed`, ...),
one `clear-gen:params` chunk holding the whole record as JSON (the one read back), and a human-readable
`parameters` chunk in the "prompt\\nSteps: 20, Seed: 1, Size: WxH, ..." style other tools show.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import secrets
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import OutputError
from .version import __version__

PREFIX = "clear-gen:"
PARAMS_KEY = PREFIX + "params"
# zlib level for PNG writes. Measured on a 4096^2 photographic-like (gradient + noise) RGB image, 2 shared
# CPU cores: level 1: 1.65 s, level 3: 1.71 s, level 6 (Pillow's default): 2.25 s; save_png at 8192^2 with
# level 3: ~9 s for 115 MiB. Level 3 costs next to nothing over 1 and compresses smooth regions (skies,
# bokeh) better; above it time grows faster than the file shrinks.
COMPRESS_LEVEL = 3


def slugify(prompt: str, max_len: int = 48) -> str:
    """Lowercase ascii words joined by '-', at most `max_len` characters, cut at a word; "" -> "image"."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = ""
    for word in re.findall(r"[a-z0-9]+", ascii_text.lower()):
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_len:
            slug = slug or word[:max_len]  # a single over-long first word is cut, not dropped
            break
        slug = candidate
    return slug or "image"


@dataclass(kw_only=True)
class ImageRecord:
    """Everything needed to reproduce (or describe) one generated image; stored in its PNG."""

    prompt: str
    seed: int
    model: str  # --model: a registry base name ("dev"), a Hub repo id or a local folder
    variant: str | None = None  # CLEAR checkpoint variant; None = no CLEAR
    window: int | None = None  # CLEAR radius r, in latent tokens
    down_factor: int | None = None  # CLEAR pooled-key factor f
    steps: int
    guidance: float
    width: int
    height: int
    stages: list[int] = field(default_factory=list)  # resolution of each stage, e.g. [1024, 4096]
    strength: float | None = None  # img2img strength of the later stages
    timings: dict[str, Any] = field(default_factory=dict)  # JSON-able; clear-gen writes a RunTiming
    version: str = __version__  # clear-gen version that made the image
    extra: dict[str, Any] = field(default_factory=dict)  # ntk_factor, max_sequence_length, negative, ...

    def __post_init__(self) -> None:
        self.stages = list(self.stages)  # a tuple would come back from JSON as a list and compare unequal

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRecord:
        """Unknown keys (from a newer clear-gen) go to `extra`; a missing required key is an OutputError."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        extra = known.get("extra") or {}
        if not isinstance(extra, dict):
            raise OutputError(f"corrupt clear-gen metadata: extra is {type(extra).__name__}, not an object")
        known["extra"] = {**unknown, **extra}
        try:
            return cls(**known)
        except TypeError as e:
            raise OutputError(f"clear-gen metadata is incomplete ({e})") from None

    def to_text_chunks(self) -> dict[str, str]:
        """PNG text chunks: one per field (JSON unless str), `clear-gen:params`, and `parameters`."""
        data = self.to_dict()
        chunks = {PREFIX + k: v if isinstance(v, str) else _json(v) for k, v in data.items()}
        chunks[PARAMS_KEY] = _json(data)
        chunks["parameters"] = self.parameters_text()
        return chunks

    def parameters_text(self) -> str:
        """The "prompt\\nNegative prompt: ...\\nSteps: 20, Seed: 1, Size: WxH, ..." line other tools show."""
        items = {"Steps": self.steps, "Seed": self.seed, "Size": f"{self.width}x{self.height}"}
        items |= {"Model": self.model, "Guidance": self.guidance, "Stages": "+".join(map(str, self.stages))}
        items |= {"Strength": self.strength, "CLEAR variant": self.variant, "CLEAR window": self.window}
        items |= {"CLEAR down factor": self.down_factor}
        items["Version"] = f"clear-gen {self.version}"
        text = self.prompt
        if self.extra.get("negative"):
            text += f"\nNegative prompt: {self.extra['negative']}"
        return text + "\n" + ", ".join(f"{k}: {v}" for k, v in items.items() if v not in (None, ""))

    @classmethod
    def from_png(cls, path: str | Path) -> ImageRecord:
        """The record stored in a clear-gen PNG; OutputError if unreadable, not a PNG, or not ours."""
        text = _png_text(Path(path))
        if PARAMS_KEY in text:
            try:
                data = json.loads(text[PARAMS_KEY])
            except json.JSONDecodeError as e:
                raise OutputError(f"{path}: corrupt clear-gen metadata ({e})") from None
        else:  # per-field chunks only (e.g. an editor dropped one chunk): rebuild from them
            fields = {k.removeprefix(PREFIX): v for k, v in text.items() if k.startswith(PREFIX)}
            if not fields:
                raise OutputError(f"{path} was not made by clear-gen (no clear-gen metadata)")
            data = {k: _unjson(k, v) for k, v in fields.items()}
        if not isinstance(data, dict):
            raise OutputError(f"{path}: corrupt clear-gen metadata (not a JSON object)")
        try:
            return cls.from_dict(data)
        except OutputError as e:
            raise OutputError(f"{path}: {e}") from None


def _json(value: Any) -> str:
    # default=str: a stray non-JSON value in `extra` must not lose a finished 8K image; it is kept as text
    return json.dumps(value, ensure_ascii=False, default=str)


def _unjson(name: str, value: str) -> Any:
    """Inverse of to_text_chunks' per-field encoding: str fields are stored raw, the rest as JSON."""
    if name in ("prompt", "model", "version") or (name == "variant" and value != "null"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _png_text(path: Path) -> dict[str, str]:
    """All tEXt/iTXt/zTXt chunks of a PNG, as OutputError on anything unreadable."""
    try:
        with warnings.catch_warnings():  # only the header and text chunks are read: no bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format != "PNG":
                    raise OutputError(
                        f"{path} is a {im.format} image, not a PNG; clear-gen metadata is in its PNGs"
                    )
                # info has the text chunks before IDAT (where save_png puts them) without decoding pixels;
                # `im.text` also finds those after IDAT but decodes the whole image (1 s at 8192^2)
                text = {k: str(v) for k, v in im.info.items() if isinstance(v, str)}
                if not any(k.startswith(PREFIX) for k in text):
                    text = {k: str(v) for k, v in im.text.items()}  # type: ignore[attr-defined]
                return text
    except FileNotFoundError:
        raise OutputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OutputError(f"{path} is a directory; give a PNG file") from None
    except UnidentifiedImageError:
        raise OutputError(f"{path} is not an image (not a PNG)") from None
    except Image.DecompressionBombError:
        raise OutputError(f"{path} is larger than any image clear-gen makes; not a clear-gen PNG") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated/corrupt chunks, permission denied
        raise OutputError(f"cannot read {path}: {e}") from None


def record_from_image(path: str | Path) -> ImageRecord:
    """The record of a clear-gen PNG, for `generate --from IMAGE` and `info IMAGE`."""
    return ImageRecord.from_png(path)


def describe(record: ImageRecord) -> list[tuple[str, str]]:
    """(name, value) rows for a table, extras one row each; unset fields and the timings left out."""
    rows = [("prompt", record.prompt), ("seed", str(record.seed)), ("model", record.model)]
    rows += [("size", f"{record.width}x{record.height}")]
    rows += [("stages", " -> ".join(map(str, record.stages)))] if record.stages else []
    rows += [("steps", str(record.steps)), ("guidance", f"{record.guidance:g}")]
    optional = {
        "strength": record.strength,
        "variant": record.variant,
        "window": record.window,
        "down factor": record.down_factor,
    }
    rows += [(k, f"{v:g}" if isinstance(v, float) else str(v)) for k, v in optional.items() if v is not None]
    rows += [(k, v if isinstance(v, str) else _json(v)) for k, v in record.extra.items() if v is not None]
    rows.append(("clear-gen version", record.version))
    return rows


# ---- file names ---------------------------------------------------------------------------------------


class Names:
    """Output names handed out (`output_path`) and not yet saved or released: a run owns one, so that its
    images never get the same name even when one is named before another is saved (save_png then
    releases it). Thread-safe."""

    def __init__(self) -> None:
        self._reserved: set[str] = set()  # absolute paths
        self._lock = threading.Lock()

    def claim(self, path: Path) -> Path:
        """The first candidate name that neither exists nor is reserved here, now reserved."""
        with self._lock:
            for candidate in _candidates(path):
                key = os.path.abspath(candidate)
                if key not in self._reserved and not os.path.lexists(candidate):
                    self._reserved.add(key)
                    return candidate
        raise AssertionError("unreachable")

    def release(self, path: str | Path) -> None:
        """Give back a name that will not be saved (save_png does this itself)."""
        with self._lock:
            self._reserved.discard(os.path.abspath(path))


def _candidates(path: Path) -> Iterator[Path]:
    """path, then `stem-1.png`, `stem-2.png`, ..."""
    yield path
    n = 1
    while True:
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1


def _ensure_dir(directory: Path) -> None:
    """Create `directory` if needed; OutputError with the fix if it cannot be, or cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(
            f"cannot create directory {directory}: a file is in the way; choose another --out"
        ) from None
    except NotADirectoryError:
        raise OutputError(
            f"cannot create directory {directory}: part of its path is a file; choose another --out"
        ) from None
    except OSError as e:
        raise OutputError(
            f"cannot create directory {directory} ({e.strerror}); choose another --out"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(
            f"directory {directory} is not writable; fix its permissions or choose another --out"
        )


def output_path(
    out: str | Path | None, record: ImageRecord, index: int | None = None, names: Names | None = None
) -> Path:
    """Where to save `record`'s image, reserved in `names` if given; never the name of an existing file.

    `out`: None -> the current directory; an existing directory, or a path ending in '/' -> that directory
    (created if needed), named `{slug}-{seed}-{W}x{H}.png`; anything else -> that file, which must end
    in .png. `index` (e.g. the image's place in a batch) is appended as `-{index}` to either name.
    A taken name gets `-1`, `-2`, ... before `.png`.
    """
    text = "." if out is None else str(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        directory = Path(text)
        name = f"{slugify(record.prompt)}-{record.seed}-{record.width}x{record.height}.png"
    else:
        path = Path(text)
        if path.suffix.lower() != ".png":
            raise OutputError(
                f"--out {out}: clear-gen writes PNG files; give a name ending in .png or a directory"
            )
        directory, name = path.parent, path.name
    if index is not None:
        name = f"{Path(name).stem}-{index}{Path(name).suffix}"
    _ensure_dir(directory)
    return (names or Names()).claim(directory / name)


# ---- saving -------------------------------------------------------------------------------------------

_LINK_UNSUPPORTED = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _open_temp(final: Path) -> tuple[int, Path]:
    """A new `.{name}.{random}.part` file beside `final` (mode 0o666 minus umask, like any new file)."""
    while True:
        tmp = final.with_name(f".{final.stem}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(
                f"cannot write in {final.parent} ({e.strerror}); choose another --out"
            ) from None


def _publish(tmp: Path, final: Path, names: Names) -> Path:
    """Give the finished temp file its final name, or the next free one; never replaces an existing file."""
    while True:
        try:
            os.link(tmp, final)  # fails if `final` exists: no window in which another file is overwritten
            return final
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in _LINK_UNSUPPORTED:
                raise
            if not os.path.lexists(final):  # filesystem without hard links (FAT, some FUSE): rename
                os.rename(tmp, final)
                return final
        names.release(final)
        final = names.claim(final)


def save_png(image: Image.Image, path: str | Path, record: ImageRecord, names: Names | None = None) -> Path:
    """Write `image` with `record` to `path` (or `path-N.png` if taken meanwhile) atomically; return it.

    The PNG is written to a hidden `.part` file in the same directory, fsynced, then hard-linked to its
    final name, so an interrupted or failed save leaves neither a partial PNG nor the `.part` file. The
    name is released from `names` (output_path's) whether it was saved or not.
    """
    path, names = Path(path), names or Names()
    info = PngImagePlugin.PngInfo()
    for key, value in record.to_text_chunks().items():
        info.add_text(key, value)  # tEXt if latin-1, else iTXt (UTF-8)
    fd, tmp = _open_temp(path)
    final = path
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info, compress_level=COMPRESS_LEVEL)
            f.flush()
            os.fsync(f.fileno())
        final = _publish(tmp, path, names)
        _fsync_dir(path.parent)
        return final
    except OSError as e:
        hint = "; check free space and permissions" if e.errno else ""  # errno None: e.g. an unsavable mode
        raise OutputError(f"cannot save {path} ({e.strerror or e}){hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
        names.release(path)
        names.release(final)


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
