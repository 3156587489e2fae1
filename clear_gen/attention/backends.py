"""CLEAR's attention kernels as a registry: every fact about a backend lives in its entry here (the devices
it serves, where it has a backward pass, the dtypes it takes, whether it compiles and what compiling needs,
the sizes it accepts, what auto falls back to when its compile fails). `choose` picks one for a device (and
a geometry, the call's heads and dtype, and training), and says in one line why an asked-for one cannot
serve; nothing else in clear-gen tests a backend's name or a device type to choose attention.

- flex: torch's FlexAttention compiled with CLEAR's analytic block mask (geometry.block_mask): the fast
  path on CUDA and the CPU, and on Apple's MPS through torch's Metal lowering (inference only); training
  (a backward pass) on CUDA only. When its compile fails and auto chose it, auto takes gather instead.
- flex-split: flex with the text query rows run apart (SDPA over every text and image key): the same
  values; off by default (auto never takes it) until a GPU measures it faster (the attention part of
  scripts/gpu_bench.sh).
- flex-fa4: flex through torch's CuTe-DSL FlashAttention-4 kernel (kernel_options BACKEND FLASH, from the
  flash-attn-4 package) on Hopper and data-centre Blackwell GPUs, bf16/fp16; off by default (auto never
  takes it) until the fa4-8k part of scripts/gpu_bench.sh shows it faster and exact there.
- gather: the exact block-sparse kernel in plain torch (gather.py): the key blocks each query tile needs,
  gathered, and SDPA; no compiler, any device torch runs SDPA on, with a backward pass everywhere; chunks
  of tiles within a memory budget.
- dense: SDPA with an explicit boolean mask: the small-size reference, on any device, refused above
  DENSE_MAX_ELEMENTS mask entries.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import geometry as G
from ..errors import ConfigError
from . import gather
from .gather import Work

DENSE_MAX_ELEMENTS = 1 << 26  # q_len * kv_len; beyond it the dense mask and scores are too large
FLEX_RECOMPILE_LIMIT = 64  # kernels per process: one per geometry, dtype and batch (a few per run)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
EVERY_DEVICE = ("cuda", "cpu", "mps", "xpu")  # ROCm builds of torch name their GPUs cuda too


@dataclass
class Backend:
    """One attention kernel: (q, k, v, geometry, scale) -> output, (B, H, L, D) in and out."""

    name: str
    run: Callable[[Tensor, Tensor, Tensor, G.Geometry, float], Tensor]
    devices: tuple[str, ...]  # device types it runs on
    backward: tuple[str, ...]  # device types where it has a backward pass (training)
    compiles: bool  # compiles a kernel the first time it runs a geometry (the run says "compiling")
    note: str  # what it is, for `clear-gen info --backends`
    dtypes: tuple[torch.dtype, ...] = FLOATS
    too_large: Callable[[G.Geometry, Work | None], str | None] | None = None  # why a size is refused
    needs: Callable[[str], str | None] | None = None  # what it lacks on this machine for a device type
    may_fail: bool = False  # a failed compile under auto is not fatal: passed over there from then on
    image_rows: Callable[[Tensor, Tensor, Tensor, G.Geometry, float], Tensor] | None = None  # the image
    # query rows alone (T a multiple of 128), for bench's study of what the text rows cost
    split: str | None = None  # the backend running this one's text query rows apart (bench times it too)
    auto_min_keys: dict[str, int] = field(default_factory=dict)  # auto passes it over below this many keys
    auto: bool = True  # auto may choose it; False: it runs only when asked by name
    seen: set = field(default_factory=set)  # (geometry, device, dtype) it ran in this process
    failed: dict[str, str] = field(default_factory=dict)  # device type: why it failed to compile there

    def problem(
        self,
        device: torch.device,
        geo: G.Geometry | None = None,
        training: bool = False,
        work: Work | None = None,
    ) -> str | None:
        """Why this backend cannot serve this device, size, call and use; None when it can."""
        where = device.type
        if where not in self.devices:
            return (
                f"the {self.name} backend does not run on {where} (it runs on {', '.join(self.devices)}): "
                "use --backend auto"
            )
        if training and where not in self.backward:
            return (
                f"the {self.name} backend has no backward pass on {where}: train there with --backend gather"
            )
        if work is not None and work.dtype not in self.dtypes:
            return f"the {self.name} backend does not take {str(work.dtype).removeprefix('torch.')}"
        if geo is not None and self.too_large is not None:
            problem = self.too_large(geo, work)
            if problem is not None:
                return problem
        lacking = self.needs(where) if self.needs is not None else None
        failed = self.failed.get(where)
        return lacking or (f"{failed}; use --backend gather or auto" if failed else None)

    def first_use(self, geo: G.Geometry, device: torch.device, dtype: torch.dtype) -> bool:
        """True the first time this process runs it at this geometry, device and dtype: for a compiling
        backend, the run that compiles its kernel."""
        key = (geo, str(device), dtype)
        new = key not in self.seen
        self.seen.add(key)
        return new and self.compiles

    def uses(self, device: torch.device) -> str:
        """'inference and training' or 'inference': what it does on this device (it serves it)."""
        return "inference and training" if device.type in self.backward else "inference"


# ---------------------------------------------------------------- flex


_compiled_flex: dict[str, Callable] = {}  # per flex kernel ("AUTO": inductor's choice; "FLASH": FA4)


def _flex(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """Compiled FlexAttention with the analytic block mask. (B, H, L, D) in and out.

    When a gradient will flow back (training), the mask also carries the query-block lists that
    FlexAttention's backward pass needs."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return compiled_flex(query, key, value, G.block_mask(geo, str(query.device), grad), scale)


