"""Distillation: CLEAR weights for any FLUX-family base, window and down factor (`clear-gen distill`).

`make_data(DataOptions(...))` caches what the teacher makes (data.py); `train(TrainOptions(...))` distils
the student (train.py) with the recipe's loss (losses.py), saving weights in the published format and
resume files (checkpoint.py), and validating against the teacher (validate.py). May import everything
but `bench` and `cli` (whose `distill` commands call it).
"""

from .data import DataOptions, make_data
from .train import TrainOptions, train

__all__ = ["DataOptions", "TrainOptions", "make_data", "train"]
