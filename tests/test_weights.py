"""weights.toml, the Hub resolver and `clear-gen download` / `clear-gen weights`, without internet.

A real HTTP server on 127.0.0.1 plays the Hub (`/{repo}/resolve/{rev}/{file}` with HEAD, GET and byte ranges,
plus the two JSON endpoints snapshot_download uses); HF_ENDPOINT points at it, HF_HOME at a temp folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clear_gen.errors import ConfigError, WeightsError
from clear_gen.weights import download, hub, hub_errors
from clear_gen.weights.registry import PACKAGED_REGISTRY, Variant, load_registry

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLEAR_REPO = "Huage001/CLEAR"
DEV_REPO = "black-forest-labs/FLUX.1-dev"
DEFAULT_FILE = "clear_local_8_down_4.safetensors"
NOWHERE = "http://127.0.0.1:9"  # discard port: refused at once, never a real host


# ------------------------------------------------------------------------------------------ fake Hub


@dataclass
class FakeHub:
    """Files under root/{org}/{name}/{path}; knobs and counters for the tests."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    body_bytes: int = 0  # file bytes sent by GET /resolve
    drop_after: dict[str, int] = field(
        default_factory=dict
    )  # filename -> bytes sent before the first GET dies
    deny: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # repo -> (status, X-Error-Code)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: str, filename: str, data: bytes) -> bytes:
        path = self.root / repo / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def files(self, repo: str) -> list[str]:
        base = self.root / repo
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def gets(self) -> list[str]:
        return [p for m, p, _ in self.requests if m == "GET" and "/resolve/" in p]


