"""Weights on disk: registry names (or local paths) -> files in the Hugging Face cache.

Everything goes through huggingface_hub, so the cache is the usual one (`HF_HOME` / `HF_HUB_CACHE`), a
re-run transfers nothing, and `HF_HUB_OFFLINE=1` uses cached files without a single network call.
Every huggingface_hub failure leaves here as one `WeightsError` that says what to do (`hub_error`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, WeightsError
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

HUB_URL = "https://huggingface.co"
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


@dataclass(frozen=True)
class Target:
    """What a Hub call was fetching, for error messages."""

    what: str  # "variant r8-down4 (Huage001/CLEAR/clear_local_8_down_4.safetensors)"
    repo: str
    revision: str
    gated: bool
    command: str  # the `clear-gen download ...` that fetches it


def is_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once at import; we also honour a later setenv)."""
    from huggingface_hub import constants

    late = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or late


# ---------------------------------------------------------------------------------------------- errors


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of whichever HTTP client this huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    clients = (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"))
    for module, name in clients:
        with contextlib.suppress(ImportError):
            found.append(getattr(__import__(module), name))
    return tuple(found)


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _access_message(t: Target) -> str:
    how = (
        f"accept its licence at {HUB_URL}/{t.repo} and log in (`hf auth login`) or set HF_TOKEN "
        "(or pass --token)"
    )
    if t.gated:
        return f"{t.repo} is gated: {how}"
    return f"{t.repo} refused access (gated or private?): {how}"


def hub_error(e: BaseException, t: Target) -> WeightsError | None:
    """Translate a huggingface_hub failure while fetching `t` into a WeightsError; None if it is not one."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub wraps some HTTP refusals (a plain 403) in "not found locally": use the refusal.
    e = next((c for c in _causes(e) if isinstance(c, HfHubHTTPError)), e)
    status = getattr(getattr(e, "response", None), "status_code", None)
    missing = not_cached_message([t.what], t.command, None if is_offline() else "")
    if isinstance(e, GatedRepoError) or (isinstance(e, HfHubHTTPError) and status in (401, 403)):
        return WeightsError(_access_message(t))
    if isinstance(e, RevisionNotFoundError):
        return WeightsError(f"{t.repo} has no revision {t.revision!r} (check weights.toml)")
    if isinstance(e, RepositoryNotFoundError):
        return WeightsError(f"{t.repo} is not on the Hub (check the name; a private repo needs a token)")
    if isinstance(e, (LocalEntryNotFoundError, *_transport_errors())):
        return WeightsError(missing)
    if isinstance(e, EntryNotFoundError):
        hint = "check weights.toml" if t.command.startswith("clear-gen") else "check the file name"
        return WeightsError(f"{t.what}: the file is not in {t.repo} at {t.revision!r} ({hint})")
    if isinstance(e, HfHubHTTPError):
        return WeightsError(f"the Hub answered HTTP {status} for {t.what}; try `{t.command}` again later")
    if isinstance(e, OSError):
        return WeightsError(f"fetching {t.what} failed ({e}); run `{t.command}` again")
    return None


def not_cached_message(what: Sequence[str], command: str, unreachable: str | None) -> str:
    """'not in the cache (...): X and Y; <why not fetched>: <the one command>'. unreachable: None when
    HF_HUB_OFFLINE is set, else why the Hub cannot be reached ("" when unknown)."""
    from huggingface_hub import constants

    items = f"not in the cache ({constants.HF_HUB_CACHE}): {' and '.join(what)}"
    if unreachable is None:
        return f"{items}; HF_HUB_OFFLINE=1 is set: unset HF_HUB_OFFLINE and run `{command}`"
    why = f" ({unreachable})" if unreachable else ""
    return f"{items}; the Hub ({constants.ENDPOINT}) is unreachable{why}: run `{command}` once online"


@contextlib.contextmanager
def _hub_errors(t: Target) -> Iterator[None]:
    try:
        with _retry_notes():
            yield
    except Exception as e:
        translated = hub_error(e, t)
        if translated is None:
            raise
        raise translated from e


class _RetryNotes(logging.Handler):
    """huggingface_hub's retry loop (5 retries over ~25 s, logged at WARNING, which the CLI silences) as one
    stderr line per retry; its other records go on to huggingface_hub's own handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.last_error = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " thrown while requesting " in message:  # "'<error>' thrown ..." or "HTTP Error 503 thrown ..."
            self.last_error = message.split(" thrown while requesting ")[0].strip("'")
        if message.startswith(("Retrying in", "Rate limited")):
            state = "busy" if self.last_error.startswith("HTTP Error") else "unreachable"
            why = f" ({self.last_error})" if self.last_error else ""
            sys.stderr.write(f"Hub {state}{why}, {message[0].lower()}{message[1:].rstrip('.')}...\n")
        elif record.levelno >= logging.getLogger("huggingface_hub").getEffectiveLevel():
            logging.getLogger("huggingface_hub").handle(record)


@contextlib.contextmanager
def _retry_notes() -> Iterator[None]:
    logger = logging.getLogger("huggingface_hub.utils._http")
    saved = logger.level, logger.propagate
    handler = _RetryNotes()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# -------------------------------------------------------------------------------------------- checking


def _sha256(path: Path) -> str:
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
    elif v.sha256 is not None and (digest := _sha256(path)) != v.sha256:
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


def _variant_target(v: Variant) -> Target:
    return Target(
        what=f"variant {v.name} ({v.repo}/{v.filename})",
        repo=v.repo,
        revision=v.revision,
        gated=False,
        command=download_command([v], []),
    )


def _base_target(b: Base) -> Target:
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

    with _hub_errors(_variant_target(v)):
        path = hf_hub_download(
            v.repo, v.filename, revision=v.revision, token=token, local_files_only=is_offline()
        )
    verify_file(Path(path), v)
    return Path(path)


def fetch_base(b: Base, token: str | None = None) -> Path:
    """The cached snapshot folder of `b` (its diffusers folders only), downloaded first if needed."""
    return _snapshot(_base_target(b), b.allow_patterns, token)


def _snapshot(t: Target, patterns: Sequence[str], token: str | None, cached_only: bool = False) -> Path:
    """The cached snapshot of t.repo's files matching `patterns`, downloaded first if needed (cache only
    when offline or `cached_only`, which raises huggingface_hub's own errors)."""
    from huggingface_hub import snapshot_download

    local = cached_only or is_offline()
    with contextlib.nullcontext() if cached_only else _hub_errors(t):
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


def check_model_folder(path: Path) -> None:
    """A local --model must be a diffusers FLUX.1 folder (FluxPipeline.save_pretrained writes one)."""
    if not path.exists():
        problem = "no such folder"
    elif not (path / "model_index.json").is_file():
        problem = "not a diffusers FLUX.1 folder (no model_index.json)"
    else:
        return
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


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached now, from one request with a short timeout and no retries; None if it
    answers at all (any HTTP status)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # refused, timed out, DNS, TLS, proxy, a malformed HF_ENDPOINT: all say "no"
        return (str(e) or type(e).__name__)[:120]
    return None


def require_hub(
    variants: Sequence[Variant],
    bases: Sequence[Base],
    files: Sequence[Target] = (),
    controlnets: Sequence[ControlNet] = (),
) -> None:
    """Fail fast, in one line naming all of them and one command, when these pieces (not in the cache) cannot
    be fetched now: HF_HUB_OFFLINE is set, or the Hub does not answer. `files`: single Hub files (a GGUF
    --transformer), fetched with `hf download`."""
    if not variants and not bases and not files and not controlnets:
        return
    what = [_base_target(b).what for b in bases] + [_controlnet_target(c).what for c in controlnets]
    what += [t.what for t in files]
    if len(variants) == 1:
        what.append(_variant_target(variants[0]).what)
    elif variants:
        repos = ", ".join(sorted({v.repo for v in variants}))
        what.append(f"variants {', '.join(v.name for v in variants)} ({repos})")
    offline = is_offline()
    why = None if offline else hub_unreachable()
    if offline or why is not None:
        ours = variants or bases or controlnets
        commands = [download_command(variants, bases, controlnets)] if ours else []
        raise WeightsError(not_cached_message(what, " && ".join(commands + [t.command for t in files]), why))


def check_run_weights(
    model: str,
    variant: str | None,
    registry: Registry | None = None,
    transformer: str | None = None,
    loras: Sequence[tuple[str, str]] = (),
    controlnet: ControlNet | None = None,
) -> None:
    """Before a run loads anything: its base (`model`: a local folder, checked here, or a base name or
    repo id), its CLEAR variant (a registry name; None for full attention or a local file) and its
    --transformer file (local, or a Hub file; the base's own transformer weights are then not needed) and its
    LoRAs from the Hub (`loras`: (repo, file)) and its `controlnet` from the Hub are cached, or can be
    fetched now. Else one WeightsError naming every missing piece and one command."""
    registry = registry or load_registry()
    local = local_model(model)
    if local is not None:
        check_model_folder(local)
    bases = [] if local is not None else [base_for(model, registry)]
    if transformer is not None:
        bases = [without_transformer_weights(b) for b in bases]
    variants = [registry.variant(variant)] if variant is not None else []
    source = transformer_source(transformer) if transformer is not None else None
    files = [_file_target(*source)] if isinstance(source, tuple) and cached_file(*source) is None else []
    files += [_file_target(repo, name, "LoRA") for repo, name in loras if cached_file(repo, name) is None]
    missing_bases = [b for b in bases if cached_base(b) is None]
    nets = [controlnet] if controlnet is not None and cached_controlnet(controlnet) is None else []
    require_hub([v for v in variants if cached_variant(v) is None], missing_bases, files, nets)


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


def _file_target(repo: str, filename: str, kind: str = "transformer") -> Target:
    return Target(f"{kind} {repo}/{filename}", repo, "main", False, f"hf download {repo} {filename}")


def hub_file(repo: str, filename: str, kind: str, token: str | None = None) -> Path:
    """One file of a Hub repo (`kind`: what it is, for errors) from the cache or the Hub (cache only when
    offline)."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(_file_target(repo, filename, kind)):
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
    with _hub_errors(_file_target(*source)):
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


def _controlnet_target(c: ControlNet) -> Target:
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
    return _snapshot(_controlnet_target(c), CONTROLNET_PATTERNS, token)


def cached_controlnet(c: ControlNet) -> Path | None:
    """The cached folder of a ControlNet, without any network call (None if absent or without weights)."""
    found = _cached_snapshot(_controlnet_target(c), CONTROLNET_PATTERNS)
    if found is None or not (found / "config.json").is_file() or not any(found.glob("*.safetensors")):
        return None
    return found


# ------------------------------------------------------------------------------------ download / status


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file below a folder (following the cache's symlinks)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own tqdm bars (per file, on stderr; HF_HUB_DISABLE_PROGRESS_BARS wins), or none."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    switch_off = not enabled and not are_progress_bars_disabled()
    if switch_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if switch_off:
            enable_progress_bars()


def plan_download(
    variants: Sequence[str],
    all_variants: bool,
    base: str | None,
    no_base: bool,
    registry: Registry,
    controlnets: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """(variants, bases) for `clear-gen download`: no variant named -> the default one, unless only --base
    or --controlnet is; the bases default to those the variants were distilled from."""
    if base and no_base:
        raise ConfigError("--base and --no-base contradict each other; pick one")
    for name in controlnets:
        controlnet_for(name, registry)  # unknown name -> ConfigError listing the valid ones
    if all_variants:
        names = list(registry.variants)
    elif variants:
        names = list(dict.fromkeys(variants))
    else:
        names = [] if base or controlnets else [registry.default_variant]
    chosen = [registry.variant(n) for n in names]  # unknown name -> ConfigError listing the valid ones
    if no_base:
        return names, []
    return names, [base] if base else list(dict.fromkeys(v.base for v in chosen))


def download(
    variants: Sequence[str],
    base: str | Sequence[str] | None,
    token: str | None = None,
    progress: bool = True,
    controlnets: Sequence[str] = (),
) -> list[Fetched]:
    """Fetch `variants` (registry names), `base` (names or repo ids) and `controlnets` (names or repo ids)
    into the cache; one row per item."""
    registry = load_registry()
    chosen = [registry.variant(name) for name in variants]
    bases = [base_for(name, registry) for name in ([base] if isinstance(base, str) else list(base or []))]
    nets = [controlnet_for(name, registry) for name in dict.fromkeys(controlnets)]
    # 1. What is missing must be fetchable now: one line naming all of it, not one error per piece.
    missing_bases = [b for b in bases if cached_base(b) is None]
    missing_nets = [c for c in nets if cached_controlnet(c) is None]
    require_hub([v for v in chosen if cached_variant(v) is None], missing_bases, controlnets=missing_nets)
    rows = []
    with _progress_bars(progress):
        for v in chosen:  # 2. the CLEAR checkpoints (small, never gated)
            path = fetch_variant(v, token)
            rows.append(Fetched(v.name, "variant", f"{v.repo}/{v.filename}", path, disk_size(path)))
        for b in bases:  # 3. the FLUX.1 bases (tens of GB, dev is gated)
            path = fetch_base(b, token)
            rows.append(Fetched(b.name, "base", b.repo, path, disk_size(path)))
        for c in nets:  # 4. ControlNets (a few GB each)
            path = fetch_controlnet(c, token)
            rows.append(Fetched(c.name, "controlnet", c.repo, path, disk_size(path)))
    return rows


def cached_variant(v: Variant) -> Path | None:
    """The cached file of `v`, without any network call."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(v.repo, v.filename, revision=v.revision)
    return Path(found) if isinstance(found, str) else None


def cached_base(b: Base) -> Path | None:
    """The cached snapshot of `b`, without any network call (None if absent or known to be partial)."""
    return _cached_snapshot(_base_target(b), b.allow_patterns)


def status(registry: Registry | None = None) -> list[Fetched]:
    """Every registry entry with what is already cached (path None and size 0 when not)."""
    registry = registry or load_registry()
    rows = []
    for v in registry.variants.values():
        path = cached_variant(v)
        size = disk_size(path) if path else 0
        rows.append(Fetched(v.name, "variant", f"{v.repo}/{v.filename}", path, size))
    for b in registry.bases.values():
        path = cached_base(b)
        rows.append(Fetched(b.name, "base", b.repo, path, disk_size(path) if path else 0))
    for c in registry.controlnets.values():
        path = cached_controlnet(c)
        rows.append(Fetched(c.name, "controlnet", c.repo, path, disk_size(path) if path else 0))
    return rows
