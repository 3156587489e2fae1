"""Parsing a run, once, before anything heavy loads: `parse(GenerateOptions) -> RunSpec`.

Every user error that can be found from the arguments alone is raised here, by the one parser of each
option (attention, sizes, numbers, quantization, LoRAs, ControlNet, cache, offload, device names), so
nothing below validates them again. The stages of each image come from the run's recipe (recipe.py). An
edit (`GenerateOptions.edit`, FLUX.1 Kontext) is a generation whose every stage also reads the picture's
reference tokens (`edit_spec`).
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from ..attention import check_window
from ..core.sizes import MAX_SIDE, MIN_SIDE, TOKEN_PX, check_size, scaled_size, size_multiple
from ..errors import ConfigError, DeviceError, WeightsError
from ..weights.spec import WeightsSpec
from .recipe import Recipe, recipe
from .spec import (
    VAE_TILINGS,
    ClearChoice,
    EditSpec,
    GenerateOptions,
    OutputSpec,
    RunSpec,
    Settings,
    Stage,
    parse_cache,
)

MAX_COUNT = (
    10_000  # --count: images of one run (each job is made lazily, but a typo should not run for weeks)
)
OFFLOADS = ("auto", "none", "model", "sequential")
VAE_TILE_MULTIPLE = 32  # px: diffusers' tiles (fast) stride 3/4 of a tile in whole latent px


def parse(opts: GenerateOptions, note=lambda text: None, upscale: bool = False) -> RunSpec:
    """`opts` checked and resolved into a RunSpec (see spec.py). `upscale`: the pictures give the size
    and the prompt may be empty; the attention then stays as chosen, and the stages are the pictures'
    (`upscale_stages`). `note` hears what the user should know (a control picture converted, ...)."""
    from ..weights import control, lora

    prompts = _prompts(opts, upscale)
    the_recipe = recipe(opts.recipe)
    _check_numbers(opts)
    family = model_family(opts.model)
    attention = clear_choice(opts.variant, opts.window, opts.down_factor, opts.clear_weights, family)
    check_family(attention, family, opts.model, default_too=False)
    _note_changed(attention, opts.clear_weights_sha256, note)
    weights = WeightsSpec(
        model=opts.model,
        token=opts.token,
        quantize=opts.quantize,
        quantize_text=opts.quantize_text,
        transformer=opts.transformer,
        loras=tuple(lora.parse_loras(opts.loras or [], opts.lora_files or [])),
        controlnet=control.parse_control(opts, own_picture=upscale, note=note),
        family=family,
    )
    _check_weights(weights)
    settings = _settings(opts, parse_cache(opts.cache))
    spec = RunSpec(
        asked=opts,
        prompts=prompts,
        seeds=tuple(image_seeds(opts.seeds, opts.count)),
        recipe=the_recipe,
        attention=attention,
        weights=weights,
        settings=settings,
        output=OutputSpec(opts.out, opts.keep_stages),
        text_len=text_length(opts),
    )
    if upscale:
        if opts.edit is not None:
            raise ConfigError("upscale takes no picture to edit: run clear-gen edit")
        return spec
    attention = at_size(attention, opts.width, opts.height, the_recipe)
    check_family(attention, family, opts.model)
    note_full_window(attention, opts.width, opts.height, note)
    spec = replace(spec, attention=attention, edit=edit_spec(spec, attention, note) if opts.edit else None)
    spec = replace(spec, stages=generate_stages(spec, attention))
    check_model_runs(spec, spec.stages, "give --direct for one text-to-image pass at the target")
    check_backend_serves(spec, attention, spec.stages)
    if guide_kind(opts.guide) not in (None, "none") and all(s.guide == "none" for s in spec.stages):
        note(f"--guide {opts.guide}: no stage to guide (only CLEAR's SDEdit stages are guided)")
    note_dype(opts, spec.stages, note)
    return spec


def edit_spec(spec: RunSpec, choice: ClearChoice, note) -> EditSpec:
    """An edit's picture read (one line when it cannot be), for a model that edits, and the size of its
    reference tokens: the model's for the picture, in multiples of the CLEAR stages' size multiple (each
    grid's sides divisible by the down factor)."""
    from .. import models
    from ..files.source import load_source
    from ..weights.shapes import model_edits

    opts, weights = spec.asked, spec.weights
    if not model_edits(weights.model):
        raise ConfigError(
            f"--model {weights.model} does not edit pictures: an edit needs FLUX.1 Kontext [dev] (--model "
            "kontext) or a diffusers folder of it"
        )
    if weights.controlnet is not None:
        raise ConfigError("an edit takes no --controlnet: the picture it edits steers it")
    source = load_source(Path(opts.edit).expanduser())
    for text in source.notes:
        note(f"{source.path.name}: {text}")
    if opts.edit_sha256 is not None and opts.edit_sha256 != source.sha256:
        note(f"{source.path.name} changed since the image was made (sha256 {opts.edit_sha256[:12]}... then, "
             f"{source.sha256[:12]}... now): the result will differ")  # fmt: skip
    reference = models.family(weights.family).reference_size(*source.size, size_multiple(choice.down_factor))
    return EditSpec(source, reference)


def note_dype(opts: GenerateOptions, stages: tuple[Stage, ...], note) -> None:
    """--dype: say so when it changes nothing, and when it sets aside an asked --ntk-factor."""
    if not opts.dype:
        return
    if not any(s.dype for s in stages):
        note(f"--dype: no CLEAR stage above {dype_base_px()} px, so DyPE changes nothing")
    elif opts.ntk_factor is not None:
        note(f"--ntk-factor {opts.ntk_factor:g} is not used in DyPE's stages: DyPE sets RoPE's frequencies")


def _note_changed(choice: ClearChoice, sha256: str | None, note) -> None:
    """--from: say so when the local CLEAR checkpoint is not the one the image was made with."""
    if sha256 is not None and choice.sha256 is not None and choice.sha256 != sha256:
        note(f"{choice.weights.name} changed since the image was made (sha256 {sha256[:12]}... then, "
             f"{choice.sha256[:12]}... now): the result will differ")  # fmt: skip


def _prompts(opts: GenerateOptions, upscale: bool) -> tuple[str, ...]:
    prompts = tuple(p.strip() for p in opts.prompts)
    if upscale:
        return prompts[:1] if prompts and prompts[0] else ()
    if not prompts or not all(prompts):
        raise ConfigError("the prompt is empty: give a PROMPT or a --prompts-file with one prompt a line")
    return prompts


def _check_numbers(opts: GenerateOptions) -> None:
    """Numbers that need no model to check."""
    if not 0 < opts.strength <= 1:
        raise ConfigError(f"--strength must be in (0, 1], got {opts.strength}")
    ranges = {  # option: (lowest, highest or None); an unset option (None: the recipe's default) passes
        "steps": (1, None),
        "first_steps": (1, None),
        "max_sequence_length": (1, 512),  # T5's limit in FluxPipeline
        "guidance": (0, None),
        "first_guidance": (0, None),
        "guide_level": (1, 8),  # 2^8 latent cells = 2048 px a block already
    }
    for name, (low, high) in ranges.items():
        value = getattr(opts, name)
        if value is not None and not (low <= value and (high is None or value <= high)):  # NaN fails too
            limits = f"at least {low}" if high is None else f"{low}-{high}"
            raise ConfigError(f"--{name.replace('_', '-')} must be {limits}, got {value}")
    if opts.ntk_factor is not None and not opts.ntk_factor > 0:
        raise ConfigError(f"--ntk-factor must be positive, got {opts.ntk_factor}")
    guide_kind(opts.guide)


def guide_kind(guide: str | None) -> str | None:
    """--guide checked: a kind core.guide knows (cosine_decay reads as cosine-decay); None: the recipe's."""
    if guide is None:
        return None
    from ..core.guide import GUIDES

    kind = guide.strip().lower().replace("_", "-")
    if kind not in GUIDES:
        raise ConfigError(f"unknown --guide {guide!r}; choose {', '.join(GUIDES[:-1])} or {GUIDES[-1]}")
    return kind


def _check_weights(weights: WeightsSpec) -> None:
    from .. import models
    from ..weights.quantize import check_names  # imports torch: not at the CLI's start

    check_names(weights.quantize, weights.quantize_text, weights.transformer)
    family = models.family(weights.family)
    if weights.controlnet is not None and not family.RESIDUALS:  # its transformer takes no ControlNet's
        raise ConfigError(f"{family.LABEL} ({family.NAME}) has no ControlNet: run it without --controlnet")


def _settings(opts: GenerateOptions, cache) -> Settings:
    """--device, --dtype, --offload, --gpu-memory, --parallel and --backend: known names and numbers."""
    from ..attention.backends import check_backend
    from ..core.device import check_dtype
    from ..core.launch import check_mode

    if opts.offload not in OFFLOADS:
        raise ConfigError(
            f"unknown --offload {opts.offload!r}; choose {', '.join(OFFLOADS[:-1])} or {OFFLOADS[-1]}"
        )
    if opts.offload in ("model", "sequential"):
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ConfigError(f"--offload {opts.offload} needs accelerate: pip install accelerate") from None
    if opts.gpu_memory is not None and not opts.gpu_memory > 0:
        raise ConfigError(f"--gpu-memory must be a positive number of GB, got {opts.gpu_memory}")
    check_dtype(opts.dtype)
    check_mode(opts.parallel)
    check_backend(opts.backend)
    vae_tile = _vae_tile(opts)
    return Settings(
        device=opts.device,
        dtype=opts.dtype,
        offload=opts.offload,
        gpu_memory=opts.gpu_memory,
        parallel=opts.parallel,
        compile=opts.compile,
        cache=cache,
        backend=opts.backend,
        compare_full=opts.compare_full,
        vae_tiling=opts.vae_tiling,
        vae_tile=vae_tile,
    )


def _vae_tile(opts: GenerateOptions) -> int:
    """--vae-tiling's name and --vae-tile's side checked; the tile side: the asked one, else the VAE's
    sample_size (what diffusers' own tiling uses)."""
    if opts.vae_tiling not in VAE_TILINGS:
        raise ConfigError(f"unknown --vae-tiling {opts.vae_tiling!r}; choose {', '.join(VAE_TILINGS)}")
    tile = opts.vae_tile
    if tile is None:
        from ..weights.shapes import model_shapes

        return model_shapes(opts.model).vae_tile
    if not (MIN_SIDE <= tile <= MAX_SIDE and tile % VAE_TILE_MULTIPLE == 0):
        raise ConfigError(
            f"--vae-tile takes a multiple of {VAE_TILE_MULTIPLE} px, {MIN_SIDE}-{MAX_SIDE}; got {tile}"
        )
    return tile


def model_family(model: str) -> str:
    """The family (models/) of --model: a registry base's, a folder's by its transformer, else FLUX.1's."""
    from ..weights.shapes import model_family as family

    return family(model)


def text_length(opts: GenerateOptions) -> int:
    """T5 tokens of the prompt: --max-sequence-length, else the model's own (its config says which)."""
    if opts.max_sequence_length is not None:
        return opts.max_sequence_length
    from ..weights.shapes import model_shapes

    return model_shapes(opts.model).text_len


def image_seeds(seeds: list[int] | None, count: int) -> list[int]:
    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if count > MAX_COUNT:
        raise ConfigError(f"--count {count} is more than {MAX_COUNT} images; run several batches")
    if seeds:
        if count not in (1, len(seeds)):
            raise ConfigError("give either --seed (once per image) or --count, not both")
        bad = [s for s in seeds if not 0 <= s < 2**64]
        if bad:
            raise ConfigError(f"--seed must be in 0 .. 2^64 - 1, got {bad[0]}")
        return list(seeds)
    return [random.randrange(2**32) for _ in range(count)]


# ---------------------------------------------------------------- attention


def clear_choice(
    variant: str | None,
    window: int | None,
    down_factor: int | None,
    weights: str | None = None,
    family: str | None = None,
) -> ClearChoice:
    """--variant, or --window/--down-factor/--clear-weights, into one choice (weights fetched later).
    With neither: the registry's default variant, `chosen` False (full attention at or below 1024 px:
    `at_size`). A local file is checked from its header now (weights.checkpoints), as a checkpoint of
    the model's `family` (default: FLUX.1)."""
    from ..models import DEFAULT
    from ..weights.registry import load_registry

    custom = {"--window": window, "--down-factor": down_factor, "--clear-weights": weights}
    given = [f"{flag} {value}" for flag, value in custom.items() if value is not None]
    if given and variant is not None:
        raise ConfigError(
            f"--variant {variant} and {given[0]} conflict: give a variant or a custom "
            "--window [--down-factor] [--clear-weights], not both"
        )
    family = family or DEFAULT
    if given:
        return _custom_choice(window, down_factor, weights, given[0], family)
    if variant == "none":
        return ClearChoice("none", None)
    if variant and Path(variant).expanduser().is_file():
        return _file_choice(Path(variant).expanduser(), family)
    registry = load_registry()
    found = registry.variant(variant or registry.default_variant)
    return ClearChoice(found.name, found.window, found.down_factor, chosen=variant is not None)


def _custom_choice(window, down_factor, weights: str | None, first: str, family: str) -> ClearChoice:
    """--window R [--down-factor F] [--clear-weights FILE]: a FILE's spatial weights must be F's."""
    from ..weights.checkpoints import check_checkpoint_file

    if window is None:
        raise ConfigError(f"{first} needs --window (and --down-factor if the weights are down-sampled)")
    check_window(window, down_factor, flags=True)
    if weights is None:
        return ClearChoice("custom", window, down_factor or 1)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"--clear-weights {path}: no such file")
    file = check_checkpoint_file(path, f"--clear-weights {path}", family)
    if file.down_factor != (down_factor or 1):
        raise ConfigError(
            f"--clear-weights {path} is down-sampled (f = {file.down_factor}): "
            f"give --down-factor {file.down_factor}"
        )
    return ClearChoice("custom", window, file.down_factor, file.path, sha256=file.sha256)


