"""A local CLEAR checkpoint (`--clear-weights FILE`, `--variant FILE`), checked from its header before
anything loads: the published key format of the model's family (a LoRA or another model's file is refused
now, not after minutes of loading), its down factor (from the spatial weights' shape), the window its
metadata records (clear-gen distill writes it), and its sha256 (what a PNG records)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..core.tensorfile import file_header
from ..errors import ConfigError
from .hub import sha256_of


@dataclass(frozen=True)
class CheckpointFile:
    path: Path  # absolute
    down_factor: int  # from its spatial weights (1: none)
    window: int | None  # from its metadata, when it records one
    sha256: str


def check_checkpoint_file(path: Path, what: str, family: str = models.DEFAULT) -> CheckpointFile:
    """The file, checked from its header; one ConfigError naming `what` (the flag and file) otherwise."""
    try:
        header = file_header(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} is not a readable .safetensors file ({e})") from None
    keys = [k for k in header if k != "__metadata__"]
    strange = next((k for k in sorted(keys) if not models.family(family).is_clear_key(k)), None)
    other = models.checkpoint_family(keys) if strange is not None else None
    if other is not None:  # CLEAR weights of another family's model
        theirs, ours = models.family(other).LABEL, models.family(family).LABEL
        raise ConfigError(
            f"{what} holds CLEAR weights for {theirs} ({other}: its key {strange}), and the model is "
            f"{ours} ({family}): give weights made for it (clear-gen distill), or --window R alone"
        )
    if strange is not None or not keys:
        lora = strange is not None and ("lora_A" in strange or "lora_down" in strange)
        hint = "a LoRA: give it with --lora" if lora else "not CLEAR weights in the published format"
        raise ConfigError(f"{what} is {hint} (its key {strange or 'list is empty'})")
    spatial = [header[k]["shape"] for k in keys if k.endswith("spatial_weight")]
    meta = header.get("__metadata__") or {}
    window = int(meta["window"]) if str(meta.get("window", "")).isdigit() else None
    return CheckpointFile(path.resolve(), spatial[0][3] if spatial else 1, window, sha256_of(path))
