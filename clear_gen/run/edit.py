"""`edit`: a picture changed by an instruction, at 2K-8K, with FLUX.1 Kontext [dev]. It is generate's code
path (run.generate: parse, checks, memory plan, job runner), the picture's reference tokens joining every
stage (GenerateOptions.edit); here only what differs: the size, from the picture.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.sizes import size_multiple
from ..errors import ConfigError
from ..files.source import UpscaleTarget, load_source
from ..plan.parse import clear_choice, model_family
from ..plan.spec import GenerateOptions
from .generate import LoadedPipelines, generate
from .render import Hooks, ImageResult


def edit_options(
    opts: GenerateOptions, picture: str | Path | None = None, target: UpscaleTarget | None = None
) -> GenerateOptions:
    """`opts` for editing `picture` (None: opts.edit, e.g. from a record), at `target`'s size of it: a long
    side or a factor keep its aspect ratio, rounded to the attention's size multiple (64 px for -down4);
    None keeps opts' width and height (a record's). The instruction is opts.prompts[0]."""
    if not opts.prompts or not str(opts.prompts[0]).strip():
        raise ConfigError('edit needs an instruction: clear-gen edit IMAGE "what to change"')
    if picture is not None:
        opts = replace(opts, edit=str(picture), edit_sha256=None)
    if opts.edit is None:
        raise ConfigError("edit needs the picture to edit: clear-gen edit IMAGE INSTRUCTION")
    if target is None:
        return opts
    source = load_source(Path(opts.edit).expanduser())
    family = model_family(opts.model)
    choice = clear_choice(opts.variant, opts.window, opts.down_factor, opts.clear_weights, family)
    width, height, _ = target.size(source.size, size_multiple(choice.down_factor))
    return replace(opts, width=width, height=height)


def edit(
    opts: GenerateOptions,
    picture: str | Path | None = None,
    target: UpscaleTarget | None = None,
    hooks: Hooks | None = None,
    pipelines: LoadedPipelines | None = None,
) -> list[ImageResult]:
    """Edit `picture` as opts.prompts[0] says (an instruction: "make it night"), at `target`'s size of it
    (edit_options), with opts.model a FLUX.1 Kontext model ("kontext") and the recipe `kontext` for
    Kontext's sampling: a first pass with the reference at 1024 px, then CLEAR's SDEdit stages with it.
    One image per seed, each saved with the picture's path, size and sha256 in its record (`edit_source`).
    """
    return generate(edit_options(opts, picture, target), hooks, pipelines=pipelines)
