"""torchrun's environment, read without importing torch (the command line asks it before anything heavy):
whether this process was launched by torchrun (or any env:// launcher), and its rank. parallel.py joins
the launch; everything else asks here."""

from __future__ import annotations

import os

from ..errors import ConfigError


def launched() -> bool:
    """True in a process that torchrun (or any env:// launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int | None:
    """This process's rank when torchrun started it, else None."""
    return int(os.environ["RANK"]) if launched() else None


MODES = ("auto", "sequence", "data")


def check_mode(requested: str) -> None:
    if requested not in MODES:
        raise ConfigError(f"unknown --parallel {requested!r}; choose one of {', '.join(MODES)}")