def compiled_flex(
    query: Tensor, key: Tensor, value: Tensor, block_mask, scale: float, kernel: str = "AUTO"
) -> Tensor:
    """torch.compile'd flex_attention, one kernel per shape and dtype. (B, H, L, D) in and out.

    `kernel`: flex's BACKEND kernel option, "AUTO" (Triton on CUDA, C++ on the CPU, Metal on MPS) or
    "FLASH" (FlashAttention-4's CuTe-DSL kernel); each has its own compiled callable.
    Static shapes: one kernel per geometry and dtype, and inductor's CPU template fails to build with
    dynamic sizes. fullgraph=True makes dynamo raise at its recompile limit instead of silently running
    FlexAttention uncompiled, which would materialise the whole score matrix (out of memory at 8K). The
    limit is raised for this call only, not for the process.
    """
    if kernel not in _compiled_flex:
        from functools import partial

        from torch.nn.attention.flex_attention import flex_attention

        fn = (
            flex_attention
            if kernel == "AUTO"
            else partial(flex_attention, kernel_options={"BACKEND": kernel})
        )
        _compiled_flex[kernel] = torch.compile(fn, dynamic=False, fullgraph=True)
    try:
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            return _compiled_flex[kernel](query, key, value, block_mask=block_mask, scale=scale)
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


