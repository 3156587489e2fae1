"""The weights registry: `weights.toml` loaded into frozen dataclasses.

`[variants.NAME]` are the published CLEAR checkpoints, `[bases.NAME]` the FLUX.1 models they plug into,
`[controlnets.NAME]` the FLUX.1 ControlNets `--controlnet` takes by name.
An unknown name or a malformed file is a `ConfigError` that says what is valid.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGED_REGISTRY = Path(__file__).with_name("weights.toml")

# What a diffusers FluxPipeline needs; used for a base given as a raw repo id.
DIFFUSERS_PATTERNS: tuple[str, ...] = (
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "transformer/*",
    "vae/*",
)


@dataclass(frozen=True)
class Variant:
    """One CLEAR checkpoint on the Hub."""

    name: str  # short name used on the command line, e.g. "r8-down4"
    repo: str  # Hub repo id
    filename: str  # file inside the repo
    revision: str  # branch, tag or commit
    window: int  # r: image keys within distance < r attend
    down_factor: int  # f: 1 = no down-sampled tokens
    base: str  # name of the [bases] entry it was distilled from
    description: str
    sha256: str | None = None  # hex digest, checked after download when set
    size: int | None = None  # bytes, checked (cheaply) before the hash


@dataclass(frozen=True)
class Base:
    """A FLUX.1 model in diffusers layout."""

    name: str
    repo: str
    revision: str
    gated: bool  # the user must accept a licence on the Hub and send a token
    allow_patterns: tuple[str, ...]  # the diffusers folders, not the single-file checkpoint beside them
    description: str
    family: str = "flux1"  # its adapter in models/ (models.FAMILIES)
    edit: bool = False  # it edits a picture given as a reference (FLUX.1 Kontext: `clear-gen edit`)


# What a diffusers FluxControlNetModel folder needs (its config and weights, sharded or not).
CONTROLNET_PATTERNS: tuple[str, ...] = ("config.json", "diffusion_pytorch_model*")


@dataclass(frozen=True)
class ControlNet:
    """A FLUX.1 ControlNet in diffusers layout (FluxControlNetModel) on the Hub."""

    name: str
    repo: str
    revision: str
    base: str  # the [bases] entry it was trained for
    modes: tuple[str, ...]  # a union model's control modes, in the order of their ids; () = one kind
    scale: float  # the conditioning scale its model card recommends (--control-scale's default)
    num_layers: int  # its double-stream blocks, as its config.json says (for the memory plan)
    num_single_layers: int
    gated: bool
    description: str


@dataclass(frozen=True)
class Registry:
    variants: dict[str, Variant]
    bases: dict[str, Base]
    default_variant: str
    controlnets: dict[str, ControlNet] = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise ConfigError(f"unknown variant {name!r}; valid: {', '.join(self.variants)}")
        return self.variants[name]

    def base(self, name: str) -> Base:
        if name not in self.bases:
            raise ConfigError(f"unknown base {name!r}; valid: {', '.join(self.bases)}")
        return self.bases[name]

    def controlnet(self, name: str) -> ControlNet:
        if name not in self.controlnets:
            raise ConfigError(f"unknown ControlNet {name!r}; valid: {', '.join(self.controlnets)}")
        return self.controlnets[name]


def named(entries: dict[str, Any], name_or_repo: str) -> Any:
    """The entry of `entries` (a Registry's bases, variants or controlnets) with this name, else the one
    with this Hub repo; None when neither."""
    if name_or_repo in entries:
        return entries[name_or_repo]
    return next((e for e in entries.values() if e.repo == name_or_repo), None)


# field -> (type, required); bool is checked before int because bool is an int.
_VARIANT_FIELDS: dict[str, tuple[type, bool]] = {
    "repo": (str, True),
    "filename": (str, True),
    "revision": (str, False),
    "window": (int, True),
    "down_factor": (int, True),
    "base": (str, True),
    "description": (str, True),
    "sha256": (str, False),
    "size": (int, False),
}
_BASE_FIELDS: dict[str, tuple[type, bool]] = {
    "repo": (str, True),
    "revision": (str, False),
    "gated": (bool, False),
    "allow_patterns": (list, True),
    "description": (str, True),
    "family": (str, False),
    "edit": (bool, False),
}
_CONTROLNET_FIELDS: dict[str, tuple[type, bool]] = {
    "repo": (str, True),
    "revision": (str, False),
    "base": (str, True),
    "modes": (list, False),
    "scale": (float, False),
    "num_layers": (int, True),
    "num_single_layers": (int, True),
    "gated": (bool, False),
    "description": (str, True),
}


def _fields(table: Any, spec: dict[str, tuple[type, bool]], where: str) -> dict[str, Any]:
    """Check one [kind.NAME] table against `spec`; return its fields. Raises a message (str) on error."""
    if not isinstance(table, dict):
        raise ValueError(f"[{where}] must be a table")
    unknown = sorted(set(table) - set(spec))
    if unknown:
        raise ValueError(f"[{where}] has unknown field(s) {', '.join(unknown)}")
    out = {}
    for key, (typ, required) in spec.items():
        if key not in table:
            if required:
                raise ValueError(f"[{where}] is missing {key!r}")
            continue
        value = table[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # scale = 1
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"[{where}] {key} must be {typ.__name__}, got {type(value).__name__} {value!r}")
        out[key] = value
    return out


def _variant(name: str, table: Any) -> Variant:
    f = _fields(table, _VARIANT_FIELDS, f"variants.{name}")
    if f["window"] < 1 or f["down_factor"] < 1:
        raise ValueError(f"[variants.{name}] window and down_factor must be >= 1")
    sha = f.get("sha256")
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
        raise ValueError(f"[variants.{name}] sha256 must be 64 hex digits")
    return Variant(
        name=name,
        repo=f["repo"],
        filename=f["filename"],
        revision=f.get("revision", "main"),
        window=f["window"],
        down_factor=f["down_factor"],
        base=f["base"],
        description=f["description"],
        sha256=sha.lower() if sha else None,
        size=f.get("size"),
    )


def _base(name: str, table: Any) -> Base:
    f = _fields(table, _BASE_FIELDS, f"bases.{name}")
    patterns = f["allow_patterns"]
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"[bases.{name}] allow_patterns must be a non-empty list of strings")
    return Base(
        name=name,
        repo=f["repo"],
        revision=f.get("revision", "main"),
        gated=f.get("gated", False),
        allow_patterns=tuple(patterns),
        description=f["description"],
        family=_family(name, f.get("family", "flux1")),
        edit=f.get("edit", False),
    )


def _family(name: str, family: str) -> str:
    from ..models import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"[bases.{name}] family {family!r} is not one of: {', '.join(FAMILIES)}")
    return family


def _controlnet(name: str, table: Any) -> ControlNet:
    f = _fields(table, _CONTROLNET_FIELDS, f"controlnets.{name}")
    modes = f.get("modes", [])
    if not all(isinstance(m, str) and m for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"[controlnets.{name}] modes must be distinct names")
    if f["num_layers"] < 0 or f["num_single_layers"] < 0 or not f.get("scale", 1.0) >= 0:
        raise ValueError(f"[controlnets.{name}] num_layers, num_single_layers and scale must be >= 0")
    return ControlNet(
        name=name,
        repo=f["repo"],
        revision=f.get("revision", "main"),
        base=f["base"],
        modes=tuple(modes),
        scale=f.get("scale", 1.0),
        num_layers=f["num_layers"],
        num_single_layers=f["num_single_layers"],
        gated=f.get("gated", False),
        description=f["description"],
    )


def parse_registry(data: dict[str, Any]) -> Registry:
    """Build a Registry from parsed TOML; ValueError says what is wrong."""
    unknown = sorted(set(data) - {"default_variant", "variants", "bases", "controlnets"})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {', '.join(unknown)}")
    variants_t, bases_t = data.get("variants"), data.get("bases")
    if not isinstance(variants_t, dict) or not variants_t or not isinstance(bases_t, dict) or not bases_t:
        raise ValueError("needs at least one [variants.NAME] and one [bases.NAME] table")
    variants = {name: _variant(name, t) for name, t in variants_t.items()}
    bases = {name: _base(name, t) for name, t in bases_t.items()}
    controlnets_t = data.get("controlnets", {})
    if not isinstance(controlnets_t, dict):
        raise ValueError("controlnets must be tables: [controlnets.NAME]")
    controlnets = {name: _controlnet(name, t) for name, t in controlnets_t.items()}
    for item in [*variants.values(), *controlnets.values()]:
        if item.base not in bases:
            kind = "variants" if isinstance(item, Variant) else "controlnets"
            raise ValueError(f"[{kind}.{item.name}] base {item.base!r} is not one of: {', '.join(bases)}")
    default = data.get("default_variant", next(iter(variants)))
    if default not in variants:
        raise ValueError(f"default_variant {default!r} is not one of: {', '.join(variants)}")
    return Registry(variants=variants, bases=bases, default_variant=default, controlnets=controlnets)


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> Registry:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read weights registry {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"weights registry {path} is not valid TOML: {e}") from e
    try:
        return parse_registry(data)
    except ValueError as e:
        raise ConfigError(f"weights registry {path}: {e}") from e


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry in `path` (default: the packaged weights.toml), parsed once per path."""
    return _load(Path(path).resolve() if path is not None else PACKAGED_REGISTRY)
