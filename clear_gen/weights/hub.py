"""Weights on disk: registry names (or local paths) -> files in the Hugging Face cache.

Everything goes through huggingface_hub, so the cache is the usual one (`HF_HOME` / `HF_HUB_CACHE`), a
re-run transfers nothing, and `HF_HUB_OFFLINE=1` uses cached files without a single network call.
Every huggingface_hub failure leaves here as one `WeightsError` that says what to do (`hub_error`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, WeightsError
from .hub_errors import Target, hub_errors, is_offline
from .registry import (
    CONTROLNET_PATTERNS,
    DIFFUSERS_PATTERNS,
    Base,
    ControlNet,
    Registry,
    Variant,
    load_registry,
    named,
)

PROBE_TIMEOUT_S = 5.0  # "can we reach the Hub": one request, no retries (huggingface_hub's own take ~25 s)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/repo
HUB_FILE = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)/([\w./-]+)$")  # owner/repo/path/in/repo.gguf


@dataclass(frozen=True)
class Fetched:
    """One row of `clear-gen download` / `clear-gen weights`: what is where, and how big."""

    name: str
    kind: str  # "variant" | "base" | "controlnet"
    source: str  # "repo/filename" for a variant, "repo" for a base or a ControlNet
    path: Path | None  # None: not cached
    size: int  # bytes on disk (0 when not cached)


# ---------------------------------------------------------------------------------------------- errors


# -------------------------------------------------------------------------------------------- checking


def sha256_of(path: Path) -> str:
    """The file's sha256, hashed once per file version (path, size and mtime) in this process."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _evict(path: Path) -> None:
    """Delete a cached file: the snapshot symlink and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def verify_file(path: Path, v: Variant) -> None:
    """Check the size, then the sha256, where weights.toml pins them; a bad file is deleted from the cache."""
    if v.sha256 is None and v.size is None:
        return
    size = path.stat().st_size
    if v.size is not None and size != v.size:
        problem = f"is {size} bytes, weights.toml says {v.size}"
    elif v.sha256 is not None and (digest := sha256_of(path)) != v.sha256:
        problem = f"has sha256 {digest}, weights.toml says {v.sha256}"
    else:
        return
    _evict(path)
    raise WeightsError(
        f"{v.repo}/{v.filename} {problem}; deleted it from the cache. Run `clear-gen download {v.name}` "
        "again; if it keeps failing the file on the Hub changed (update weights.toml)"
    )


# ------------------------------------------------------------------------------------------- resolving


def download_command(
    variants: Sequence[Variant], bases: Sequence[Base], controlnets: Sequence[ControlNet] = ()
) -> str:
    """The one `clear-gen download ...` that fetches these variants, bases and ControlNets (see
    plan_download)."""
    words = ["clear-gen download", *(v.name for v in variants)]
    named = list(dict.fromkeys(b.name for b in bases))
    if variants and not bases:
        words.append("--no-base")
    elif named != list(dict.fromkeys(v.base for v in variants)):  # not the bases the variants imply
        words += [f"--base {name}" for name in named]
    return " ".join(words + [f"--controlnet {c.name}" for c in controlnets])


def variant_target(v: Variant) -> Target:
    return Target(
        what=f"variant {v.name} ({v.repo}/{v.filename})",
        repo=v.repo,
        revision=v.revision,
        gated=False,
        command=download_command([v], []),
    )


def base_target(b: Base) -> Target:
    return Target(
        what=f"base {b.name} ({b.repo})" if b.name != b.repo else f"base {b.repo}",
        repo=b.repo,
        revision=b.revision,
        gated=b.gated,
        command=download_command([], [b]),
    )


def fetch_variant(v: Variant, token: str | None = None) -> Path:
    """The cached file of `v`, downloaded first if needed (cache only when offline), checked if pinned."""
    from huggingface_hub import hf_hub_download

    with hub_errors(variant_target(v)):
        path = hf_hub_download(
            v.repo, v.filename, revision=v.revision, token=token, local_files_only=is_offline()
        )
    verify_file(Path(path), v)
    return Path(path)


def fetch_base(b: Base, token: str | None = None) -> Path:
    """The cached snapshot folder of `b` (its diffusers folders only), downloaded first if needed."""
    return _snapshot(base_target(b), b.allow_patterns, token)


def _snapshot(t: Target, patterns: Sequence[str], token: str | None, cached_only: bool = False) -> Path:
    """The cached snapshot of t.repo's files matching `patterns`, downloaded first if needed (cache only
    when offline or `cached_only`, which raises huggingface_hub's own errors)."""
    from huggingface_hub import snapshot_download

    local = cached_only or is_offline()
    with contextlib.nullcontext() if cached_only else hub_errors(t):
        path = snapshot_download(
            t.repo, revision=t.revision, allow_patterns=list(patterns), token=token, local_files_only=local
        )
    return Path(path)


