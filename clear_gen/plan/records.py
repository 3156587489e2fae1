"""A run's spec and the record its PNGs carry, both ways, in one place: `image_record` writes what made an
image, `options_from_record` asks for it again (`--from`). What the record leaves out is the default, but for
the guidance: it records the one that ran, and leaving it out means none (as before there was guidance)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files.record import ImageRecord
from .spec import GenerateOptions, RunSpec, Stage

ATTENTION_FIELDS = frozenset({"variant", "window", "down_factor", "clear_weights", "clear_weights_sha256"})
TRANSFORMER_FIELDS = {"quantize": "none", "transformer": None}  # a GGUF file or a quantized base, not both
CONTROL_FIELDS = ("control", "controlnet", "control_mode", "control_scale", "control_sha256")  # as a whole


def image_record(
    spec: RunSpec,
    job: Any,
    stages: list[Stage],
    timings: dict,
    dtype: str,
    device: str,
    backend: str | None = None,
) -> ImageRecord:
    """What made the image of `stages` (all of a job's, or the first few for a kept stage): `--from`
    re-makes it. `job`: its prompt, seed, source picture and ControlNet record (render.Job). `backend`: the
    CLEAR kernel that ran (what `auto` chose; recorded beside the asked one, which `--from` asks again)."""
    opts, choice, weights = spec.asked, spec.attention, spec.weights
    last, clear = stages[-1], any(s.clear for s in stages)
    several = len(stages) > 1 and job.first is None  # a text-to-image first pass, then SDEdit
    cache = spec.settings.cache
    guided = next((s for s in stages if s.guide != "none"), None)  # a run's guided stages share one guide
    extra = {
        "first_steps": stages[0].steps if several else None,
        "first_guidance": stages[0].guidance if several else None,
        "first_size": f"{stages[0].width}x{stages[0].height}" if several else None,
        "ntk_factor": opts.ntk_factor,
        "proportional_attention": opts.proportional_attention,
        "dype": True if opts.dype else None,  # only when on: a record without it ran none
        "max_sequence_length": opts.max_sequence_length,
        "clear_weights": str(choice.weights) if clear and choice.weights is not None else None,
        "clear_weights_sha256": choice.sha256 if clear else None,
        "dtype": dtype,
        "backend": backend or spec.settings.backend,
        "backend_asked": spec.settings.backend if backend and backend != spec.settings.backend else None,
        "device": device,
        "quantize": None if weights.quantize == "none" else weights.quantize,
        "quantize_text": None if weights.quantize_text == "none" else weights.quantize_text,
        "transformer": _transformer_source(weights.transformer),
        "source": job.source,  # upscale: the picture the first stage started from
        "loras": [s.spec for s in weights.loras] or None,
        "control": job.control_info,
        "compile": True if spec.settings.compile else None,
        "cache": str(cache) if cache.kind != "none" else None,
        "guide": guided.guide if guided else None,  # as decided: a record without one ran none
        "guide_level": guided.guide_level if guided else None,
        "vae_tiling": opts.vae_tiling if opts.vae_tiling != GenerateOptions.vae_tiling else None,
        "vae_tile": opts.vae_tile,
        "recipe": opts.recipe if opts.recipe != GenerateOptions.recipe else None,
        "edit_source": spec.edit.record() if spec.edit is not None else None,  # the picture an edit changed
    }  # fmt: skip
    model = Path(weights.model).expanduser()
    return ImageRecord(
        prompt=job.prompt,
        seed=job.seed,
        model=os.path.abspath(model) if model.is_dir() else weights.model,
        variant=choice.label if clear else "none",
        window=choice.window if clear else None,
        down_factor=choice.down_factor if clear else None,
        steps=last.steps,
        guidance=last.guidance,
        width=last.width,
        height=last.height,
        stages=[s.long_side for s in stages],
        strength=opts.strength if any(s.sdedit for s in stages) else None,
        timings=timings,
        extra={k: v for k, v in extra.items() if v is not None},
    )


def _transformer_source(spec: str | None) -> str | None:
    """--transformer as the PNG records it: a local file's absolute path, a Hub file as given."""
    if spec is None or not Path(spec).expanduser().is_file():
        return spec
    return os.path.abspath(Path(spec).expanduser())


def options_from_record(record: ImageRecord, **overrides) -> GenerateOptions:
    """GenerateOptions that re-run a saved image (`--from`); `overrides` win over the record.

    An override of the attention (variant, window, down factor or CLEAR weights) replaces the record's
    attention as a whole, so `--from x.png --variant r16` does not conflict with x.png's custom window;
    likewise `--quantize` or `--transformer` replaces the record's transformer (a GGUF file or a quantized
    base's), `--lora` the record's LoRAs and `--controlnet` (or --control, --control-mode, --control-scale)
    the record's ControlNet. An edit's record edits its picture again (`edit_source`), unless `edit` names
    another."""
    extra = record.extra or {}
    compared = extra.get("compare")
    if isinstance(compared, dict):
        panels = ", ".join(Path(p).name for p in compared.get("panels") or [])
        raise ConfigError(
            f"this is a compare grid of {record.variant}: --from takes one of its panels' images ({panels})"
        )
    if extra.get("source"):
        src = extra["source"]
        raise ConfigError(
            f"this image was upscaled from {src.get('file')} (sha256 {str(src.get('sha256'))[:12]}...): "
            f"re-make it with `clear-gen upscale {src.get('file')}` and the settings `clear-gen info` shows"
        )
    custom = record.variant == "custom"
    local = extra.get("clear_weights") if not custom else None  # a local file given as --variant
    opts = GenerateOptions(
        prompts=[record.prompt],
        width=record.width,
        height=record.height,
        model=record.model,
        variant=None if custom else (local or record.variant),
        window=record.window if custom else None,
        down_factor=record.down_factor if custom else None,
        clear_weights=extra.get("clear_weights") if custom else None,
        clear_weights_sha256=extra.get("clear_weights_sha256"),
        stages=list(record.stages) if record.stages else None,
        strength=record.strength if record.strength is not None else GenerateOptions.strength,
        steps=record.steps,
        guidance=record.guidance,
        first_steps=extra.get("first_steps"),
        first_guidance=extra.get("first_guidance"),
        first_size=extra.get("first_size") or _legacy_first_size(record),
        seeds=[record.seed],
        max_sequence_length=extra.get("max_sequence_length"),
        ntk_factor=extra.get("ntk_factor"),
        proportional_attention=extra.get("proportional_attention"),
        dype=bool(extra.get("dype", False)),
        dtype=extra.get("dtype"),
        backend=extra.get("backend_asked") or extra.get("backend", GenerateOptions.backend),
        quantize=extra.get("quantize", GenerateOptions.quantize),
        quantize_text=extra.get("quantize_text", GenerateOptions.quantize_text),
        transformer=extra.get("transformer"),
        loras=extra.get("loras"),
        **_control_options(extra.get("control")),
        compile=extra.get("compile", GenerateOptions.compile),
        cache=extra.get("cache", GenerateOptions.cache),
        guide=extra.get("guide", "none"),  # none too for an image made before there was guidance
        guide_level=extra.get("guide_level"),
        vae_tiling=extra.get("vae_tiling", GenerateOptions.vae_tiling),  # a v0.1 record: auto (exact)
        vae_tile=extra.get("vae_tile"),
        recipe=extra.get("recipe", GenerateOptions.recipe),
        **_edit_options(extra.get("edit_source")),
    )
    if "edit" in overrides:  # another picture: its own sha256
        opts = replace(opts, edit_sha256=None)
    if ATTENTION_FIELDS & overrides.keys():
        opts = replace(opts, **dict.fromkeys(ATTENTION_FIELDS))
    if TRANSFORMER_FIELDS.keys() & overrides.keys():
        opts = replace(opts, **TRANSFORMER_FIELDS)
    if {"controlnet", "control"} & overrides.keys():
        opts = replace(opts, **dict.fromkeys(CONTROL_FIELDS))
    return replace(opts, **overrides)


def _legacy_first_size(record: ImageRecord) -> str | None:
    """The first pass's size of a record made before `first_size` was recorded: its first stage's long side
    at the target's aspect, rounded to the CLEAR variant's size multiple (64 px for a down factor of 4), as
    it was then; None without a text-to-image first pass."""
    from ..core.sizes import scaled_size, size_multiple

    stages = record.stages or []
    if "first_steps" not in (record.extra or {}) or len(stages) < 2:
        return None
    w, h = scaled_size(record.width, record.height, stages[0], size_multiple(record.down_factor or 1))
    return f"{w}x{h}"


def _edit_options(source: dict | None) -> dict:
    """GenerateOptions' edit fields from a record's `edit_source` (spec.EditSpec.record)."""
    if not isinstance(source, dict):
        return {}
    return {"edit": source.get("file"), "edit_sha256": source.get("sha256")}


def _control_options(control: dict | None) -> dict:
    """GenerateOptions' ControlNet fields from a record's `control` entry (control.control_record)."""
    if not control:
        return {}
    return {
        "controlnet": control.get("controlnet"),
        "control": control.get("image"),
        "control_mode": control.get("mode"),
        "control_scale": control.get("scale"),
        "control_sha256": control.get("sha256"),
    }
