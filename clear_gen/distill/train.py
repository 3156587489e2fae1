"""`clear-gen distill train`: CLEAR weights for any FLUX-family base, window and down factor.

One transformer in memory. The student is the base with CLEAR attention (`apply_clear`) and its own
copy of the projections CLEAR's checkpoints replace, the only trainable parameters (exactly the
published key set). The teacher is the same module inside `attention.original_attention`, which swaps
the base's projections, the stock processors and row-major tokens back in for its forward: pointer
swaps, no copies, so the frozen 10B parameters exist once and the base's projections twice (why not a
teacher processor reading saved weights: the stock processors then compute the teacher, exactly
the model `clear-gen generate --variant none` runs, with no second attention implementation to keep in
step with diffusers).

Per step: for each of `accumulate` micro-batches, x0 from the cached posterior, sigma as the recipe
draws it, the teacher's velocity and attention outputs (no grad), then the student's, the loss
(losses.py) and its backward; then gradient clipping at 1.0 and one optimiser step. With bf16 weights
the optimiser updates float32 master copies of the trainable parameters (DeepSpeed's bf16 mode does
the same), which are cast into the model after each step: bf16 alone rounds most small updates away.

Multi-GPU: `torchrun --nproc-per-node N -m clear_gen distill train ...` runs torch DDP (NCCL on CUDA,
gloo on the CPU); each rank draws its own micro-batches, rank 0 logs, saves and validates.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import models
from ..attention import original_attention
from ..errors import ConfigError, DeviceError
from ..run.world import World, start
from . import checkpoint as C
from .data import Samples, base_id
from .losses import DEFAULT_WEIGHTS, attention_layers, captured_attention, distill_loss, noised
from .student import (
    check_optimizer,
    load_base,
    make_optimizer,
    make_student,
    resolve_train_backend,
    trainable_keys,
)

RECIPE_BATCH = 32  # the recipe's effective batch: 2 per GPU x 4 GPUs x 4 accumulation
GRAD_CLIP = 1.0
LOSSES = ("loss", "loss_fm", "loss_pred", "loss_attn")


@dataclass
class TrainOptions:
    """What `clear-gen distill train` runs. None: the recipe's default."""

    data: Path  # a make-data folder
    out: Path  # the CLEAR weights, .safetensors
    window: int  # r
    down_factor: int = 1  # f
    model: str = "dev"  # the base the data was made from
    res: int = 1024
    steps: int = 10_000  # optimiser steps (the paper's 10K iterations)
    batch: int = 1  # per GPU and micro-batch
    accumulate: int | None = None  # None: an effective batch of 32, as the recipe
    lr: float | None = None  # None: 1.0 for Prodigy, 1e-5 for AdamW
    optimizer: str = "prodigy"  # prodigy | adamw | adamw8bit
    loss_weights: tuple[float, float, float] = DEFAULT_WEIGHTS  # fm, pred, attn
    guidance: float = 3.5  # fed to guidance-distilled bases (dev); ignored by others
    seed: int = 0
    save_every: int = 500
    validate_every: int = 0  # 0: at the end only
    validate_steps: int = 20  # denoising steps of each validation image; 0: no validation
    resume: Path | None = None
    log: Path | None = None  # None: FILE.log.jsonl beside out
    gradient_checkpointing: bool = True
    fp32_master: bool = True  # float32 master weights when the model is bf16 or fp16
    save: bool = True  # False: write no weights or resume file (benchmarks)
    device: str = "auto"
    dtype: str | None = None  # bf16 on CUDA and MPS, fp32 elsewhere
    backend: str = "auto"  # flex on CUDA, gather elsewhere (FlexAttention's backward is CUDA's only)
    token: str | None = None


@dataclass
class TrainHooks:
    """What a caller sees; clear_gen prints nothing itself."""

    note: Callable[[str], None] = lambda text: None
    phase: Callable[[str], None] = lambda name: None  # "load", "validate"
    start: Callable[[int, int], None] = lambda first, total: None  # steps done already, total steps
    step: Callable[[dict], None] = lambda record: None  # a step's log line
    validated: Callable[[dict], None] = lambda result: None
    saved: Callable[[Path], None] = lambda path: None


@dataclass
class TrainResult:
    out: Path
    resume: Path
    log: Path
    step: int
    interrupted: bool = False
    validation: dict | None = None


# ---------------------------------------------------------------- checking (nothing loaded)