def _cached_snapshot(t: Target, patterns: Sequence[str]) -> Path | None:
    """The cached snapshot of t.repo's `patterns`, without any network call (None if absent, known to be
    partial, or empty)."""
    try:
        path = _snapshot(t, patterns, None, cached_only=True)
    except Exception:  # not cached, partial, unreadable: all mean "download it"
        return None
    return path if any(path.iterdir()) else None


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or os.sep in s or s.endswith((".safetensors", ".bin", ".pt"))


def resolve_variant_file(
    variant_or_path: str, token: str | None = None, registry: Registry | None = None
) -> Path:
    """A CLEAR checkpoint: an existing local file as is, else a registry variant from the cache or the Hub."""
    path = Path(variant_or_path).expanduser()
    if path.is_file():
        return path
    registry = registry or load_registry()
    if variant_or_path not in registry.variants and _looks_like_path(variant_or_path):
        raise WeightsError(f"no such file: {path} (nor a variant: {', '.join(registry.variants)})")
    return fetch_variant(registry.variant(variant_or_path), token)


def base_for(name_or_repo: str, registry: Registry | None = None) -> Base:
    """A registry base by name, or an ad-hoc one for a raw Hub repo id (diffusers folders, revision main)."""
    registry = registry or load_registry()
    found = named(registry.bases, name_or_repo)
    if found is not None:
        return found
    if REPO_ID.match(name_or_repo):
        return Base(name_or_repo, name_or_repo, "main", False, DIFFUSERS_PATTERNS, "")
    raise WeightsError(
        f"{name_or_repo!r} is not a local folder, a base ({', '.join(registry.bases)}) nor a Hub repo id"
    )


def local_model(model: str) -> Path | None:
    """The folder `model` names when it is a local path (it exists, or it is written like one), else None."""
    path = Path(model).expanduser()
    written_like_a_path = model.startswith((".", "/", "~")) or (os.sep in model and not REPO_ID.match(model))
    return path if path.exists() or written_like_a_path else None


CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json")  # one per component folder


def check_model_folder(path: Path) -> None:
    """A local --model must be a diffusers FLUX.1 folder (FluxPipeline.save_pretrained writes one): its
    model_index.json, and a config in the folder of every component it names (weights are the loader's to
    check: a GGUF --transformer runs without the transformer's)."""
    import json

    if not path.exists():
        problem = "no such folder"
    elif not (path / "model_index.json").is_file():
        problem = "not a diffusers FLUX.1 folder (no model_index.json)"
    else:
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"--model {path}: model_index.json cannot be read ({e})") from None
        named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
        missing = [k for k in named if not any((path / k / f).is_file() for f in CONFIG_FILES)]
        if not missing:
            return
        raise WeightsError(
            f"--model {path}: an incomplete diffusers FLUX.1 folder ({', '.join(missing)} missing); save it "
            "again with FluxPipeline.save_pretrained, or fetch a base with `clear-gen download --base dev`"
        )
    raise WeightsError(
        f"--model {path}: {problem}; give a folder saved by FluxPipeline.save_pretrained, "
        f"a base name ({', '.join(load_registry().bases)}) or a Hub repo id"
    )


def resolve_base(
    name_or_repo_or_dir: str,
    token: str | None = None,
    registry: Registry | None = None,
    transformer_weights: bool = True,
) -> Path:
    """A FLUX.1 model folder: an existing local directory as is, else a base name or repo id via the cache
    (without the transformer's weights when `transformer_weights` is False: a GGUF --transformer)."""
    path = Path(name_or_repo_or_dir).expanduser()
    if path.is_dir():
        return path
    base = base_for(name_or_repo_or_dir, registry)
    return fetch_base(base if transformer_weights else without_transformer_weights(base), token)


