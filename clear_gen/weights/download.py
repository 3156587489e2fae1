"""What a run needs from the Hub, checked before anything loads (`check_run_weights`: cached, or fetchable
now, else one line naming every missing piece and the one command that fetches them), and `clear-gen
download` / `clear-gen weights` (`plan_download`, `download`, `status`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import ConfigError, WeightsError
from .hub import (
    PROBE_TIMEOUT_S,
    Fetched,
    base_for,
    base_target,
    cached_base,
    cached_controlnet,
    cached_file,
    cached_variant,
    check_model_folder,
    controlnet_for,
    controlnet_target,
    download_command,
    fetch_base,
    fetch_controlnet,
    fetch_variant,
    file_target,
    local_model,
    transformer_source,
    variant_target,
    without_transformer_weights,
)
from .hub_errors import Target, is_offline, not_cached_message
from .registry import Base, ControlNet, Registry, Variant, load_registry


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
    what = [base_target(b).what for b in bases] + [controlnet_target(c).what for c in controlnets]
    what += [t.what for t in files]
    if len(variants) == 1:
        what.append(variant_target(variants[0]).what)
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
    files = [file_target(*source)] if isinstance(source, tuple) and cached_file(*source) is None else []
    files += [file_target(repo, name, "LoRA") for repo, name in loras if cached_file(repo, name) is None]
    missing_bases = [b for b in bases if cached_base(b) is None]
    nets = [controlnet] if controlnet is not None and cached_controlnet(controlnet) is None else []
    require_hub([v for v in variants if cached_variant(v) is None], missing_bases, files, nets)


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