def _file_choice(path: Path, family: str) -> ClearChoice:
    """--variant FILE: a published file name says its variant; else the window its metadata records
    (clear-gen distill writes it) makes it a custom choice."""
    from ..weights.checkpoints import check_checkpoint_file
    from ..weights.registry import load_registry

    file = check_checkpoint_file(path, f"--variant {path}", family)
    known = {v.filename: v for v in load_registry().variants.values()}
    if path.name in known:
        v = known[path.name]
        return ClearChoice(v.name, v.window, v.down_factor, file.path, sha256=file.sha256)
    if file.window is None:
        raise ConfigError(
            f"--variant {path}: not a published CLEAR file name, and it records no window; "
            f"use --window R{'' if file.down_factor == 1 else f' --down-factor {file.down_factor}'} "
            f"--clear-weights {path}"
        )
    return ClearChoice("custom", file.window, file.down_factor, file.path, sha256=file.sha256)


def check_family(choice: ClearChoice, family: str, model: str, default_too: bool = True) -> None:
    """A registry variant runs on its base's family only: a chosen one for another family, or the default
    one (`default_too`) when the model's family has no published weights, is one line naming both."""
    from .. import models
    from ..weights.registry import load_registry

    if choice.hub_variant is None or (not choice.chosen and not default_too):
        return
    registry = load_registry()
    variant = registry.variant(choice.hub_variant)
    made_for = registry.base(variant.base).family
    if made_for == family:
        return
    theirs, ours = models.family(made_for).LABEL, models.family(family).LABEL
    if not choice.chosen:
        raise ConfigError(
            f"no published CLEAR weights for {ours} ({family}: --model {model}); the default variant "
            f"{variant.name} is {theirs}'s ({made_for}): give --window R [--down-factor F] (training-free) "
            "or --variant none"
        )
    raise ConfigError(
        f"CLEAR variant {variant.name} was made for {theirs} ({made_for}, base {variant.base}) and --model "
        f"{model} is {ours} ({family}): give --window R [--down-factor F] (training-free) for it instead"
    )