def _flex_image_rows(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """The image query rows alone, through their rows of CLEAR's block mask. (B, H, N, D)."""
    mask = _image_rows_mask(geo, str(query.device))
    return compiled_flex(query[:, :, geo.text_len :], key, value, mask, scale)


def _flex_needs(device_type: str) -> str | None:
    """What compiling FlexAttention lacks on this machine: a C++ compiler for inductor's CPU kernels, Triton
    for CUDA's (when there is a CUDA GPU here: a plan for another machine assumes it has them); None when
    nothing is missing (MPS: torch's own Metal lowering, nothing to install)."""
    if device_type == "cpu" and not _cpp_compiler():
        return "the flex backend compiles its CPU kernel with a C++ compiler, and none is here (install g++)"
    if device_type == "cuda" and torch.cuda.is_available() and not _triton():
        return "the flex backend compiles its CUDA kernel with Triton, which is missing (pip install triton)"
    return None


@lru_cache(maxsize=1)
def _cpp_compiler() -> bool:
    return bool(os.environ.get("CXX")) or any(shutil.which(c) for c in ("g++", "clang++", "c++"))


@lru_cache(maxsize=1)
def _triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------- flex-fa4

FA4_ROWS = {9: 128, 10: 256, 11: 256}  # compute capability major -> query rows per block FA4 takes: its M
# tile (128) times its Q stages (2 on Blackwell, flash_attn.cute's config); key blocks stay 128 (its N tile)
FA4_HEAD_DIMS = range(16, 129, 8)  # flex's lowering: at least 16; FA4 on Blackwell: at most 128, 16 bytes


def _flex_fa4(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """`_flex` with FlashAttention-4's kernel in place of Triton's (flex's BACKEND "FLASH"), over CLEAR's
    block mask with the query block FA4 tiles this card with. (B, H, L, D) in and out.

    flash_attn.cute checks its inputs when the kernel first runs (block sizes, head dims), after inductor
    compiled the graph: such a refusal is one line naming the fix, as a failed compile is."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    rows = FA4_ROWS[torch.cuda.get_device_capability(query.device)[0]]
    mask = G.block_mask(geo, str(query.device), grad, rows)
    try:
        return compiled_flex(query, key, value, mask, scale, kernel="FLASH")
    except Exception as e:
        if not _fa4_refusal(e):
            raise
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
        raise ConfigError(f"the flex-fa4 backend failed on this card ({last}); use --backend flex") from None


def _fa4_refusal(e: Exception) -> bool:
    """flash_attn.cute's checks of its inputs (ValueError, AssertionError, NotImplementedError) or an error
    of the CuTe DSL compiling its kernel (cutlass.base_dsl's DSLBaseError family)."""
    checks = isinstance(e, (ValueError, AssertionError, NotImplementedError))
    return checks or type(e).__module__.startswith(("cutlass", "flash_attn"))


def _fa4_needs(device_type: str) -> str | None:
    """What FlashAttention-4 through flex lacks here, when there is a CUDA GPU here (a plan for another
    machine assumes it has them): the flash-attn-4 package, a Hopper or data-centre Blackwell card."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    if not _flash_attn_cute():
        return "the flex-fa4 backend needs FlashAttention-4's CuTe kernels: pip install flash-attn-4"
    major, minor = torch.cuda.get_device_capability()
    if major not in FA4_ROWS:
        return (
            f"the flex-fa4 backend runs on Hopper and data-centre Blackwell GPUs (compute capability 9.x to "
            f"11.x), not on this {major}.{minor} card: use --backend flex"
        )
    return None


def _fa4_too_large(geo: G.Geometry, work: Work | None) -> str | None:
    if work is None or work.head_dim in FA4_HEAD_DIMS:
        return None
    dims = f"{FA4_HEAD_DIMS.start} to {FA4_HEAD_DIMS.stop - 1} in steps of {FA4_HEAD_DIMS.step}"
    return f"the flex-fa4 backend takes head dims of {dims}, not {work.head_dim}: use --backend flex"


@lru_cache(maxsize=1)
def _flash_attn_cute() -> bool:
    """flash-attn-4's module, as torch's FLASH kernel looks for it (flex_flash_attention.py)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn package at all
        return False


# ---------------------------------------------------------------- dense


@lru_cache(maxsize=4)
def _cached_dense_mask(geo: G.Geometry, device: str) -> Tensor:
    return G.dense_mask(geo, device)


def _dense(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """SDPA with an explicit boolean mask: the small-size reference. (B, H, L, D) in and out."""
    mask = _cached_dense_mask(geo, str(query.device))  # (Lq, Lkv) bool
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def _dense_too_large(geo: G.Geometry, work: Work | None) -> str | None:
    if geo.q_len * geo.kv_len <= DENSE_MAX_ELEMENTS:
        return None
    return (
        f"the dense backend needs a {geo.q_len} x {geo.kv_len} mask, too large; "
        "use --backend gather, flex or auto"
    )


def _gather_too_large(geo: G.Geometry, work: Work | None) -> str | None:
    return None if work is None else gather.unit_problem(geo, work)


# ---------------------------------------------------------------- the registry


BACKENDS: dict[str, Backend] = {  # in order of preference for auto
    "flex": Backend(
        "flex", _flex, devices=("cuda", "cpu", "mps"), backward=("cuda",), compiles=True,
        note="compiled FlexAttention with CLEAR's block mask; compiles a kernel per size and dtype",
        needs=_flex_needs, may_fail=True, image_rows=_flex_image_rows, split="flex-split",
        auto_min_keys={"cpu": G.BLOCK},  # see CPU_SHORT_SEQUENCES
    ),
    "gather": Backend(
        "gather", gather.attention, devices=EVERY_DEVICE, backward=EVERY_DEVICE, compiles=False,
        note=(
            f"exact block-sparse SDPA over gathered key blocks, no compiler, chunks within "
            f"{gather.BUDGET_BYTES / 2**30:g} GiB"
        ),
        too_large=_gather_too_large,
        auto_min_keys={device: G.BLOCK for device in EVERY_DEVICE},  # below one block: dense, the same work
    ),
    "flex-split": Backend(
        "flex-split", _flex_split, devices=("cuda", "cpu"), backward=("cuda",), compiles=True, auto=False,
        note="flex with the text query rows apart (SDPA); off by default", needs=_flex_needs,
    ),
    "flex-fa4": Backend(
        "flex-fa4", _flex_fa4, devices=("cuda",), backward=("cuda",), compiles=True, auto=False,
        note="flex through FlashAttention-4's CuTe kernel (sm 9.x-11.x, flash-attn-4); off by default",
        dtypes=(torch.bfloat16, torch.float16), needs=_fa4_needs, too_large=_fa4_too_large,
    ),
    "dense": Backend(
        "dense", _dense, devices=EVERY_DEVICE, backward=EVERY_DEVICE, compiles=False,
        note="SDPA with a boolean mask, the reference, up to 2^26 mask entries (small sizes)",
        too_large=_dense_too_large,
    ),
}  # fmt: skip
NAMES = ("auto", *BACKENDS)
REFERENCE = "dense"  # the exact reference the benchmarks check the others against
# CPU_SHORT_SEQUENCES: torch 2.13's compiled CPU flex kernel was reported (issue 24) to return NaN or wrong
# values for sequences shorter than one 128-token block when the inductor cache is fresh. Not reproduced
# here (README, known issues); auto takes the exact dense kernel there all the same: at that size it costs
# nothing and spares a compile. An asked --backend flex still runs flex.


def check_backend(name: str) -> None:
    """A --backend name: auto or a registered backend."""
    if name not in NAMES:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {', '.join(NAMES)}")


def choose(
    name: str,
    device: torch.device,
    geo: G.Geometry | None = None,
    training: bool = False,
    work: Work | None = None,
) -> Backend:
    """The backend to run: the asked one if it can serve (else one line saying why), or for auto the first
    in BACKENDS that can. `work`: the call's batch x heads, head dim and dtype, when known (sizes a
    backend's memory)."""
    check_backend(name)
    if name != "auto":
        problem = BACKENDS[name].problem(device, geo, training, work)
        if problem is not None:
            raise ConfigError(problem)
        return BACKENDS[name]
    candidates = [backend for backend in BACKENDS.values() if backend.auto]
    for backend in candidates:
        short = geo is not None and geo.kv_len < backend.auto_min_keys.get(device.type, 0)
        if not short and backend.problem(device, geo, training, work) is None:
            return backend
    reasons = "; ".join(filter(None, (b.problem(device, geo, training, work) for b in candidates)))
    raise ConfigError(f"no attention backend can serve this run: {reasons}")


def available(devices: list[torch.device]) -> list[tuple[str, str]]:
    """(name, one line) per backend: what it does on each of these devices (this machine's), or why it
    cannot serve any of them; then what it is and where it runs. What `clear-gen info --backends` prints."""
    lines = []
    for b in BACKENDS.values():
        serves = [d for d in devices if b.problem(d) is None]
        here = "; ".join(f"{d.type}: {b.uses(d)}{_auto_skips(b, d)}" for d in serves)
        if not serves:
            here = "not here: " + "; ".join(dict.fromkeys(b.problem(d) or "" for d in devices))
        where = f"runs on {', '.join(b.devices)}, trains on {', '.join(b.backward)}"
        lines.append((b.name, f"{here} [{b.note}; {where}]"))
    return lines


def _auto_skips(backend: Backend, device: torch.device) -> str:
    keys = backend.auto_min_keys.get(device.type)
    return f" (auto from {keys} keys)" if keys else ""


COMPILE_FAILURES = (torch._dynamo.exc.TorchDynamoException,)  # inductor's errors are BackendCompilerFailed


@torch.compiler.disable  # outside compiled blocks (--compile): flex is compiled on its own, static shapes
def clear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    geo: G.Geometry,
    scale: float,
    backend: str = "auto",
    note: Callable[[str], None] | None = None,
) -> Tensor:
    """CLEAR attention over a tile-ordered sequence (keys include any down-sampled tokens).

    query (B, H, q_len, D), key/value (B, H, kv_len, D) -> (B, H, q_len, D). When the backend auto chose
    fails to compile here, its fallback runs instead, for the rest of the process, and `note` (else a
    warning) says so once.
    """
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    device, work = query.device, Work.of(query)
    chosen = choose(backend, device, geo, training, work)
    try:
        return chosen.run(query, key, value, geo, scale)
    except COMPILE_FAILURES as e:
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
        why = f"the {chosen.name} backend did not compile on {device.type} ({last})"
        if backend != "auto" or not chosen.may_fail:
            raise ConfigError(f"{why}; use --backend gather") from None
        chosen.failed[device.type] = f"{why} in this process"
        instead = choose(backend, device, geo, training, work)
        (note or _warn)(f"{why}: CLEAR runs on the {instead.name} backend instead")
        return instead.run(query, key, value, geo, scale)


def _warn(text: str) -> None:
    warnings.warn(text, RuntimeWarning, stacklevel=4)