def _handler(state: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), "X-Repo-Commit": COMMIT, **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?")[0]
            with state.lock:
                state.requests.append((self.command, path, self.headers.get("Range", "")))
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/") :])
            parts = path.lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._reply(404, {"X-Error-Code": "RepoNotFound"})
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            if self._refused(repo):
                return
            file = state.root / repo / filename
            if not file.is_file():
                return self._reply(404, {"X-Error-Code": "EntryNotFound"})
            self._file(file, body)

        def _refused(self, repo: str) -> bool:
            if repo in state.deny:
                status, code = state.deny[repo]
                self._reply(status, {"X-Error-Code": code} if code else {})
                return True
            if not (state.root / repo).is_dir():
                self._reply(404, {"X-Error-Code": "RepoNotFound"})
                return True
            return False

        def _api(self, rest: str) -> None:
            org, name, kind, *_ = rest.split("/") + ["", ""]
            repo = f"{org}/{name}"
            if self._refused(repo):
                return
            if kind == "revision":
                data = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in state.files(repo)]}
            else:  # tree
                data = []
                for f in state.files(repo):
                    blob = (state.root / repo / f).read_bytes()
                    sha = hashlib.sha256(blob).hexdigest()
                    lfs = {"oid": sha, "size": len(blob), "pointerSize": 134}
                    data.append({"type": "file", "oid": sha[:40], "size": len(blob), "path": f, "lfs": lfs})
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(data).encode())

        def _file(self, file: Path, body: bool) -> None:
            data = file.read_bytes()
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            headers = {"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(len(data))}
            headers["Accept-Ranges"] = "bytes"
            start, status = 0, 200
            rng = self.headers.get("Range", "")
            if body and rng.startswith("bytes="):
                start, status = int(rng[len("bytes=") :].split("-")[0]), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            chunk = data[start:]
            self.send_response(status)
            for k, v in {**headers, "X-Repo-Commit": COMMIT, "Content-Length": str(len(chunk))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not body:
                return
            with state.lock:
                cut = state.drop_after.pop(file.name, None)
            sent = chunk if cut is None else chunk[:cut]
            self.wfile.write(sent)
            with state.lock:
                state.body_bytes += len(sent)
            if cut is not None:  # die mid-body: the client sees fewer bytes than Content-Length
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

    return Handler


def _reload_hf() -> None:
    """huggingface_hub reads HF_* env vars at import: re-read them."""
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """Every test: a private HF_HOME, no token, telemetry off, and an endpoint that is never a real host."""
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_ENDPOINT": NOWHERE,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN_PATH",
    ):
        monkeypatch.delenv(k, raising=False)
    _reload_hf()
    yield
    monkeypatch.undo()
    _reload_hf()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    state = FakeHub(root=tmp_path / "served")
    state.root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    _reload_hf()
    yield state
    server.shutdown()
    server.server_close()


def set_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _reload_hf()


def safetensors_bytes(seed: int = 0, n: int = 65536) -> bytes:
    """A small valid safetensors file shaped like a CLEAR checkpoint entry."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    return save({"transformer_blocks.0.attn.to_q.weight": torch.randn(n // 64, 64, generator=g)})


def serve_dev_base(fake_hub: FakeHub) -> None:
    """A tiny FLUX.1-dev in diffusers layout, with the single-file checkpoints beside it."""
    diffusers = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "tokenizer/vocab.json",
    ]
    for f in diffusers:
        fake_hub.add(DEV_REPO, f, f"content of {f}".encode())
    fake_hub.add(DEV_REPO, "flux1-dev.safetensors", b"x" * 4096)
    fake_hub.add(DEV_REPO, "ae.safetensors", b"y" * 1024)
    fake_hub.add(DEV_REPO, "README.md", b"licence")


def variant(**overrides) -> Variant:
    v = load_registry().variant("r8-down4")
    return replace(v, **overrides)


def in_cache(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file() or p.is_symlink()]


# ------------------------------------------------------------------------------------------- registry


def test_registry_holds_the_published_weights():
    reg = load_registry()
    published = {  # CLEAR_FACTS.md: file, window r, down factor f
        "r32": ("clear_local_32.safetensors", 32, 1),
        "r16": ("clear_local_16.safetensors", 16, 1),
        "r8": ("clear_local_8.safetensors", 8, 1),
        "r16-down4": ("clear_local_16_down_4.safetensors", 16, 4),
        "r8-down4": ("clear_local_8_down_4.safetensors", 8, 4),
    }
    assert {n: (v.filename, v.window, v.down_factor) for n, v in reg.variants.items()} == published
    assert all(
        v.repo == CLEAR_REPO and v.base == "dev" and v.revision == "main" for v in reg.variants.values()
    )
    assert reg.default_variant == "r8-down4"
    assert reg.base("dev").repo == DEV_REPO and reg.base("dev").gated
    assert reg.base("schnell").repo == "black-forest-labs/FLUX.1-schnell"
    for b in reg.bases.values():

        def wanted(f: str, b=b) -> bool:
            return any(fnmatch.fnmatch(f, p) for p in b.allow_patterns)

        assert wanted("transformer/diffusion_pytorch_model-00001-of-00003.safetensors")
        assert wanted("model_index.json") and wanted("text_encoder/model-00001-of-00002.safetensors")
        assert wanted("text_encoder_2/model.safetensors") == (b.family == "flux1")  # FLUX.2: one encoder
        assert not any(
            wanted(f) for f in ("flux1-dev.safetensors", "ae.safetensors", "flux-2-klein-4b.safetensors")
        )
    assert reg.base("krea").repo == "black-forest-labs/FLUX.1-Krea-dev" and reg.base("krea").gated
    assert (reg.base("krea").family, reg.base("klein").family) == ("flux1", "flux2")
    assert reg.base("klein").repo == "black-forest-labs/FLUX.2-klein-4B"


def test_registry_entries_are_frozen():
    with pytest.raises(AttributeError):
        load_registry().variant("r8").window = 16


@pytest.mark.parametrize("kind", ["variant", "base"])
def test_unknown_name_lists_the_valid_ones(kind):
    reg = load_registry()
    with pytest.raises(ConfigError) as e:
        getattr(reg, kind)("r9")
    for name in reg.variants if kind == "variant" else reg.bases:
        assert name in str(e.value)


_GOOD = PACKAGED_REGISTRY.read_text()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_GOOD + "\n[variants.broken\n", "not valid TOML"),
        (_GOOD.replace('filename = "clear_local_32.safetensors"\n', ""), "missing 'filename'"),
        (_GOOD.replace("window = 16\n", 'window = "16"\n', 1), "window must be int"),
        (_GOOD.replace("gated = true", 'gated = "yes"'), "gated must be bool"),
        (_GOOD.replace('base = "dev"', 'base = "pro"', 1), "'pro' is not one of"),
        (_GOOD.replace('default_variant = "r8-down4"', 'default_variant = "r4"'), "default_variant 'r4'"),
        (
            _GOOD + '\n[variants.x]\nrepo="a/b"\nfilename="f"\nwindow=8\ndown_factor=1\nbase="dev"\n'
            'description="d"\nsha256="abc"\n',
            "sha256 must be 64 hex",
        ),  # fmt: skip
        ("[bases]\n", "at least one"),
    ],
)
def test_malformed_registry_names_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "weights.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_registry(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_plan_download_defaults():
    reg = load_registry()
    assert download.plan_download([], False, None, False, reg) == (["r8-down4"], ["dev"])
    assert download.plan_download(["r8", "r16", "r8"], False, None, True, reg) == (["r8", "r16"], [])
    assert download.plan_download([], False, "schnell", False, reg) == ([], ["schnell"])
    assert download.plan_download([], True, None, False, reg) == (list(reg.variants), ["dev"])
    with pytest.raises(ConfigError, match="r8-down4"):
        download.plan_download(["nope"], False, None, False, reg)
    with pytest.raises(ConfigError, match="contradict"):
        download.plan_download([], False, "dev", True, reg)


# ------------------------------------------------------------------------------------------ resolver


def test_local_paths_pass_through_without_network(tmp_path):
    file = tmp_path / "mine.safetensors"
    file.write_bytes(b"x")
    assert hub.resolve_variant_file(str(file)) == file
    assert hub.resolve_base(str(tmp_path)) == tmp_path
    with pytest.raises(WeightsError, match="no such file"):
        hub.resolve_variant_file(str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match="not a local folder"):
        hub.resolve_base("not a repo")


def test_variant_lands_in_cache_and_loads(tmp_path, fake_hub):
    from safetensors.torch import load_file

    data = fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes())
    path = hub.resolve_variant_file("r8-down4")
    assert path.read_bytes() == data
    assert (tmp_path / "hf" / "hub") in path.parents
    assert list(load_file(path)) == ["transformer_blocks.0.attn.to_q.weight"]
    assert fake_hub.body_bytes == len(data)


def test_second_run_transfers_nothing(fake_hub):
    fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes())
    serve_dev_base(fake_hub)
    first = download.download(["r8-down4"], "dev", progress=False)
    fake_hub.requests.clear()
    fake_hub.body_bytes = 0
    second = download.download(["r8-down4"], "dev", progress=False)
    assert second == first
    assert fake_hub.body_bytes == 0 and fake_hub.gets() == []


def test_base_snapshot_skips_the_single_file_checkpoint(fake_hub):
    serve_dev_base(fake_hub)
    folder = hub.resolve_base("dev")
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "model_index.json" in got and "transformer/diffusion_pytorch_model.safetensors" in got
    assert not {"flux1-dev.safetensors", "ae.safetensors", "README.md"} & set(got)
    assert not [p for p in fake_hub.gets() if p.endswith(("flux1-dev.safetensors", "ae.safetensors"))]
    assert hub.resolve_base(DEV_REPO) == folder  # the repo id resolves like its registry name


GGUF_REPO, GGUF_FILE = "someone/FLUX.1-dev-gguf", "flux1-dev-Q8_0.gguf"


def test_hub_gguf_transformer_is_cached_then_used_offline(fake_hub, monkeypatch):
    data = fake_hub.add(GGUF_REPO, GGUF_FILE, b"GGUF" + bytes(64))
    spec = f"{GGUF_REPO}/{GGUF_FILE}"
    path = hub.resolve_transformer_file(spec)
    assert path.read_bytes() == data and hub.cached_file(GGUF_REPO, GGUF_FILE) == path
    fake_hub.requests.clear()
    set_offline(monkeypatch)
    assert hub.resolve_transformer_file(spec) == path
    assert fake_hub.requests == []
    with pytest.raises(WeightsError, match=r"transformer someone/FLUX.1-dev-gguf/other.gguf; HF_HUB_OFFLINE"):
        hub.resolve_transformer_file(f"{GGUF_REPO}/other.gguf")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _reload_hf()
    with pytest.raises(WeightsError, match=r"other.gguf: the file is not in .* \(check the file name\)$"):
        hub.resolve_transformer_file(f"{GGUF_REPO}/other.gguf")


def test_a_run_with_a_gguf_transformer_needs_no_base_transformer_weights(fake_hub, monkeypatch):
    serve_dev_base(fake_hub)
    fake_hub.add(GGUF_REPO, GGUF_FILE, b"GGUF" + bytes(64))
    spec = f"{GGUF_REPO}/{GGUF_FILE}"
    folder = hub.resolve_base("dev", transformer_weights=False)
    got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "transformer/config.json" in got and "transformer/diffusion_pytorch_model.safetensors" not in got
    hub.resolve_transformer_file(spec)
    fake_hub.requests.clear()
    set_offline(monkeypatch)
    download.check_run_weights("dev", None, transformer=spec)  # base (no weights) and GGUF cached: no error
    assert fake_hub.requests == []
    with pytest.raises(WeightsError) as e:
        download.check_run_weights("dev", None, transformer=f"{GGUF_REPO}/flux1-dev-Q4_0.gguf")
    assert str(e.value).endswith(f"run `hf download {GGUF_REPO} flux1-dev-Q4_0.gguf`")
    with pytest.raises(WeightsError) as e:  # one line and one command for all that is missing
        download.check_run_weights("schnell", None, transformer="x/y/z.gguf")
    assert "base schnell (black-forest-labs/FLUX.1-schnell) and transformer x/y/z.gguf;" in str(e.value)
    assert str(e.value).endswith("run `clear-gen download --base schnell && hf download x/y z.gguf`")


def test_dropped_connection_resumes_with_right_bytes(fake_hub, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub writes in 10 MB chunks; smaller ones let a 1 MB file show the resume.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    data = fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes(seed=1, n=1 << 18))
    fake_hub.drop_after[DEFAULT_FILE] = 300_000
    path = hub.resolve_variant_file("r8-down4")
    assert path.read_bytes() == data
    ranges = [r for m, p, r in fake_hub.requests if m == "GET" and p.endswith(DEFAULT_FILE)]
    assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes=")
    resumed_at = int(ranges[1][len("bytes=") :].rstrip("-"))
    assert 0 < resumed_at <= 300_000  # the second GET continued from what had been written
    assert fake_hub.body_bytes == 300_000 + len(data) - resumed_at


def test_pinned_sha256_checked(fake_hub):
    data = fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes())
    good = variant(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    assert hub.fetch_variant(good).read_bytes() == data


@pytest.mark.parametrize("pin", ["sha256", "size"])
def test_pinned_mismatch_fails_and_leaves_nothing_trusted(tmp_path, fake_hub, monkeypatch, pin):
    fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes())
    bad = variant(sha256="0" * 64) if pin == "sha256" else variant(size=12)
    said = "has sha256" if pin == "sha256" else "is [0-9]+ bytes"
    with pytest.raises(WeightsError, match=f"{said}.*deleted it from the cache.*clear-gen download r8-down4"):
        hub.fetch_variant(bad)
    assert not [p for p in in_cache(tmp_path) if p.name.endswith(".safetensors") or "blobs" in p.parts]
    assert hub.cached_variant(bad) is None
    set_offline(monkeypatch)  # a later offline run does not find (and trust) anything
    with pytest.raises(WeightsError, match="not in the cache"):
        hub.fetch_variant(bad)


@pytest.mark.parametrize(
    ("status", "code"), [(401, "GatedRepo"), (403, "GatedRepo"), (401, None), (403, None)]
)
def test_gated_base_says_how_to_get_access(fake_hub, status, code):
    serve_dev_base(fake_hub)
    fake_hub.deny[DEV_REPO] = (status, code)
    with pytest.raises(WeightsError) as e:
        hub.resolve_base("dev")
    msg = str(e.value)
    assert f"{DEV_REPO} is gated" in msg and f"https://huggingface.co/{DEV_REPO}" in msg
    assert "hf auth login" in msg and "HF_TOKEN" in msg


@pytest.mark.parametrize("status", [401, 403])
def test_refused_file_says_how_to_get_access(fake_hub, status):
    fake_hub.add(CLEAR_REPO, DEFAULT_FILE, b"x")
    fake_hub.deny[CLEAR_REPO] = (status, None)
    with pytest.raises(WeightsError, match="refused access.*accept its licence.*HF_TOKEN"):
        hub.resolve_variant_file("r8-down4")


def test_missing_repo_and_file(fake_hub):
    fake_hub.add(CLEAR_REPO, "other.safetensors", b"x")
    with pytest.raises(WeightsError, match="file is not in Huage001/CLEAR"):
        hub.resolve_variant_file("r8")
    with pytest.raises(WeightsError, match="nobody/nothing is not on the Hub"):
        hub.resolve_base("nobody/nothing")


def test_offline_with_cache_makes_no_request(fake_hub, monkeypatch):
    data = fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes())
    serve_dev_base(fake_hub)
    online = (hub.resolve_variant_file("r8-down4"), hub.resolve_base("dev"))
    fake_hub.requests.clear()
    set_offline(monkeypatch)
    assert (hub.resolve_variant_file("r8-down4"), hub.resolve_base("dev")) == online
    assert online[0].read_bytes() == data
    assert fake_hub.requests == []


def test_offline_without_cache_gives_the_command(fake_hub, monkeypatch):
    set_offline(monkeypatch)
    with pytest.raises(WeightsError, match=r"unset HF_HUB_OFFLINE and run `clear-gen download r16 --no-ba"):
        hub.resolve_variant_file("r16")
    with pytest.raises(WeightsError, match=r"unset HF_HUB_OFFLINE and run `clear-gen download --base dev`"):
        hub.resolve_base("dev")
    assert fake_hub.requests == []


def test_unreachable_hub_is_explained():
    import importlib.util

    # huggingface_hub 2.x speaks through httpx2, 1.x (the GPU machine's 1.33) through httpx
    client = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    t = hub_errors.Target("variant r8", CLEAR_REPO, "main", False, "clear-gen download r8 --no-base")
    msg = str(hub_errors.hub_error(client.ConnectError("refused"), t))
    assert "unreachable" in msg and "clear-gen download r8 --no-base" in msg
    assert hub_errors.hub_error(KeyError("x"), t) is None


def test_download_command_fetches_exactly_what_is_missing():
    reg = load_registry()
    r8, r16, dev, schnell = reg.variant("r8-down4"), reg.variant("r16"), reg.base("dev"), reg.base("schnell")
    assert hub.download_command([r8], [dev]) == "clear-gen download r8-down4"  # the base it implies
    assert hub.download_command([r8], []) == "clear-gen download r8-down4 --no-base"
    assert hub.download_command([], [dev]) == "clear-gen download --base dev"
    assert hub.download_command([r8], [schnell]) == "clear-gen download r8-down4 --base schnell"
    assert hub.download_command([r8, r16], [dev]) == "clear-gen download r8-down4 r16"
    # `download VARIANT --base B` fetches the variant and that base, not the one the variant implies
    assert download.plan_download(["r8-down4"], False, "schnell", False, reg) == (["r8-down4"], ["schnell"])


@pytest.fixture
def no_backoff(monkeypatch) -> list[float]:
    """huggingface_hub's retry sleeps: recorded, not slept."""
    import huggingface_hub.utils._http as http

    slept: list[float] = []
    monkeypatch.setattr(http.time, "sleep", slept.append)
    return slept


def test_unreachable_hub_fails_fast_naming_every_missing_piece(no_backoff):
    with pytest.raises(WeightsError) as e:
        download.download(["r8-down4"], "dev", progress=False)
    msg = str(e.value)
    assert f"base dev ({DEV_REPO})" in msg and f"variant r8-down4 ({CLEAR_REPO}/{DEFAULT_FILE})" in msg
    assert f"the Hub ({NOWHERE}) is unreachable" in msg and "run `clear-gen download r8-down4` once" in msg
    assert no_backoff == []  # one probe, no retry loop
    with pytest.raises(WeightsError, match=r"variants r8, r16 \(Huage001/CLEAR\)"):
        download.download(["r8", "r16"], [], progress=False)


def test_run_check_passes_with_everything_cached_and_no_network(fake_hub, monkeypatch):
    fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes())
    serve_dev_base(fake_hub)
    download.download(["r8-down4"], "dev", progress=False)
    fake_hub.requests.clear()
    monkeypatch.setenv("HF_ENDPOINT", NOWHERE)
    _reload_hf()
    download.check_run_weights("dev", "r8-down4")  # all cached: no probe, no error
    download.check_run_weights(DEV_REPO, None)
    assert fake_hub.requests == []
    with pytest.raises(WeightsError, match=r"variant r16 .*run `clear-gen download r16 --no-base`"):
        download.check_run_weights("dev", "r16")