def check_model_runs(spec: RunSpec, stages: tuple[Stage, ...], fix: str) -> None:
    """The model's family can run these stages: SDEdit stages need an img2img pipeline (`fix`: what the
    user can do instead)."""
    from .. import models

    family = models.family(spec.weights.family)
    sdedit = [f"{s.width}x{s.height}" for s in stages if s.sdedit]
    if sdedit and not family.SDEDIT:
        raise ConfigError(
            f"{family.LABEL} ({family.NAME}) has no img2img pipeline in diffusers, so the SDEdit stage"
            f"{'s' if len(sdedit) > 1 else ''} {', '.join(sdedit)} cannot run; {fix}"
        )


def note_full_window(choice: ClearChoice, width: int, height: int, note) -> None:
    """Say so when the window covers the whole grid at the target: that is full attention."""
    from ..core.geometry import full_window
    from ..core.sizes import TOKEN_PX

    h, w = height // TOKEN_PX, width // TOKEN_PX
    if choice.window is not None and choice.window >= full_window(h, w):
        note(
            f"--window {choice.window} covers the whole {h} x {w} token grid at {width}x{height}: that is "
            f"full attention (a window of {full_window(h, w)} already is)"
        )


def at_size(choice: ClearChoice, width: int, height: int, the_recipe: Recipe) -> ClearChoice:
    """The attention at this target: the default variant becomes full attention at or below the first
    pass's side, where CLEAR is no faster (and only approximates the original model), and at a short side
    no longer than the first pass's least, which makes the target its own first pass (recipe.py)."""
    if choice.chosen or the_recipe.high_res(width, height):
        return choice
    side, short = the_recipe.first_pass_side, the_recipe.first_pass_short
    why = (
        f"as CLEAR is no faster at or below {side} px"
        if max(width, height) <= side
        else f"in one pass: a short side of {short} px or less is the first pass's own"
    )
    note = f"{width}x{height}: the original weights with full attention, {why} (--variant or --window forces"
    return ClearChoice("none", None, note=f"{note} CLEAR)")


