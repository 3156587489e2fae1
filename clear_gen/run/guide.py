"""Projected-flow guidance (core/guide.py) in one SDEdit stage's img2img call.

diffusers' img2img pipelines show no callback the velocity before the scheduler's step
(`callback_on_step_end` runs after it), so `projected_flow` wraps the stage's own scheduler for that one
call; both wrappers hand on what they are given, so the denoising is diffusers' own but for the velocity:
- `scale_noise`, called once to noise the encoded start picture, keeps its clean latent x_g: the very
  latent the stage starts from (no second VAE encode, which would draw again from the VAE's posterior
  and cost a tiled encode at 8K);
- `step` gets the velocity the pipeline settled on (after a ControlNet or true CFG), the sample x_t and
  the scheduler's own float32 sigmas, and hands the scheduler the guided velocity instead, computed in
  float32 on the unpacked latent grid (the family adapter's layout) and cast back to the velocity's dtype.
A wrapper on the transformer's output would see sigma only as the timestep the latents' dtype rounds (bf16),
would run again when full attention is timed, and would still need x_g from somewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .. import models
from ..core.guide import guided_velocity, weight
from ..plan.spec import Stage


def schedule(stage: Stage) -> list[float]:
    """c_i of each step the stage runs. i counts from the start of the whole schedule, whose first
    steps - denoising_steps an SDEdit stage skips (README, "Projected-flow guidance": why)."""
    first = stage.steps - stage.denoising_steps
    return [weight(stage.guide, i, stage.steps) for i in range(first, stage.steps)]


@contextmanager
def projected_flow(img2img, stage: Stage) -> Iterator[None]:
    """`img2img`'s call inside guides `stage` towards its start picture (stage.guide, stage.guide_level);
    with no guidance nothing is wrapped."""
    if stage.guide == "none":
        yield
        return
    scheduler, family = img2img.scheduler, models.of(img2img.transformer)
    scale_noise, step, c = scheduler.scale_noise, scheduler.step, schedule(stage)
    first, start = stage.steps - len(c), []

    def keep_start(sample, timestep, noise=None):
        start.append(sample.float())  # (B, C, H/8, W/8): the start picture's latent, scaled and shifted
        return scale_noise(sample, timestep, noise)

    def grid(latents):
        return family.unpack_latents(latents.float(), stage.width, stage.height)  # (B, C, H/8, W/8)

    def guided_step(model_output, timestep, sample, *args, **kwargs):
        i = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
        assert len(start) == 1 and first <= i < stage.steps, (len(start), first, i)
        sigma = float(scheduler.sigmas[i])
        x_g, level = start[0], stage.guide_level
        v = guided_velocity(stage.guide, grid(model_output), grid(sample), x_g, sigma, c[i - first], level)
        return step(family.pack_latents(v).to(model_output.dtype), timestep, sample, *args, **kwargs)

    scheduler.scale_noise, scheduler.step = keep_start, guided_step
    try:
        yield
    finally:
        del scheduler.scale_noise, scheduler.step  # the class's own methods again