def test_run_check_with_a_reachable_hub_leaves_the_fetching_to_the_run(fake_hub):
    download.check_run_weights("dev", "r8-down4")  # missing, but the Hub answers: the run downloads them
    assert [m for m, p, _ in fake_hub.requests] == ["HEAD"]  # the probe, nothing fetched yet


def test_a_retry_loop_is_said_on_stderr(fake_hub, no_backoff, capsys):
    fake_hub.add(CLEAR_REPO, DEFAULT_FILE, b"x")
    fake_hub.deny[CLEAR_REPO] = (503, None)
    with pytest.raises(WeightsError, match="the Hub answered HTTP 503"):
        hub.resolve_variant_file("r8-down4")
    notes = [line for line in capsys.readouterr().err.splitlines() if "retrying" in line]
    assert len(no_backoff) == 5 and len(notes) == 5
    assert notes[0].startswith("Hub busy (HTTP Error 503), retrying in 1")
    assert notes[0].endswith("[Retry 1/5]...") and notes[4].endswith("[Retry 5/5]...")


# ------------------------------------------------------------------------------------------------ CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    """`clear-gen ARGS` in a fresh interpreter, with this test's HF_* environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    code = "from clear_gen.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_download_then_weights_then_again(fake_hub):
    fake_hub.add(CLEAR_REPO, DEFAULT_FILE, safetensors_bytes())
    serve_dev_base(fake_hub)
    r = cli("download")
    assert r.returncode == 0, r.stderr
    assert "r8-down4" in r.stdout and DEV_REPO in r.stdout and "KB" in r.stdout
    fake_hub.requests.clear()
    r = cli("weights")
    assert r.returncode == 0, r.stderr
    assert fake_hub.requests == []  # the table comes from the cache alone
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    assert "no" not in rows["r8-down4 (default)"].split("│")[6] and "no" in rows["r16"].split("│")[6]
    assert "no" not in rows["dev"].split("│")[4] and "no" in rows["schnell"].split("│")[4]
    fake_hub.body_bytes = 0
    assert cli("download").returncode == 0
    assert fake_hub.body_bytes == 0