# ---------------------------------------------------------------- stages


def asked_long_sides(stages: list[int] | None, width: int, height: int, the_recipe: Recipe) -> list[int]:
    """--stages checked (in range, growing), else the recipe's."""
    if stages:
        if not all(MIN_SIDE <= side <= MAX_SIDE for side in stages):
            got = ",".join(map(str, stages))
            raise ConfigError(f"each stage's long side must be {MIN_SIDE}-{MAX_SIDE} px, got {got}")
        if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
            raise ConfigError(f"--stages must grow: got {','.join(map(str, stages))}")
        return list(stages)
    return the_recipe.long_sides(width, height)


def generate_stages(spec: RunSpec, choice: ClearChoice) -> tuple[Stage, ...]:
    """The stages of one generated image: a text-to-image first pass, then SDEdit stages."""
    opts, the_recipe = spec.asked, spec.recipe
    sizes = _checked_sizes(opts.width, opts.height, opts.stages, choice, the_recipe, first_pass=True)
    if len(sizes) > 1 and opts.first_size is not None:  # --from: the size the first pass was made at
        sizes[0] = _first_size(opts.first_size)
    if len(sizes) == 1:
        guidance = the_recipe.direct_guidance if opts.guidance is None else opts.guidance
        return (_stage(spec, *sizes[0], choice.window is not None, opts.steps, guidance, False, 1.0),)
    steps = the_recipe.first_steps if opts.first_steps is None else opts.first_steps
    guidance = the_recipe.first_guidance if opts.first_guidance is None else opts.first_guidance
    first = _stage(spec, *sizes[0], False, steps, guidance, False, 1.0)
    return (first, *sdedit_stages(spec, choice, sizes[1:]))


