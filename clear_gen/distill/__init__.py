"""Distillation: CLEAR weights for any FLUX-family base, window and down factor (`clear-gen distill`).

`make_data(DataOptions(...))` caches what the teacher makes (data.py); `train(TrainOptions(...))` distils
the student (train.py) with the recipe's loss (losses.py), saving weights in the published format and
resume files (checkpoint.py), and validating against the teacher (validate.py). Imported on first use:
the command line's help loads no torch.
"""

from __future__ import annotations

import importlib

_PUBLIC = {"DataOptions": ".data", "make_data": ".data", "TrainOptions": ".train", "train": ".train"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'clear_gen.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