def test_cli_errors_are_one_red_line(fake_hub):
    serve_dev_base(fake_hub)
    fake_hub.deny[DEV_REPO] = (401, "GatedRepo")
    r = cli("download", "--base", "dev")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "is gated" in r.stderr
    r = cli("download", "r9")
    assert r.returncode == 1 and "unknown variant 'r9'" in r.stderr and "r8-down4" in r.stderr


def test_cli_offline_without_cache_says_to_unset_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("download", "r8")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "base dev" in r.stderr and "variant r8 " in r.stderr  # every missing piece, in one line
    assert "unset HF_HUB_OFFLINE and run `clear-gen download r8`" in r.stderr


# ------------------------------------------------------------------------------------------ ControlNets

UPSCALER_REPO = "jasperai/Flux.1-dev-Controlnet-Upscaler"


def test_registry_controlnets_are_diffusers_folders_for_dev():
    reg = load_registry()
    assert {"union-pro", "union", "upscaler", "canny", "depth"} <= set(reg.controlnets)
    assert reg.controlnet("union-pro").modes == ("canny", "tile", "depth", "blur", "pose", "gray", "lq")
    assert reg.controlnet("upscaler").modes == () and reg.controlnet("upscaler").repo == UPSCALER_REPO
    assert all(c.base == "dev" and c.scale > 0 for c in reg.controlnets.values())
    with pytest.raises(ConfigError, match="unknown ControlNet 'tile'; valid: union-pro, union"):
        reg.controlnet("tile")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_GOOD.replace('modes = ["canny"', 'modes = ["tile"', 1), "modes must be distinct names"),
        (_GOOD.replace("scale = 0.6", "scale = -0.6", 1), "scale must be >= 0"),
        (_GOOD.replace("num_single_layers = 0", 'num_single_layers = "0"', 1), "num_single_layers must"),
        (_GOOD + '\n[controlnets.x]\nrepo="a/b"\nbase="pro"\nnum_layers=1\nnum_single_layers=0\n'
         'description="d"\n', "[controlnets.x] base 'pro' is not one of"),
    ],
)  # fmt: skip
def test_malformed_controlnet_entries_are_named(tmp_path, text, problem):
    path = tmp_path / "weights.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_registry(path)
    assert problem in str(e.value)