def upscale_stages(spec: RunSpec, choice: ClearChoice, width: int, height: int) -> tuple[Stage, ...]:
    """The stages of an upscale to width x height: every one an SDEdit stage, the first from the given
    picture (which is not a stage); the asked stages list the long sides after it."""
    long_sides = spec.asked.stages or [max(width, height)]
    stages = sdedit_stages(spec, choice, _checked_sizes(width, height, long_sides, choice, spec.recipe))
    check_model_runs(spec, stages, "upscale needs one")
    check_family(choice, spec.weights.family, spec.weights.model)
    check_backend_serves(spec, choice, stages)
    return stages


def check_backend_serves(spec: RunSpec, choice: ClearChoice, stages: tuple[Stage, ...]) -> None:
    """--backend serves every CLEAR stage at its size on the device (dense's mask limit, gather's memory
    budget at the model's heads and dtype, the devices a backend runs on): refused now, not after loading
    and a first pass. A --device that is not here is the run's to refuse (a dry run plans for it all the
    same)."""
    from ..attention.backends import Work, choose
    from ..core.device import resolve_device, resolve_dtype
    from ..weights.shapes import model_shapes

    try:
        device = resolve_device(spec.settings.device)
    except DeviceError:
        return
    if not any(s.clear for s in stages):
        return
    try:
        cfg = model_shapes(spec.weights.model).transformer
        work = Work(
            cfg.num_attention_heads, cfg.attention_head_dim, resolve_dtype(spec.settings.dtype, device)
        )
    except WeightsError:  # no shapes for a model built in memory (bench): its call checks it when it runs
        work = None
    for i, s in enumerate(stages, 1):
        if s.clear:
            try:
                choose(
                    spec.settings.backend,
                    device,
                    choice.geometry(s.width, s.height, spec.text_len, reference=s.reference),
                    work=work,
                )
            except ConfigError as e:
                raise ConfigError(f"stage {i}/{len(stages)} ({s.width}x{s.height}): {e}") from None


