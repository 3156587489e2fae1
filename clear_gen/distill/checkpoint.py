"""What a distillation writes: the CLEAR weights in the published format, and the file it resumes from.

The weights (`--out FILE.safetensors`) hold exactly the published key set of the base (attention's
`expected_checkpoint`) in bf16, so `apply_clear(state_dict=...)` and `clear-gen --window R
--down-factor F --clear-weights FILE` take them as they take the published ones. The resume file
(`FILE.resume.pt` beside it) holds the student's trainable weights at full precision, the optimiser's
state, the step and the random state, and says which base, resolution and (r, f) it belongs to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

RESUME_FORMAT = 1


@dataclass(frozen=True)
class RunIdentity:
    """What a resume file must match: a student of another base, size or (r, f) cannot continue."""

    base: str
    res: int
    window: int
    down_factor: int
    optimizer: str

    def describe(self) -> str:
        return f"{self.base} at {self.res} px, r={self.window}, f={self.down_factor}, {self.optimizer}"


def resume_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".resume.pt")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from e


def save_weights(path: Path, weights: dict[str, Tensor], identity: RunIdentity, step: int) -> None:
    """The published format: these keys, bf16, one .safetensors (metadata says what made it)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in weights.items()}
    meta = {"base": identity.base, "res": str(identity.res), "window": str(identity.window)}
    meta |= {"down_factor": str(identity.down_factor), "steps": str(step), "format": "clear-gen distill"}
    _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def save_resume(
    path: Path, identity: RunIdentity, step: int, weights: dict[str, Tensor], optimizer, extra
) -> None:
    state = {
        "format": RESUME_FORMAT,
        "identity": identity.__dict__,
        "step": step,
        "weights": {k: v.detach().to("cpu").clone() for k, v in weights.items()},
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": _cuda_rng()},
        "extra": extra,  # seed, batch, accumulate, world size: a resume with others is not the same run
    }
    _atomic(path, lambda tmp: torch.save(state, tmp))


def _cuda_rng() -> list[Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def load_resume(path: Path, identity: RunIdentity) -> dict[str, Any]:
    """The resume file, refused with one line when it belongs to another run."""
    if not path.is_file():
        raise ConfigError(f"--resume {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        raise ConfigError(f"--resume {path} is not a clear-gen distill resume file ({e})") from e
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ConfigError(f"--resume {path} is not a clear-gen distill resume file")
    found = RunIdentity(**state["identity"])
    if found != identity:
        raise ConfigError(
            f"--resume {path} is a student of {found.describe()}; this run is {identity.describe()}: "
            "give the same --model, --res, --window, --down-factor and --optimizer, or start afresh"
        )
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