def test_plan_download_of_controlnets_alone_fetches_no_variant_or_base():
    reg = load_registry()
    assert download.plan_download([], False, None, False, reg, ["upscaler"]) == ([], [])
    assert download.plan_download(["r8"], False, None, False, reg, ["upscaler"]) == (["r8"], ["dev"])
    with pytest.raises(ConfigError, match="--controlnet nope: not a local folder, a registry ControlNet"):
        download.plan_download([], False, None, False, reg, ["nope"])


def test_cli_download_controlnet_then_a_run_finds_it_offline(fake_hub, monkeypatch):
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "examples/input.png"):
        fake_hub.add(UPSCALER_REPO, name, f"content of {name}".encode())
    r = cli("download", "--controlnet", "upscaler")
    assert r.returncode == 0, r.stderr
    assert "upscaler" in r.stdout and "controlnet" in r.stdout and "r8-down4" not in r.stdout
    got = [p for p in fake_hub.gets() if UPSCALER_REPO in p]
    assert any(p.endswith("config.json") for p in got) and any(p.endswith(".safetensors") for p in got)
    assert not [p for p in got if p.endswith(("README.md", "input.png"))]  # the model card's files stay
    r = cli("weights")
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    assert "no" not in rows["upscaler"].split("│")[6] and "no" in rows["depth"].split("│")[6]
    fake_hub.requests.clear()
    set_offline(monkeypatch)
    net = load_registry().controlnet("upscaler")
    assert hub.cached_controlnet(net) is not None
    with pytest.raises(WeightsError) as e:  # the base is missing; the ControlNet is not
        download.check_run_weights("dev", None, controlnet=net)
    assert "base dev" in str(e.value) and "ControlNet" not in str(e.value)
    with pytest.raises(WeightsError) as e:  # one line and one command for all that is missing
        download.check_run_weights("dev", "r16", controlnet=load_registry().controlnet("depth"))
    assert "base dev (black-forest-labs/FLUX.1-dev) and ControlNet depth (Shakker-Labs/" in str(e.value)
    assert str(e.value).endswith("run `clear-gen download r16 --controlnet depth`")
    assert fake_hub.requests == []