def sdedit_stages(spec: RunSpec, choice: ClearChoice, sizes: list[tuple[int, int]]) -> tuple[Stage, ...]:
    """img2img stages, each from the previous image: CLEAR (when chosen) with the recipe's defaults."""
    opts = spec.asked
    guidance = spec.recipe.sdedit_guidance if opts.guidance is None else opts.guidance
    clear = choice.window is not None
    guide = stage_guide(spec, sizes) if clear else ("none", 1)  # CLEAR's SDEdit stages only
    steps, strength = opts.steps, opts.strength
    return tuple(_stage(spec, w, h, clear, steps, guidance, True, strength, guide) for w, h in sizes)


def stage_guide(spec: RunSpec, sizes: list[tuple[int, int]]) -> tuple[str, int]:
    """(kind, level) of the projected-flow guidance of CLEAR SDEdit stages of these sizes (the last is the
    target): --guide, else the recipe's for the target's size; --guide-level, else the recipe's. A
    level-L block is 2^L latent cells a side, 2^(L-1) tokens: every guided stage's grid must divide."""
    opts, the_recipe = spec.asked, spec.recipe
    kind = guide_kind(opts.guide)
    if kind is None:
        kind = the_recipe.guide if the_recipe.guides(*sizes[-1]) else "none"
    level = the_recipe.guide_level if opts.guide_level is None else opts.guide_level
    multiple = TOKEN_PX << (level - 1)
    bad = [f"{w}x{h}" for w, h in sizes if w % multiple or h % multiple]
    if kind != "none" and bad:
        raise ConfigError(
            f"--guide-level {level} averages blocks of {multiple} px: the guided stage {bad[0]} is not a "
            f"multiple of {multiple} px; give a lower --guide-level"
        )
    return kind, level


