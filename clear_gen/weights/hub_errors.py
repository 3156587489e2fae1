"""The Hugging Face Hub's failures as one WeightsError each, saying what to do (`hub_error`), and its
silent retries (~25 s of them) as one stderr line each. Every call to the Hub runs inside `hub_errors`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import WeightsError


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
def hub_errors(t: Target) -> Iterator[None]:
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


HUB_URL = "https://huggingface.co"


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