# ------------------------------------------------------------------------------------------ Krea [dev]

KREA_REPO = "black-forest-labs/FLUX.1-Krea-dev"


@pytest.mark.slow
def test_krea_downloads_and_runs_the_recipe_with_a_published_variant(
    fake_hub, tmp_path, monkeypatch, roomy_cpu, capsys
):
    """FLUX.1 Krea [dev] (a tiny FLUX.1 pipeline served as its repo, with a single-file checkpoint beside it)
    and the r8-down4 variant (a checkpoint in the published format made for the tiny transformer): `download`
    fetches both, then offline the whole recipe runs, a full-attention first pass and a CLEAR SDEdit stage."""
    import torch
    from conftest import run_cli
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save
    from tiny_pipeline import save_tiny_flux

    from clear_gen.attention.weights import expected_checkpoint

    tiny = save_tiny_flux(tmp_path / "tiny")
    for file in (f for f in tiny.rglob("*") if f.is_file()):
        fake_hub.add(KREA_REPO, file.relative_to(tiny).as_posix(), file.read_bytes())
    fake_hub.add(KREA_REPO, "flux1-krea-dev.safetensors", b"x" * 4096)
    g = torch.Generator().manual_seed(2)
    shapes = expected_checkpoint(FluxTransformer2DModel.from_pretrained(tiny / "transformer"), 4)
    fake_hub.add(
        CLEAR_REPO, DEFAULT_FILE, save({k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()})
    )
    r = cli("download", "--base", "krea", "r8-down4")
    assert r.returncode == 0, r.stderr
    assert KREA_REPO in r.stdout and not [p for p in fake_hub.gets() if p.endswith("krea-dev.safetensors")]
    set_offline(monkeypatch)
    args = ["a castle", "--model", "krea", "--variant", "r8-down4", "--res", "256", "--stages", "128,256"]
    args += ["--steps", "2", "--first-steps", "2", "--max-sequence-length", "16", "--backend", "dense"]
    code, out, err = run_cli([*args, "--seed", "1", "--out", f"{tmp_path / 'out'}/", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert (row["model"], row["variant"], row["width"]) == ("krea", "r8-down4", 256)
    assert [s["attention"] for s in row["timings"]["stages"]] == ["full", "CLEAR r=8 f=4"]
    assert "loading FLUX.1 krea with CLEAR r8-down4" in err
