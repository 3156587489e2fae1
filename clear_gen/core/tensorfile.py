"""A .safetensors file's tensor names and shapes, from its header alone (no weights read)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def file_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: tensor name -> dtype, shape, offsets; and __metadata__.
    ValueError when the file is not a readable safetensors file."""
    with Path(path).open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError(f"a header of {size} bytes: not a safetensors file")
        try:
            return json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"its header is not JSON ({e})") from None


def file_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of one .safetensors file, from its header (no weights read)."""
    return {k: v["shape"] for k, v in file_header(path).items() if k != "__metadata__"}


def file_metadata(path: Path) -> dict[str, str]:
    """The string metadata a .safetensors file carries (what made it), {} without."""
    return file_header(path).get("__metadata__") or {}
