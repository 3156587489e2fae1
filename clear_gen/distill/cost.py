"""Estimates (not measurements) of a distillation step's work and memory, from the FLOP model (flops.py)
and parameter counts. docs/distill.md prints them for FLUX.1-dev on one 80 GB GPU.

Work per sample (FLOP), with gradient checkpointing:
- teacher forward: linear + full attention;
- student forward, its recomputation in the backward pass, and the backward pass itself: the input
  gradients of every linear layer (as much as its forward), the weight gradients of the trainable
  projections (2 x trainable parameters x tokens they see), attention backward (~2.5 x its forward:
  two matmuls for dQ, dK, dV against one, plus the recomputed scores).
Memory (bytes): the model once in bf16, the base's projections a second time (the teacher's), bf16
gradients of the trainable ones, float32 master copies and their gradients, the optimiser's state (Prodigy
keeps 4 tensors a parameter, AdamW 2, 8-bit AdamW 2 bytes), and the activations checkpointing keeps:
every block's input plus one block recomputed (~`ACTIVATION_TOKENS_X_HIDDEN` x tokens x hidden x 2 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import flops as FL
from ..core.geometry import build_block_lists, image_geometry

ATTENTION_BACKWARD = 2.5  # attention backward FLOPs / forward FLOPs (FlashAttention-style)
ACTIVATION_TOKENS_X_HIDDEN = 120  # live activations at the peak, in units of tokens x hidden (bf16)
OPTIMIZER_STATES = {"prodigy": 4, "adamw": 2}  # state tensors per parameter, in the updated weights' dtype
ADAMW8BIT_BYTES = 2  # two 8-bit states per parameter


def trainable_parameters(shape: FL.FluxShape, down_factor: int = 1) -> int:
    """The published key set: q, k, v, out (weights and biases) of every double block's image branch,
    q, k, v of every single block, and an f x f spatial weight per block when f > 1."""
    c = shape.hidden
    linear = c * c + c
    spatial = down_factor**2 if down_factor > 1 else 0
    return shape.double * (4 * linear + spatial) + shape.single * (3 * linear + spatial)


@dataclass(frozen=True)
class StepCost:
    flops: float  # per sample
    teacher: float
    student: float
    memory: dict[str, float]  # bytes by part

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())


def step_cost(
    shape: FL.FluxShape,
    res: int,
    window: int,
    down_factor: int = 1,
    text_len: int = 512,
    optimizer: str = "prodigy",
    fp32_master: bool = True,
    batch: int = 1,
) -> StepCost:
    """FLOPs of one sample and the memory of one micro-batch, at res x res px (module docstring)."""
    geo = image_geometry(text_len, res // 16, res // 16, window, down_factor)
    f = FL.step_flops(shape, geo, build_block_lists(geo).computed_pairs())
    trainable = trainable_parameters(shape, down_factor)
    teacher = f["linear"] + f["attn_full"]
    weight_grads = 2.0 * trainable * geo.q_len
    student = 3 * f["linear"] + weight_grads + (2 + ATTENTION_BACKWARD) * f["attn_computed"]
    tokens = geo.q_len * batch
    memory = {
        "model (bf16)": 2.0 * FL.parameter_count(shape),
        "teacher's projections": 2.0 * trainable,
        "gradients": 4.0 * trainable if fp32_master else 2.0 * trainable,
        "master weights": 4.0 * trainable if fp32_master else 0.0,
        "optimiser state": _state_bytes(optimizer, fp32_master) * trainable,
        "activations": 2.0 * ACTIVATION_TOKENS_X_HIDDEN * tokens * shape.hidden,
    }
    return StepCost(teacher + student, teacher, student, memory)


def _state_bytes(optimizer: str, fp32_master: bool) -> float:
    if optimizer == "adamw8bit":
        return ADAMW8BIT_BYTES
    return OPTIMIZER_STATES[optimizer] * (4 if fp32_master else 2)
