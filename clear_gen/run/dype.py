"""DyPE (--dype, core/dype.py) in one CLEAR stage: every step's RoPE from that step's sigma.

`dynamic_rope` puts, for the stage's call, a forward pre-hook on each model (the transformer, and a
ControlNet whose blocks run CLEAR) that reads the call's `timestep` (the shifted sigma, in the dtype the
model's own time embedding reads it: bf16-rounded in a bf16 run, as in the authors' code) and replaces its
RoPE embedder's output with Dy-YaRN's cos and sin at the stage's grid: rows on axis 1 (s = h / 64),
columns on axis 2 (s = w / 64), the first axis as it was. The grid comes from the stage, not from the
positions, which under torchrun's sequence mode are one rank's slice. Nothing is wrapped when the stage
has no DyPE, so a run without it is today's bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .. import models
from ..core.dype import rotary
from ..core.sizes import TOKEN_PX
from ..plan.spec import Stage

ROW_AXIS, COLUMN_AXIS = 1, 2  # img_ids = [0, row, col]: FLUX.1's and FLUX.2's layouts alike


@contextmanager
def dynamic_rope(modules: list, stage: Stage) -> Iterator[None]:
    """Inside: `modules` (a transformer, a ControlNet) take Dy-YaRN's RoPE at each call's timestep, when
    stage.dype; outside, their stock RoPE again."""
    if not stage.dype:
        yield
        return
    sides = {ROW_AXIS: stage.height // TOKEN_PX, COLUMN_AXIS: stage.width // TOKEN_PX}
    handles = []
    for module in modules:
        family = models.of(module)
        step = _Step(family, module, sides)
        handles.append(module.register_forward_pre_hook(step, with_kwargs=True))
        family.set_rope(module, step.rotary)
    try:
        yield
    finally:
        for module, handle in zip(modules, handles, strict=True):
            handle.remove()
            models.of(module).set_rope(module, None)


class _Step:
    """The pre-hook that reads a call's sigma, and the RoPE embedder's forward that uses it."""

    def __init__(self, family, module, sides: dict[int, int]) -> None:
        self.family, self.sides, self.t = family, sides, 1.0
        self.axes, self.theta = family.rope_axes(module), family.rope_theta(module)

    def __call__(self, module, args: tuple, kwargs: dict):
        timestep = self.family.forward_arguments(module, args, kwargs)["timestep"]
        self.t = float(timestep.flatten()[0])  # sigma: the transformer multiplies it by 1000 itself
        return None

    def rotary(self, ids):
        """RoPE's cos and sin (S, sum(axes)) of positions ids (S, axes) at the latest call's sigma."""
        return rotary(ids, self.axes, self.theta, self.sides, self.t)