def check_geometry(res: int, window: int, down_factor: int) -> None:
    """A window and down factor that CLEAR can train at res: a token grid divisible by f, r inside it."""
    from ..attention import check_window
    from ..core.sizes import check_size, size_multiple

    check_window(window, down_factor, flags=True)
    check_size(res, res, size_multiple(down_factor))
    side = res // 16
    if window >= side * math.sqrt(2):
        raise ConfigError(
            f"--window {window} covers the whole {side} x {side} token grid at {res} px: that is full "
            f"attention, nothing to distil; use a window below {math.ceil(side * math.sqrt(2))}"
        )


def check_options(opts: TrainOptions) -> None:
    check_geometry(opts.res, opts.window, opts.down_factor)
    check_optimizer(opts.optimizer)
    for name in ("steps", "batch", "save_every"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.accumulate is not None and opts.accumulate < 1:
        raise ConfigError(f"--accumulate must be at least 1, got {opts.accumulate}")
    if opts.validate_every < 0 or opts.validate_steps < 0:
        raise ConfigError("--validate-every and --validate-steps must be 0 or more")
    weights = opts.loss_weights
    if len(weights) != 3 or not all(w >= 0 for w in weights) or not any(weights):
        raise ConfigError(f"--loss-weights takes three weights >= 0, not all 0 (FM,PRED,ATTN); got {weights}")
    if opts.lr is not None and not opts.lr > 0:
        raise ConfigError(f"--lr must be positive, got {opts.lr}")
    for flag, path in (("--out", opts.out), ("--log", opts.log)):
        if path is not None and not Path(path).expanduser().parent.is_dir():
            raise ConfigError(f"{flag} {path}: the folder {Path(path).parent} does not exist")
    if opts.out.suffix != ".safetensors":
        raise ConfigError(
            f"--out {opts.out}: the weights are written as .safetensors; name it FILE.safetensors"
        )
    if opts.resume is None and C.resume_path(opts.out).exists():
        raise ConfigError(
            f"{C.resume_path(opts.out)} is an earlier run's: continue it with --resume "
            f"{C.resume_path(opts.out)}, or remove it (or choose another --out) to start afresh"
        )


# ---------------------------------------------------------------- devices and processes


# ---------------------------------------------------------------- the student


# ---------------------------------------------------------------- one run


@dataclass
class _Run:
    opts: TrainOptions
    world: World  # this process's place in a torchrun launch (parallel.py); World() alone
    device: torch.device
    pipe: Any  # the family's pipeline: transformer (CLEAR student), VAE, scheduler
    samples: Samples
    params: list[torch.nn.Parameter]  # the model's trainable parameters
    masters: list[torch.nn.Parameter] | None  # their float32 copies the optimiser updates, or None
    optimizer: Any
    ddp: Any  # DistributedDataParallel around the transformer, or None
    layers: list[int]  # single blocks of the attention loss
    accumulate: int
    identity: C.RunIdentity
    keys: list[str]
    paths: tuple[Path, Path, Path]  # out, resume, log
    stop: bool = False
    perms: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def transformer(self):
        return self.pipe.transformer

    def weights(self) -> dict[str, torch.Tensor]:
        """The student's trainable weights at full precision, by key."""
        return dict(zip(self.keys, self.masters or self.params, strict=True))


def train(opts: TrainOptions, hooks: TrainHooks | None = None, pipe: Any = None) -> TrainResult:
    """Distil CLEAR weights (module docstring); returns where they are and the last validation.

    pipe: the base already loaded (its transformer, and its VAE's config), instead of loading opts.model;
    for benchmarks on random weights (scripts/distill_bench.py)."""
    from ..core.device import resolve_dtype

    hooks = hooks or TrainHooks()
    # 1. Everything that needs no model: options, processes, data, the resume file.
    opts.out = Path(opts.out).expanduser()
    check_options(opts)
    world, device = start("auto", opts.device)  # torchrun: DDP over its ranks, NCCL on CUDA, gloo on CPUs
    dtype = resolve_dtype(opts.dtype, device)
    backend = resolve_train_backend(opts.backend, device)
    base = base_id(opts.model)
    samples = Samples(Path(opts.data), base, opts.res)
    identity = C.RunIdentity(base, opts.res, opts.window, opts.down_factor, opts.optimizer)
    resumed = C.load_resume(Path(opts.resume).expanduser(), identity) if opts.resume else None
    accumulate = opts.accumulate or max(1, RECIPE_BATCH // (opts.batch * world.size))
    if resumed and resumed["extra"] != _extra(opts, accumulate, world):
        hooks.note(
            f"resumed with other settings than {resumed['extra']}: training goes on, but not exactly as the "
            "first run would have"
        )
    if len(samples) < samples.manifest.count:
        hooks.note(f"{len(samples)} of the {samples.manifest.count} samples are made; training on those")
    # 2. The base, the student and its optimiser.
    hooks.phase("load")
    try:
        pipe = pipe or load_base(opts.model, opts.token, device, dtype)
        run = _prepare(opts, world, device, pipe, backend, samples, identity, resumed, accumulate)
        return _train(run, resumed["step"] if resumed else 0, hooks)
    except torch.cuda.OutOfMemoryError as e:
        raise DeviceError(
            f"out of GPU memory at --batch {opts.batch}: try --batch 1 (with --accumulate for the same "
            "effective batch), --optimizer adamw8bit, and keep gradient checkpointing on"
        ) from e


def _prepare(opts, world, device, pipe, backend, samples, identity, resumed, accumulate) -> _Run:
    transformer, dtype = pipe.transformer, pipe.transformer.dtype
    params = make_student(transformer, opts, backend, resumed["weights"] if resumed else None)
    keys = trainable_keys(transformer, opts.down_factor)
    masters = None
    if opts.fp32_master and dtype != torch.float32:
        source = resumed["weights"] if resumed else dict(zip(keys, params, strict=True))
        masters = [torch.nn.Parameter(source[k].detach().to(device, torch.float32).clone()) for k in keys]
    optimizer = make_optimizer(opts.optimizer, masters or params, opts.lr)
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        C.restore_rng(resumed)
    ddp = None
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(transformer, device_ids=ids)
    out = opts.out
    log = (
        Path(opts.log).expanduser()
        if opts.log
        else out.with_name(out.name.removesuffix(".safetensors") + ".log.jsonl")
    )
    layers = attention_layers(len(models.of(transformer).single_blocks(transformer)))
    return _Run(
        opts, world, device, pipe, samples, params, masters, optimizer, ddp, layers, accumulate, identity,
        keys, (out, C.resume_path(out), log),
    )  # fmt: skip


def _train(run: _Run, first: int, hooks: TrainHooks) -> TrainResult:
    opts, world = run.opts, run.world
    out, resume, log = run.paths
    if world.rank == 0:
        _trim_log(log, first)
    hooks.start(first, opts.steps)
    step, result = first, None
    with _stop_on_interrupt(run):
        for step in range(first + 1, opts.steps + 1):
            record = _step(run, step - 1)
            hooks.step(record)
            stop, last = world.any(run.stop, run.device), step == opts.steps
            if stop or last or step % opts.save_every == 0:
                _save(run, step, hooks)
            if not stop and (last or (opts.validate_every and step % opts.validate_every == 0)):
                result = _validate(run, step, hooks)
                record |= {"validation": result} if result else {}
            if world.rank == 0:
                _append(log, record)
            if stop:
                return TrainResult(out, resume, log, step, interrupted=True)
    if step == first:  # nothing left to train (a finished run resumed): the weights again, and validation
        _save(run, step, hooks)
        result = _validate(run, step, hooks)
    return TrainResult(out, resume, log, step, validation=result)


@contextmanager
def _stop_on_interrupt(run: _Run):
    """Ctrl-C ends the run after the current step, saved; a second Ctrl-C stops at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        run.stop = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- one step


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike hash() of a tuple with strings)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def _draws(run: _Run, step: int, micro: int) -> list[int]:
    """Global draw numbers of this rank's micro-batch: draw g is sample perm_epoch[g % n] with generator
    seed (seed, g), so one process with batch 2 and two with batch 1 train on the same draws."""
    b = run.opts.batch
    first = ((step * run.accumulate + micro) * run.world.size + run.world.rank) * b
    return list(range(first, first + b))


def _sample(run: _Run, draw: int) -> int:
    """The sample of a draw: a fresh permutation of the data each epoch."""
    n = len(run.samples)
    epoch = draw // n
    if epoch not in run.perms:
        generator = torch.Generator().manual_seed(_seed(run.opts.seed, epoch))
        run.perms = {epoch: torch.randperm(n, generator=generator)}
    return int(run.perms[epoch][draw % n])


def _step(run: _Run, step: int) -> dict:
    """One optimiser step over `accumulate` micro-batches; its log line."""
    started = time.perf_counter()
    opts, transformer, model = run.opts, run.transformer, run.ddp or run.transformer
    device, dtype = run.device, transformer.dtype
    guidance = opts.guidance if transformer.config.guidance_embeds else None
    totals = torch.zeros(len(LOSSES), device=device)
    for micro in range(run.accumulate):
        draws = _draws(run, step, micro)
        batch = run.samples.batch([_sample(run, g) for g in draws], device, dtype)
        generators = [torch.Generator().manual_seed(_seed(opts.seed, 1, g)) for g in draws]
        n = noised(models.of(transformer), batch, run.pipe.vae, guidance, generators)
        # 1. The teacher: the same module with the base's projections and full attention, no grad.
        with torch.no_grad(), original_attention(transformer):
            with captured_attention(transformer, run.layers, tiled=False) as a_teacher:
                v_teacher = transformer(**n.inputs)[0]
        # 2. The student, its loss and gradient (DDP averages them at the last micro-batch).
        last = micro == run.accumulate - 1
        with nullcontext() if run.ddp is None or last else run.ddp.no_sync():
            with captured_attention(transformer, run.layers, tiled=True) as a_student:
                v_student = model(**n.inputs)[0]
            losses = distill_loss(v_student, v_teacher, n.target, a_student, a_teacher, opts.loss_weights)
            (losses["loss"] / run.accumulate).backward()
        totals += torch.stack([losses[k].detach() for k in LOSSES])
        del a_teacher, a_student, v_teacher, v_student
    grad_norm, lr = _optimizer_step(run)
    values = run.world.mean(totals / run.accumulate).tolist()
    record = {"step": step + 1, **dict(zip(LOSSES, values, strict=True))}
    return record | {"grad_norm": grad_norm, "lr": lr, "seconds": round(time.perf_counter() - started, 4)}


def _optimizer_step(run: _Run) -> tuple[float, float]:
    """Clip, step, and cast the float32 masters back into the model; (gradient norm, learning rate)."""
    if run.masters is not None:
        for p, m in zip(run.params, run.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
    targets = run.masters or run.params
    norm = torch.nn.utils.clip_grad_norm_(targets, GRAD_CLIP)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.masters is not None:
        with torch.no_grad():
            for p, m in zip(run.params, run.masters, strict=True):
                p.copy_(m)
    group = run.optimizer.param_groups[0]
    return float(norm), float(group["lr"] * group.get("d", 1.0))  # Prodigy's step size is d * lr


# ---------------------------------------------------------------- saving and validating


def _save(run: _Run, step: int, hooks: TrainHooks) -> None:
    """The weights in the published format and the resume file (rank 0; the others wait)."""
    if run.world.rank == 0 and run.opts.save:
        out, resume, _ = run.paths
        weights = run.weights()
        C.save_weights(out, weights, run.identity, step)
        extra = _extra(run.opts, run.accumulate, run.world)
        C.save_resume(resume, run.identity, step, weights, run.optimizer, extra)
        hooks.saved(resume)
    run.world.barrier()


def _extra(opts: TrainOptions, accumulate: int, world: World) -> dict:
    """What else decides a run's draws and steps: a resume with others is a different run."""
    return {"seed": opts.seed, "batch": opts.batch, "accumulate": accumulate, "world": world.size}


def _validate(run: _Run, step: int, hooks: TrainHooks) -> dict | None:
    from .validate import validate

    result = None
    if run.world.rank == 0 and run.opts.validate_steps > 0 and run.samples.validation_files:
        hooks.phase("validate")
        result = validate(run.pipe, run.samples, run.opts, step, run.paths[0])
        hooks.validated(result)
    run.world.barrier()
    return result


def _append(log: Path, record: dict) -> None:
    try:
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write --log {log}: {e.strerror}") from e


def _trim_log(log: Path, first: int) -> None:
    """A fresh run starts the log anew; a resumed one keeps its lines up to the resumed step."""
    if not log.exists():
        return
    lines = log.read_text(encoding="utf-8").splitlines() if first else []
    kept = [line for line in lines if _step_of(line) <= first]
    log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _step_of(line: str) -> float:
    """A log line's step; a torn last line (a killed run) reads as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
