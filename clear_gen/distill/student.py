"""The student and its optimiser: the base loaded for training (no text encoders: the data holds the
embeddings), CLEAR applied with its own trainable projections (exactly the published key set), and a
maintained optimiser with the recipe's settings; which backend can train on this device."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
from typing import TYPE_CHECKING

import torch

from .. import models
from ..attention import apply_clear, expected_checkpoint
from ..errors import ConfigError

if TYPE_CHECKING:
    from .train import TrainOptions


OPTIMIZERS = {  # name: (package to import, pip name, default learning rate)
    "prodigy": ("prodigyopt", "prodigyopt", 1.0),  # the recipe's; lr 1.0 = Prodigy's own estimate
    "adamw": ("torch", "torch", 1e-5),
    "adamw8bit": ("bitsandbytes", "bitsandbytes", 1e-5),
}


WEIGHT_DECAY = 1e-4


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    module, pip, _ = OPTIMIZERS[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--optimizer {name} needs the {pip} package: pip install {pip}")


def resolve_train_backend(backend: str, device: torch.device) -> str:
    """The backend that can train on this device (backends.choose: flex on CUDA, gather on CPU and MPS)."""
    from ..attention.backends import choose

    return choose(backend, device, training=True).name


def load_base(model: str, token: str | None, device: torch.device, dtype: torch.dtype):
    """The base's transformer, VAE and scheduler (no text encoders: the data holds the embeddings), as the
    family's pipeline that validation renders with."""
    from ..plan.parse import model_family
    from ..weights.download import check_run_weights
    from ..weights.hub import resolve_base
    from ..weights.loading import _quiet_loading

    check_run_weights(model, None)
    path = resolve_base(model, token)
    family = models.family(model_family(model))
    kind = family.pipeline_class()
    none = {
        k: None for k in inspect.signature(kind.__init__).parameters if k.startswith(("text_", "tokenizer"))
    }
    with _quiet_loading():
        try:
            pipe = kind.from_pretrained(path, torch_dtype=dtype, **none)
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0][:160]
            raise ConfigError(f"{path} is not a complete {family.LABEL} diffusers folder ({first})") from e
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    family.use_exact_positions(pipe.transformer)
    return pipe


def trainable_keys(transformer, down_factor: int) -> list[str]:
    """The published key set, in a fixed order (the optimiser's parameter order)."""
    return sorted(expected_checkpoint(transformer, down_factor))


def make_student(
    transformer, opts: TrainOptions, backend: str, weights: dict | None
) -> list[torch.nn.Parameter]:
    """CLEAR on the transformer with its own trainable projections (the base's kept for the teacher); its
    trainable parameters in trainable_keys order. weights: a resumed student's, else the base's."""
    f, keys = opts.down_factor, trainable_keys(transformer, opts.down_factor)
    like = torch.empty(0, dtype=transformer.dtype, device=models.of(transformer).compute_device(transformer))
    if weights is None:
        init = torch.full((1, 1, 1, f, 1, f, 1), 1.0 / f**2)  # the recipe's initial pooling: a plain mean
        weights = {k: init if k.endswith("spatial_weight") else transformer.get_parameter(k) for k in keys}
    state = {k: v.detach().to(like.device, like.dtype).clone() for k, v in weights.items()}  # own storage
    apply_clear(transformer, window=opts.window, down_factor=f, state_dict=state, backend=backend)
    transformer.requires_grad_(False)
    params = [transformer.get_parameter(k) for k in keys]
    for p in params:
        p.requires_grad_(True)
    if opts.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return params


def make_optimizer(name: str, params: list[torch.Tensor], lr: float | None):
    """A maintained optimiser from its package, with the recipe's betas and decoupled weight decay."""
    lr = OPTIMIZERS[name][2] if lr is None else lr
    betas = (0.9, 0.999)
    if name == "prodigy":
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(
                params, lr=lr, betas=betas, weight_decay=WEIGHT_DECAY, decouple=True,
                use_bias_correction=True, safeguard_warmup=True,
            )  # fmt: skip
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=WEIGHT_DECAY)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=WEIGHT_DECAY)
