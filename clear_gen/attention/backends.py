"""CLEAR's attention kernels as a registry: each backend with the devices it serves, whether it has a backward
pass there, whether it compiles a kernel per size, and the sizes it accepts. `choose` picks one for a
device (and a geometry, and training), and says in one line why an asked-for one cannot serve; nothing
else in clear-gen tests a backend's name or a device type to choose attention.

- flex: torch's FlexAttention compiled with CLEAR's analytic block mask (geometry.block_mask): the fast
  path, on CUDA and the CPU; training (a backward pass) on CUDA only.
- flex-split: flex with the text query rows run apart (SDPA over every text and image key): the same
  values; off by default (auto never takes it) until a GPU measures it faster (the attention part of
  scripts/gpu_bench.sh).
- dense: SDPA with an explicit boolean mask: the small-size reference, on any device, refused above
  DENSE_MAX_ELEMENTS mask entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import geometry as G
from ..errors import ConfigError

DENSE_MAX_ELEMENTS = 1 << 26  # q_len * kv_len; beyond it the dense mask and scores are too large
FLEX_RECOMPILE_LIMIT = 64  # kernels per process: one per geometry, dtype and batch (a few per run)


@dataclass
class Backend:
    """One attention kernel: (q, k, v, geometry, scale) -> output, (B, H, L, D) in and out."""

    name: str
    run: Callable[[Tensor, Tensor, Tensor, G.Geometry, float], Tensor]
    devices: tuple[str, ...]  # device types it runs on
    backward: tuple[str, ...]  # device types where it has a backward pass (training)
    compiles: bool  # compiles a kernel the first time it runs a geometry (the run says "compiling")
    max_elements: int | None = None  # q_len * kv_len it accepts; None: any
    auto_min_keys: dict[str, int] = field(default_factory=dict)  # auto passes it over below this many keys
    auto: bool = True  # auto may choose it; False: it runs only when asked by name
    note: str = ""  # what it is, for `clear-gen info --backends`-style listings
    seen: set = field(default_factory=set)  # (geometry, device, dtype) it ran in this process

    def problem(
        self, device: torch.device, geo: G.Geometry | None = None, training: bool = False
    ) -> str | None:
        """Why this backend cannot serve this device, size and use; None when it can."""
        where = device.type
        if where not in self.devices:
            return f"the {self.name} backend does not run on {where} (it runs on {', '.join(self.devices)})"
        if training and where not in self.backward:
            return (
                f"the {self.name} backend has no backward pass on {where}: train there with --backend dense"
            )
        if geo is not None and self.max_elements is not None and geo.q_len * geo.kv_len > self.max_elements:
            return (
                f"the {self.name} backend needs a {geo.q_len} x {geo.kv_len} mask, too large; "
                "use --backend flex (or auto)"
            )
        return None

    def first_use(self, geo: G.Geometry, device: torch.device, dtype: torch.dtype) -> bool:
        """True the first time this process runs it at this geometry, device and dtype: for a compiling
        backend, the run that compiles its kernel."""
        key = (geo, str(device), dtype)
        new = key not in self.seen
        self.seen.add(key)
        return new and self.compiles


# ---------------------------------------------------------------- flex


_compiled_flex = None


def _flex(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """Compiled FlexAttention with the analytic block mask. (B, H, L, D) in and out.

    When a gradient will flow back (training), the mask also carries the query-block lists that
    FlexAttention's backward pass needs."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return compiled_flex(query, key, value, G.block_mask(geo, str(query.device), grad), scale)


def compiled_flex(query: Tensor, key: Tensor, value: Tensor, block_mask, scale: float) -> Tensor:
    """torch.compile'd flex_attention, one kernel per shape and dtype. (B, H, L, D) in and out.

    Static shapes: one kernel per geometry and dtype, and inductor's CPU template fails to build with
    dynamic sizes. fullgraph=True makes dynamo raise at its recompile limit instead of silently running
    FlexAttention uncompiled, which would materialise the whole score matrix (out of memory at 8K). The
    limit is raised for this call only, not for the process.
    """
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    try:
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        raise ConfigError(
            f"CLEAR compiled FlexAttention for {FLEX_RECOMPILE_LIMIT} different sizes in this process and "
            "stops rather than run it uncompiled (out of memory at large sizes); run fewer sizes per process"
        ) from None