# ------------------------------------------------------------------------------------- what a run needs


# ------------------------------------------------------------------------------ a --transformer file


def without_transformer_weights(b: Base) -> Base:
    """`b` without its transformer's weights (its config.json stays): what a run with --transformer needs."""
    patterns = tuple(p for p in b.allow_patterns if p != "transformer/*")
    return replace(b, allow_patterns=(*patterns, "transformer/config.json"))


def transformer_source(spec: str) -> Path | tuple[str, str]:
    """--transformer: an existing local file, or (repo, filename) for `owner/repo/file.gguf` on the Hub."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    match = HUB_FILE.match(spec)
    if match is None or spec.startswith((".", "/", "~")) or path.parent.is_dir():
        raise WeightsError(f"--transformer {spec}: no such file (nor a Hub owner/repo/file.gguf)")
    return match.group(1), match.group(2)


def file_target(repo: str, filename: str, kind: str = "transformer") -> Target:
    return Target(f"{kind} {repo}/{filename}", repo, "main", False, f"hf download {repo} {filename}")


def hub_file(repo: str, filename: str, kind: str, token: str | None = None) -> Path:
    """One file of a Hub repo (`kind`: what it is, for errors) from the cache or the Hub (cache only when
    offline)."""
    from huggingface_hub import hf_hub_download

    with hub_errors(file_target(repo, filename, kind)):
        return Path(hf_hub_download(repo, filename, token=token, local_files_only=is_offline()))


def cached_file(repo: str, filename: str) -> Path | None:
    """A Hub file's cached copy, without any network call."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def resolve_transformer_file(spec: str, token: str | None = None) -> Path:
    """A --transformer file: a local file as is, else a Hub file from the cache or the Hub (cache only when
    offline)."""
    from huggingface_hub import hf_hub_download

    source = transformer_source(spec)
    if isinstance(source, Path):
        return source
    with hub_errors(file_target(*source)):
        return Path(hf_hub_download(*source, token=token, local_files_only=is_offline()))


# ---------------------------------------------------------------------------------------- ControlNets


def controlnet_for(name_or_repo: str, registry: Registry | None = None) -> ControlNet:
    """A registry ControlNet by name or repo, or an ad-hoc one for a raw Hub repo id (modes unknown: its
    config says whether it is a union model; layers 0: unknown until its config is here)."""
    registry = registry or load_registry()
    found = named(registry.controlnets, name_or_repo)
    if found is not None:
        return found
    if REPO_ID.match(name_or_repo):
        return ControlNet(name_or_repo, name_or_repo, "main", "", (), 1.0, 0, 0, False, "")
    raise ConfigError(
        f"--controlnet {name_or_repo}: not a local folder, a registry ControlNet "
        f"({', '.join(registry.controlnets)}) nor a Hub owner/repo"
    )


def controlnet_target(c: ControlNet) -> Target:
    named = c.name != c.repo
    return Target(
        what=f"ControlNet {c.name} ({c.repo})" if named else f"ControlNet {c.repo}",
        repo=c.repo,
        revision=c.revision,
        gated=c.gated,
        command=f"clear-gen download --controlnet {c.name}",
    )


def fetch_controlnet(c: ControlNet, token: str | None = None) -> Path:
    """The cached folder of a ControlNet (config and weights), downloaded first if needed."""
    return _snapshot(controlnet_target(c), CONTROLNET_PATTERNS, token)


def cached_controlnet(c: ControlNet) -> Path | None:
    """The cached folder of a ControlNet, without any network call (None if absent or without weights)."""
    found = _cached_snapshot(controlnet_target(c), CONTROLNET_PATTERNS)
    if found is None or not (found / "config.json").is_file() or not any(found.glob("*.safetensors")):
        return None
    return found


# ------------------------------------------------------------------------------------ download / status


def cached_variant(v: Variant) -> Path | None:
    """The cached file of `v`, without any network call."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(v.repo, v.filename, revision=v.revision)
    return Path(found) if isinstance(found, str) else None


def cached_base(b: Base) -> Path | None:
    """The cached snapshot of `b`, without any network call (None if absent or known to be partial)."""
    return _cached_snapshot(base_target(b), b.allow_patterns)