def _stage(
    spec: RunSpec,
    w: int,
    h: int,
    clear: bool,
    steps: int,
    guidance: float,
    sdedit: bool,
    strength,
    guide: tuple[str, int] = ("none", 1),
):
    """A Stage with the recipe's knobs decided for its size (the asked ones win)."""
    opts, the_recipe = spec.asked, spec.recipe
    high_res = the_recipe.high_res(w, h)
    dype = opts.dype and clear and max(w, h) > dype_base_px()  # at or below it DyPE's RoPE is the original
    ntk = opts.ntk_factor if opts.ntk_factor is not None else (the_recipe.high_res_ntk if high_res else 1.0)
    ntk = 1.0 if dype else ntk  # DyPE sets RoPE's frequencies itself (note_dype)
    asked_prop = opts.proportional_attention
    auto_prop = high_res and the_recipe.proportional_above and not dype  # DyPE's mscale instead (README)
    proportional = asked_prop if asked_prop is not None else auto_prop
    net_clear = clear and max(w, h) > the_recipe.controlnet_clear_above
    vae, tile = the_recipe.vae_tiling(spec.settings.vae_tiling, w, h), spec.settings.vae_tile
    reference = spec.edit.reference if spec.edit is not None else None  # an edit's, in every stage
    return Stage(
        w, h, clear, steps, guidance, sdedit, strength=strength, ntk_factor=ntk, proportional=proportional,
        vae_tiling=vae, vae_tile=tile, controlnet_clear=net_clear, guide=guide[0], guide_level=guide[1],
        reference=reference, dype=dype,
    )  # fmt: skip


def dype_base_px() -> int:
    """The side up to which DyPE changes nothing: the model's training side (FLUX.1: 64 tokens, 1024 px)."""
    from ..core.dype import BASE_SIDE

    return BASE_SIDE * TOKEN_PX


def _checked_sizes(
    width: int,
    height: int,
    long_sides: list[int] | None,
    choice: ClearChoice,
    the_recipe: Recipe,
    first_pass: bool = False,
) -> list[tuple[int, int]]:
    """(w, h) of each stage at these long sides, every number checked: the last is the target. With
    `first_pass` the first of several is a full-attention text-to-image pass: its sides are multiples of
    16 px only (a down factor's multiple would stretch it more when it is resized to the next stage)."""
    long_sides = asked_long_sides(long_sides, width, height, the_recipe)
    multiple = size_multiple(choice.down_factor)
    check_size(width, height, multiple)
    if long_sides[-1] != max(width, height):
        raise ConfigError(
            f"the last stage ({long_sides[-1]} px) must be the target's long side ({max(width, height)} px)"
        )
    multiples = [TOKEN_PX if first_pass and i == 0 else multiple for i in range(len(long_sides) - 1)]
    sizes = [scaled_size(width, height, side, m) for side, m in zip(long_sides[:-1], multiples, strict=True)]
    for (w, h), m in zip(sizes, multiples, strict=True):
        check_size(w, h, m)
    return [*sizes, (width, height)]


def _first_size(text: str) -> tuple[int, int]:
    """A recorded first pass's size, "WxH" (plan.records: what the first pass of a --from image was)."""
    try:
        w, h = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"the record's first pass size {text!r} is not WIDTHxHEIGHT") from None
    check_size(w, h, TOKEN_PX)
    return w, h