def _flex_split(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """`_flex` with the text query rows run apart: SDPA over every text and image key (a text row is a full
    row and sees no pooled key) and FlexAttention over the image query rows alone. The same values as
    `_flex`. In one kernel the text rows visit every key block (2,052 at 8K) where an image row visits ~13,
    so they run as a tail after the rest.

    (B, H, L, D) in and out; the output lies in (B, L, H, D) memory, so the processor's reshape after it is
    a view, not a copy. Falls back to `_flex` when the text length is not a multiple of 128 (the image rows
    must start on a block boundary) or a gradient will flow back (training).
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if geo.text_len % G.BLOCK or grad:
        return _flex(query, key, value, geo, scale)
    t, n = geo.text_len, geo.q_len
    b, h, _, d = query.shape
    out = query.new_empty(b, n, h, d).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D) memory
    k, v = key[:, :, :n], value[:, :, :n]  # text and image keys, no pooled ones
    out[:, :, :t] = F.scaled_dot_product_attention(query[:, :, :t], k, v, scale=scale)
    mask = _image_rows_mask(geo, str(query.device))  # the image rows of CLEAR's block mask
    out[:, :, t:] = compiled_flex(query[:, :, t:], key, value, mask, scale)
    return out


@lru_cache(maxsize=4)
def _image_rows_mask(geo: G.Geometry, device: str):
    return G.image_rows_block_mask(geo, device)


# ---------------------------------------------------------------- dense


@lru_cache(maxsize=4)
def _cached_dense_mask(geo: G.Geometry, device: str) -> Tensor:
    return G.dense_mask(geo, device)


def _dense(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """SDPA with an explicit boolean mask: the small-size reference. (B, H, L, D) in and out."""
    mask = _cached_dense_mask(geo, str(query.device))  # (Lq, Lkv) bool
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------- the registry


BACKENDS: dict[str, Backend] = {  # in order of preference for auto
    "flex": Backend(
        "flex", _flex, devices=("cuda", "cpu"), backward=("cuda",), compiles=True,
        auto_min_keys={"cpu": G.BLOCK},  # see CPU_SHORT_SEQUENCES
        note="compiled FlexAttention, CLEAR's block mask",
    ),
    "flex-split": Backend(
        "flex-split", _flex_split, devices=("cuda", "cpu"), backward=("cuda",), compiles=True, auto=False,
        note="flex with the text query rows apart (SDPA); off by default",
    ),
    "dense": Backend(
        "dense", _dense, devices=("cuda", "cpu", "mps", "xpu"), backward=("cuda", "cpu", "mps", "xpu"),
        compiles=False, max_elements=DENSE_MAX_ELEMENTS, note="SDPA with a boolean mask (small sizes)",
    ),
}  # fmt: skip
NAMES = ("auto", *BACKENDS)
# CPU_SHORT_SEQUENCES: torch 2.13's compiled CPU flex kernel was reported (issue 24) to return NaN or wrong
# values for sequences shorter than one 128-token block when the inductor cache is fresh. Not reproduced
# here (README, known issues); auto takes the exact dense kernel there all the same: at that size it costs
# nothing and spares a compile. An asked --backend flex still runs flex.


def check_backend(name: str) -> None:
    """A --backend name: auto or a registered backend."""
    if name not in NAMES:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {', '.join(NAMES)}")


def choose(name: str, device: torch.device, geo: G.Geometry | None = None, training: bool = False) -> Backend:
    """The backend to run: the asked one if it can serve (else one line saying why), or for auto the first
    in BACKENDS that can."""
    check_backend(name)
    if name != "auto":
        problem = BACKENDS[name].problem(device, geo, training)
        if problem is not None:
            raise ConfigError(problem)
        return BACKENDS[name]
    candidates = [backend for backend in BACKENDS.values() if backend.auto]
    for backend in candidates:
        short = geo is not None and geo.kv_len < backend.auto_min_keys.get(device.type, 0)
        if not short and backend.problem(device, geo, training) is None:
            return backend
    reasons = "; ".join(b.problem(device, geo, training) for b in candidates)
    raise ConfigError(f"no attention backend can serve this run: {reasons}")


@torch.compiler.disable  # outside compiled blocks (--compile): flex is compiled on its own, static shapes
def clear_attention(
    query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float, backend: str = "auto"
) -> Tensor:
    """CLEAR attention over a tile-ordered sequence (keys include any down-sampled tokens).

    query (B, H, q_len, D), key/value (B, H, kv_len, D) -> (B, H, q_len, D).
    """
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return choose(backend, query.device, geo, training).run(query, key, value, geo, scale)
