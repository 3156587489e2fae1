"""Output PNGs: file names that never overwrite and atomic saves, each PNG with its record
(record.ImageRecord) in its text chunks."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..errors import OutputError
from .record import ImageRecord

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


_created: list[Path] = []  # folders _ensure_dir made in this process, parents first


def remove_empty_created() -> None:
    """The folders this process created for its output that are still empty, removed (a run that failed or
    was interrupted before its first image leaves no empty --out folder behind)."""
    for folder in reversed(_created):
        with contextlib.suppress(OSError):  # not empty, or already gone: kept as it is
            folder.rmdir()
    _created.clear()


def _ensure_dir(directory: Path) -> None:
    """Create `directory` if needed; OutputError with the fix if it cannot be, or cannot be written."""
    new = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _created.extend(reversed(new))
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
    out: str | Path | None,
    record: ImageRecord,
    index: int | None = None,
    names: Names | None = None,
    stage: int | None = None,
) -> Path:
    """Where to save `record`'s image, reserved in `names` if given; never the name of an existing file.

    `out`: None -> the current directory; an existing directory, or a path ending in '/' -> that directory
    (created if needed), named `{slug}-{seed}-{W}x{H}.png` (an upscale: the slug of its picture's file
    name, not of the prompt); anything else -> that file, which must end
    in .png. `index` (e.g. the image's place in a batch) is appended as `-{index}` to either name.
    `stage` (a kept earlier stage, --keep-stages): a file name gets `-stage{stage}`, so that the name the
    user gave holds the finished image (a folder's names differ by size already).
    A taken name gets `-1`, `-2`, ... before `.png`.
    """
    text = "." if out is None else str(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        directory = Path(text)
        source = (record.extra.get("source") or {}).get("file")
        slug = slugify(Path(source).stem) if source else slugify(record.prompt)
        name = f"{slug}-{record.seed}-{record.width}x{record.height}.png"
    else:
        path = Path(text)
        if path.suffix.lower() != ".png":
            raise OutputError(
                f"--out {out}: clear-gen writes PNG files; give a name ending in .png or a directory"
            )
        directory, name = path.parent, path.name
        if stage is not None:
            name = f"{path.stem}-stage{stage}{path.suffix}"
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
