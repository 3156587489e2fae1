"""`clear-gen distill make-data | train`: parse, call the library, show progress. Registered in cli.py.

Errors are ClearGenErrors: cli.main turns each into one red line and exit code 1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..core import launch
from ..errors import ConfigError
from . import options

app = typer.Typer(
    no_args_is_help=True,
    help="Make CLEAR weights for any FLUX-family model, window and down factor (see docs/distill.md).",
)
err = Console(stderr=True, highlight=False, emoji=False, width=None if sys.stderr.isatty() else 160)
LINE_EVERY_S = 10.0  # not a terminal: at most one progress line per this many seconds
DATA, TRAIN, RUN = "Data", "Training", "Run"


def _progress() -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=err, disable=not err.is_terminal)


@app.command("make-data")
def make_data(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Data folder (made, or resumed).", rich_help_panel=DATA
    ),
    model: str = typer.Option(
        "dev", help="The teacher: base, Hub repo id or local folder.", rich_help_panel=DATA
    ),
    prompts_file: Path = typer.Option(
        None, help="One prompt a line (# comments): the teacher draws each sample.", rich_help_panel=DATA
    ),
    images: Path = typer.Option(
        None, help="Instead: images with same-stem .txt or .json prompts.", rich_help_panel=DATA
    ),
    count: int = typer.Option(
        None, help="Samples.", show_default="one per prompt; every image", rich_help_panel=DATA
    ),
    res: int = typer.Option(1024, help="Square side in px.", rich_help_panel=DATA),
    steps: int = typer.Option(20, help="The teacher's steps per image.", rich_help_panel=DATA),
    guidance: float = typer.Option(3.5, help="The teacher's guidance.", rich_help_panel=DATA),
    seed: int = typer.Option(0, help="Sample i is drawn with seed + i.", rich_help_panel=DATA),
    max_sequence_length: int = typer.Option(
        None, help="T5 tokens, up to 512.", show_default="512; 256 schnell", rich_help_panel=DATA
    ),
    validation_prompts: Path = typer.Option(
        None, help="Held-out prompts for validation.", show_default="4 built in", rich_help_panel=DATA
    ),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N, mps or cpu.", rich_help_panel=RUN),
    dtype: str = typer.Option(
        None, help="bf16, fp16 or fp32.", show_default="bf16 CUDA/MPS, fp32 CPU", rich_help_panel=RUN
    ),
    token: str = typer.Option(
        None, help="Hub token.", show_default="HF_TOKEN or hf auth login", rich_help_panel=RUN
    ),
) -> None:
    """Cache what the teacher makes (VAE posteriors, prompt embeddings); re-runs make only what is missing."""
    from ..distill.data import DataOptions
    from ..distill.data import make_data as run

    opts = DataOptions(
        out=out, model=model, prompts_file=prompts_file, images=images, count=count, res=res, steps=steps,
        guidance=guidance, seed=seed, max_sequence_length=max_sequence_length,
        validation_prompts=validation_prompts, device=device, dtype=dtype, token=token,
    )  # fmt: skip
    with _progress() as bar:
        task = bar.add_task("samples", total=None)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            if not err.is_terminal and (time.monotonic() - last[0] > LINE_EVERY_S or done == total):
                last[0] = time.monotonic()
                err.print(f"samples {done}/{total}", markup=False)

        summary = run(opts, progress, lambda text: err.print(f"[dim]{escape(text)}[/dim]"))
    err.print(
        f"{summary.out}: {summary.count} samples ({summary.made} made now, {summary.kept} already there)"
    )


def _weights(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"--loss-weights takes three numbers FM,PRED,ATTN (e.g. 1,0.5,0.5); got {text!r}")
    return values


def _train_data(
    data: Path = typer.Option(..., help="A make-data folder.", rich_help_panel=DATA),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The CLEAR weights, FILE.safetensors.", rich_help_panel=DATA
    ),
    window: int = typer.Option(..., help="CLEAR window r, in tokens.", rich_help_panel=TRAIN),
    down_factor: int = typer.Option(1, help="Down factor f (1 = none).", rich_help_panel=TRAIN),
    model: str = typer.Option("dev", help="The base the data was made from.", rich_help_panel=DATA),
    res: int = typer.Option(1024, help="Square side in px, as the data.", rich_help_panel=DATA),
) -> None:
    """What train distils: the data, the weights to write, the window (only its signature is used)."""


def _train_optimiser(
    steps: int = typer.Option(10_000, help="Optimiser steps in all.", rich_help_panel=TRAIN),
    batch: int = typer.Option(1, help="Samples per GPU and micro-batch.", rich_help_panel=TRAIN),
    accumulate: int = typer.Option(
        None, help="Micro-batches per step.", show_default="32 / (batch x GPUs)", rich_help_panel=TRAIN
    ),
    lr: float = typer.Option(
        None, help="Learning rate.", show_default="1 prodigy, 1e-5 adamw", rich_help_panel=TRAIN
    ),
    optimizer: str = typer.Option("prodigy", help="prodigy, adamw or adamw8bit.", rich_help_panel=TRAIN),
    loss_weights: str = typer.Option("1,0.5,0.5", help="FM,PRED,ATTN loss weights.", rich_help_panel=TRAIN),
    seed: int = typer.Option(0, help="Data order and noise.", rich_help_panel=TRAIN),
) -> None:
    """The optimisation (only its signature is used)."""


def _train_saving(
    save_every: int = typer.Option(
        500, help="Save weights and resume file every N steps.", rich_help_panel=RUN
    ),
    validate_every: int = typer.Option(
        0, help="Validate every N steps (0: at the end).", rich_help_panel=RUN
    ),
    validate_steps: int = typer.Option(20, help="Steps per validation image (0: none).", rich_help_panel=RUN),
    resume: Path = typer.Option(None, help="Continue from FILE.resume.pt.", rich_help_panel=RUN),
    log: Path = typer.Option(
        None, help="JSON lines, one per step.", show_default="FILE.log.jsonl", rich_help_panel=RUN
    ),
    no_checkpointing: bool = typer.Option(
        False, "--no-gradient-checkpointing", help="Keep activations (more memory).", rich_help_panel=RUN
    ),
    no_fp32_master: bool = typer.Option(
        False, "--no-fp32-master", help="Update bf16 weights directly.", rich_help_panel=RUN
    ),
) -> None:
    """Saving, validating, resuming and memory (only its signature is used)."""


def _train_device(
    device: str = typer.Option("auto", help="auto, cuda, cuda:N, mps or cpu.", rich_help_panel=RUN),
    dtype: str = typer.Option(
        None, help="bf16, fp16 or fp32.", show_default="bf16 CUDA/MPS, fp32 CPU", rich_help_panel=RUN
    ),
    backend: str = typer.Option(
        "auto", help="CLEAR kernel: auto, gather, flex (CUDA) or dense.", rich_help_panel=RUN
    ),
    token: str = typer.Option(
        None, help="Hub token.", show_default="HF_TOKEN or hf auth login", rich_help_panel=RUN
    ),
) -> None:
    """Where it runs (only its signature is used)."""


@app.command()
@options.with_options(_train_data, _train_optimiser, _train_saving, _train_device)
def train(**given: Any) -> None:
    """Distil CLEAR weights from the base (teacher: full attention) into its CLEAR twin (student)."""
    from ..distill.train import TrainOptions
    from ..distill.train import train as run
    from .display import duration

    # 1. Parse.
    given["loss_weights"] = _weights(given["loss_weights"])
    given["gradient_checkpointing"] = not given.pop("no_checkpointing")
    given["fp32_master"] = not given.pop("no_fp32_master")
    opts = TrainOptions(**given)
    # 2. Train, one bar for the steps with the three losses (rank 0 of a torchrun launch shows it).
    err.quiet = bool(launch.rank())  # torchrun's ranks 1..: rank 0 shows the progress
    with _progress() as bar:
        started = time.monotonic()
        result = run(opts, _train_hooks(bar, opts.steps))
    # 3. Where everything is.
    if result.interrupted:
        err.print(
            f"[yellow]interrupted at step {result.step}[/yellow]: saved {escape(str(result.resume))}; "
            f"continue with the same command and --resume {escape(str(result.resume))}"
        )
        raise typer.Exit(130)
    err.print(f"{result.step} steps in {duration(time.monotonic() - started)}: {escape(str(result.out))}")
    f = f" --down-factor {opts.down_factor}" if opts.down_factor > 1 else ""
    err.print(f'use it: clear-gen "..." --window {opts.window}{f} --clear-weights {escape(str(result.out))}')


def _train_hooks(bar: Progress, steps: int):
    """TrainHooks that drive one bar (the losses in its description), or lines when not a terminal."""
    from ..distill.train import TrainHooks

    task = bar.add_task("loading the base", total=None)
    last = [0.0]

    def step(record: dict) -> None:
        losses = f"fm {record['loss_fm']:.4g}  pred {record['loss_pred']:.4g}  attn {record['loss_attn']:.4g}"
        bar.update(task, completed=record["step"], description=losses)
        if not err.is_terminal and time.monotonic() - last[0] > LINE_EVERY_S:
            last[0] = time.monotonic()
            err.print(f"step {record['step']}/{steps}: {losses}, {record['seconds']:.2f} s", markup=False)

    def validated(result: dict) -> None:
        psnr = "identical" if result["psnr"] is None else f"PSNR {result['psnr']:.2f} dB"
        err.print(f"validation: {psnr}, SSIM {result['ssim']:.4f}: {escape(result['path'])}")

    return TrainHooks(
        note=lambda text: err.print(f"[dim]{escape(text)}[/dim]"),
        phase=lambda name: bar.update(task, description="validating" if name == "validate" else "loading"),
        start=lambda first, total: bar.update(task, completed=first, total=total, description="training"),
        step=step,
        validated=validated,
    )
