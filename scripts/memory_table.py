"""The table of docs/memory.md: FLUX.1-dev's memory plan at 1K-8K in bf16, fp8 and nf4 on a 24 GB GPU.

    PYTHONPATH=. python scripts/memory_table.py

Every figure comes from clear_gen.plan.memory (the plan `clear-gen generate --dry-run` prints) for the
default recipe (a 1024 px first pass with full attention, then CLEAR r8-down4 at the target) on an
assumed 24 GB card with an RTX 4090's rate, whatever GPU this machine has. tests/test_memory.py checks
that docs/memory.md holds exactly this output.
"""

from __future__ import annotations

import torch

from clear_gen.cli.display import duration
from clear_gen.plan import gpus
from clear_gen.plan.memory import plan_run
from clear_gen.plan.spec import GenerateOptions

SIZES = (1024, 2048, 4096, 8192)
MODES = ("none", "fp8", "nf4")  # --quantize, with bf16 compute
HEADER = (
    "| size | --quantize | transformer GB | step activations GB | all on the GPU GB | auto: offload | "
    "peak GB | fits | time (est.) |\n"
    "|---:|---|---:|---:|---:|---|---:|---|---:|\n"
)


def row(side: int, mode: str, gb: float = 24.0) -> str:
    opts = GenerateOptions(prompts=["x"], width=side, height=side, quantize=mode)
    plan = plan_run(opts, gpu=gpus.assumed_gpu(gb, torch.bfloat16))
    everything = plan_run(opts, gpu=gpus.assumed_gpu(1000.0, torch.bfloat16))  # offload none, unchunked
    last = plan.stages[-1]
    acts = f"{last.activations_gb:.1f}" + (
        f" ({last.unchunked_activations_gb:.1f})"
        if last.unchunked_activations_gb > last.activations_gb
        else ""
    )
    peak = f"{plan.peak_gb:.1f}" + (f" ({plan.unchunked_peak_gb:.1f})" if plan.ff_chunk else "")
    cells = (side, mode, f"{plan.transformer_gb:.1f}", acts, f"{everything.peak_gb:.1f}", plan.offload, peak)
    return (
        "| "
        + " | ".join(map(str, cells))
        + f" | {'yes' if plan.fits else 'no'} | ~{duration(plan.time_s)} |\n"
    )


def markdown() -> str:
    return HEADER + "".join(row(side, mode) for side in SIZES for mode in MODES)


if __name__ == "__main__":
    print(markdown(), end="")
