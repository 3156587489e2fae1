"""A .safetensors file's tensor names and shapes, from its header alone (no weights read)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def file_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of one .safetensors file, from its header (no weights read)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
