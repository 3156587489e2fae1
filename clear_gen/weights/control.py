"""ControlNet: `--control IMAGE --controlnet NAME_OR_REPO [--control-mode M] [--control-scale S]`.

A FLUX.1 ControlNet (diffusers' FluxControlNetModel, plain or union) runs in every stage of a run, through
diffusers' FluxControlNetPipeline (the text-to-image first pass) and FluxControlNetImg2ImgPipeline (the
SDEdit stages), with the control picture resized to each stage's size by the pipeline. `upscale` uses the
picture being upscaled as the control picture unless `--control` names another one.

CLEAR and the ControlNet: the transformer puts the ControlNet's residuals in its own tile order
(attention.py), so they are exact with or without CLEAR on either model. The ControlNet's own blocks get
training-free CLEAR (the stage's window, NTK factor and proportional attention, no down-sampled tokens: no
checkpoint was distilled for them) in the CLEAR stages above the recipe's first-pass side (a stage's
`controlnet_clear`): at 8K its full attention alone would cost more than a whole CLEAR step of the
transformer.

The control picture is used as given: an edge map for a canny mode, a depth map for a depth mode, the
photo itself for tile, blur, low-quality or upscaler models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import models
from ..errors import ConfigError, WeightsError
from ..files.source import Source, load_source
from .registry import ControlNet, load_registry, named
from .spec import ControlSpec


def parse_control(
    opts: Any, own_picture: bool = False, note: Callable[[str], None] = lambda text: None
) -> ControlSpec | None:
    """The run's ControlNet from the asked options (plan.spec.GenerateOptions' --control, --controlnet,
    --control-mode, --control-scale and, with --from, the control picture's sha256 then), checked as far as
    the arguments allow, its control picture read (once: its sha256 is what the PNG records and what
    `--from` compares against). `own_picture`: upscale, where the picture being upscaled is the control
    picture unless --control names another."""
    given = {
        "--control": opts.control,
        "--control-mode": opts.control_mode,
        "--control-scale": opts.control_scale,
    }
    if opts.controlnet is None:
        flag = next((flag for flag, value in given.items() if value is not None), None)
        if flag is not None:
            raise ConfigError(
                f"{flag} needs --controlnet NAME_OR_REPO (`clear-gen weights` lists the registry's)"
            )
        return None
    if opts.control is None and not own_picture:
        raise ConfigError(
            f"--controlnet {opts.controlnet} needs --control IMAGE: the picture whose structure to keep"
        )
    image = Path(opts.control).expanduser() if opts.control is not None else None
    if image is not None and not image.is_file():
        raise ConfigError(f"--control {opts.control}: no such file")
    folder = _local_folder(opts.controlnet)
    if folder is not None:
        net = ControlNet(folder.name, str(folder), "", "", (), 1.0, 0, 0, False, "")
    else:
        from .hub import controlnet_for

        net = controlnet_for(opts.controlnet)
    mode = _mode(net, opts.control_mode)
    scale = net.scale if opts.control_scale is None else opts.control_scale
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"--control-scale must be a number >= 0, got {opts.control_scale}")
    picture = read_control_image(image, note) if image is not None else None
    if picture is not None:
        check_unchanged(picture, opts.control_sha256, note)
    return ControlSpec(net, folder, image, mode, opts.control_mode, scale, picture)


def _local_folder(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if spec.startswith((".", "/", "~")):
        raise ConfigError(f"--controlnet {spec}: no such folder")
    return None


def _mode(net: ControlNet, given: str | None) -> int | None:
    """A mode name (a registry union model's) or id into its id; a union model needs one, others take none."""
    if net.modes:
        if given is None:
            raise ConfigError(
                f"ControlNet {net.name} is a union model: give --control-mode, one of {', '.join(net.modes)}"
            )
        if given in net.modes:
            return net.modes.index(given)
        if given.isdigit() and int(given) < len(net.modes):
            return int(given)
        raise ConfigError(f"--control-mode {given}: ControlNet {net.name} has {', '.join(net.modes)}")
    if given is None:
        return None
    if net.repo and net.base:  # a registry entry with no modes: not a union model
        raise ConfigError(f"--control-mode {given}: ControlNet {net.name} is not a union model; leave it out")
    if not given.isdigit():
        raise ConfigError(
            f"--control-mode {given}: {net.name} is not in the registry, so give the mode's number "
            "from its model card (e.g. 0)"
        )
    return int(given)  # checked against its config once that is here (check_config)


# ---------------------------------------------------------------- checks before loading


def read_control_image(path: Path, note: Callable[[str], None] = lambda text: None) -> Source:
    """The control picture, read as upscale reads its pictures (RGB: EXIF orientation, 16-bit depth maps
    scaled to 8 bits, alpha flattened, each conversion told to `note`; its sha256), or one ConfigError."""
    try:
        source = load_source(path)
    except ConfigError as e:
        raise ConfigError(f"--control {e}") from e
    for text in source.notes:
        note(f"--control {path.name}: {text}")
    return source


def check_unchanged(picture: Source, sha256: str | None, note: Callable[[str], None]) -> None:
    """--from: say so when the control picture is not the one the image was made with (`sha256`)."""
    if sha256 is not None and picture.sha256 != sha256:
        note(f"--control {picture.path.name} changed since the image was made (sha256 {sha256[:12]}... then, "
             f"{picture.sha256[:12]}... now): the result will differ")  # fmt: skip


def control_record(spec: ControlSpec) -> dict[str, Any]:
    """What the PNG records of the ControlNet: `--from` runs it again, the sha256 says which picture
    (none when upscale's own picture is the control, recorded as the source)."""
    record: dict[str, Any] = {"controlnet": spec.source, "scale": spec.scale}
    if spec.mode_name is not None:
        record["mode"] = spec.mode_name
    picture = spec.picture
    if picture is not None:
        record |= {"image": str(picture.path.resolve()), "sha256": picture.sha256}
    return record


def check_base(spec: ControlSpec, model: str) -> None:
    """A registry ControlNet trained for another registry base than --model's: one error naming both."""
    registry = load_registry()
    base = named(registry.bases, model)
    if spec.net.base and base is not None and base.name != spec.net.base:
        trained = registry.bases[spec.net.base].repo
        raise ConfigError(
            f"ControlNet {spec.net.name} is for {trained}, not {base.repo}: "
            f"use --model {spec.net.base} or a ControlNet made for {base.name}"
        )


def check_config(spec: ControlSpec, config: dict, transformer_config: dict, where: str, family: str) -> None:
    """A ControlNet's config.json against the transformer it feeds: the same hidden size and text inputs
    (the family says which fields), and a mode exactly when it is a union model. One error naming the
    first mismatch."""
    for name in models.family(family).CONTROLNET_CONFIG_FIELDS:
        if name in config and name in transformer_config and config[name] != transformer_config[name]:
            raise WeightsError(
                f"{where} is a ControlNet for another model: its {name} is {config[name]}, this FLUX.1 "
                f"transformer's is {transformer_config[name]}"
            )
    num_mode = config.get("num_mode")
    if num_mode and spec.mode is None:
        raise ConfigError(
            f"{where} is a union ControlNet ({num_mode} modes): give --control-mode 0-{num_mode - 1}"
        )
    if not num_mode and spec.mode is not None:
        raise ConfigError(f"--control-mode {spec.mode_name}: {where} is not a union ControlNet; leave it out")
    if num_mode and spec.mode >= num_mode:
        raise ConfigError(f"--control-mode {spec.mode_name}: {where} has modes 0-{num_mode - 1}")


def controlnet_folder(spec: ControlSpec, token: str | None = None, cached_only: bool = False) -> Path | None:
    """Where the ControlNet's config and weights are: a local folder, else the Hub cache (fetched first
    unless `cached_only`; None when it is not cached then)."""
    from .hub import cached_controlnet, fetch_controlnet

    if spec.folder is not None:
        if not (spec.folder / "config.json").is_file():
            raise WeightsError(
                f"--controlnet {spec.folder}: not a diffusers ControlNet folder (no config.json); give one "
                "saved by FluxControlNetModel.save_pretrained, a registry name or a Hub repo"
            )
        return spec.folder
    return cached_controlnet(spec.net) if cached_only else fetch_controlnet(spec.net, token)


def check_cached_config(spec: ControlSpec, transformer_config: dict | None, family: str) -> None:
    """check_config before anything loads, when the ControlNet's config is already on disk."""
    folder = controlnet_folder(spec, cached_only=True)
    if folder is None:
        return
    config = json.loads((folder / "config.json").read_text())
    check_config(spec, config, transformer_config or {}, spec.source, family)


# ---------------------------------------------------------------- loading and running


def load_controlnet(spec: ControlSpec, transformer, dtype, token: str | None = None):
    """The ControlNet (FLUX.1's: FluxControlNetModel), its config checked against `transformer`'s first."""
    family = models.of(transformer)
    folder = controlnet_folder(spec, token)
    config = json.loads((folder / "config.json").read_text())
    check_config(spec, config, dict(transformer.config), spec.source, family.NAME)
    try:
        return family.controlnet_class().from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise WeightsError(
            f"ControlNet {spec.source} did not load ({str(e).splitlines()[0][:160]}); download it again"
        ) from e


def controlnet_pipeline(pipe, controlnet):
    """The family's ControlNet pipeline (FluxControlNetPipeline) sharing pipe's modules (and its
    scheduler), with `controlnet`."""
    import inspect

    kind = models.of(pipe.transformer).pipeline_class(controlnet=True)
    wanted = inspect.signature(kind.__init__).parameters
    parts = {k: v for k, v in pipe.components.items() if k in wanted and k != "controlnet"}
    return kind(controlnet=controlnet, **parts)
