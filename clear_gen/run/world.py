"""Several processes, one per GPU, launched by torchrun: one image split over them, or a batch spread.

`torchrun --nproc-per-node N -m clear_gen PROMPT ...` starts N copies of clear-gen (on each node of a
multi-node job); each reads its rank, the world size and its GPU from torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK) and joins one torch.distributed process group: NCCL on GPUs, gloo on CPUs.
`--parallel` picks the mode:

- sequence: one image on every rank, with head-parallel ("Ulysses") CLEAR. The joint sequence
  [text T ; image N] (image tokens tile-ordered, as attention.py orders them) is cut into P contiguous
  slices, and rank p runs every token-wise layer (projections, norms, MLPs, RoPE) on its slice alone.
  Around attention one all-to-all gives each rank every token for H/P heads; CLEAR runs on that whole
  sequence with the same cached block mask as one process, pooling the down-sampled keys from it; a
  second all-to-all returns each rank its own tokens with every head. Text tokens are tokens like the
  rest: first in the sequence, they fall in rank 0's slice (and the next ones' if T > (T + N) / P), are
  computed once and reach every rank's attention through the same all-to-all. Nothing is replicated or
  approximated, so the image is the one-process image up to float reassociation.
  Stock-attention stages (the full-attention first pass) run replicated: every rank computes the
  whole pass (a 1024 px pass is seconds), as it would alone.
  Every rank encodes the prompts (each loads the whole pipeline anyway) and takes rank 0's embeddings,
  and each stage's final latents are rank 0's too: small broadcasts that keep the ranks identical even
  on mixed hardware. An intermediate stage is decoded on every rank, as each needs its image for the
  next stage's img2img encode (sending it from rank 0 would keep the others idle as long); the last
  stage is decoded and saved by rank 0 alone.
- data: each rank makes its share of the (prompt, seed) jobs, job j on rank j mod P; after each round
  rank 0 gathers the round's results and reports them in job order.
- auto: data when there are at least as many jobs as ranks, else sequence.

Failures: a user error found before the run, on any rank, ends every rank (`World.agree`: rank 0
prints it); a collective that fails, because a rank died or stayed silent past the timeout
(CLEAR_GEN_DIST_TIMEOUT seconds, default 600), raises ParallelError on the ranks that see it.

The communication model of both layouts (`head_parallel_bytes`, and the halo exchange on paper,
`halo_bytes`) is here too: `clear-gen bench --what plan --gpus P` tabulates it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .. import models
from ..core.device import resolve_device
from ..core.flops import FluxShape
from ..core.geometry import Geometry
from ..core.launch import check_mode, launched
from ..errors import ClearGenError, ConfigError, ParallelError

TIMEOUT_ENV = "CLEAR_GEN_DIST_TIMEOUT"  # seconds a rank waits for the others in one collective
DEFAULT_TIMEOUT_S = 600.0  # torch's own default for NCCL; covers rank 0 decoding and saving an 8K image
LAUNCH = "torchrun --nproc-per-node N -m clear_gen PROMPT ..."

T = TypeVar("T")


# ---------------------------------------------------------------- the ranks


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size`, and the mode they all run in.

    One process alone (no torchrun) is World(): every method below is then the plain one-process path.
    """

    rank: int = 0
    size: int = 1
    mode: str = "none"  # none (one process) | auto (until decide) | sequence | data
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def sequence(self) -> bool:
        return self.mode == "sequence"

    @property
    def writes(self) -> bool:
        """Whether this rank decodes its last stage and saves: all but ranks 1.. in sequence mode."""
        return self.mode != "sequence" or self.rank == 0

    def decide(self, jobs: int) -> World:
        """auto becomes data with at least as many jobs as ranks, else sequence."""
        if self.mode != "auto":
            return self
        return replace(self, mode="data" if jobs >= self.size else "sequence")

    def describe(self, jobs: int) -> str | None:
        """A line saying what the ranks do, for a run under torchrun."""
        if self.mode == "sequence":
            return f"sequence mode: each image over {self.size} ranks (head-parallel CLEAR)"
        if self.mode == "data":
            idle = f"; {self.size - jobs} ranks idle" if jobs < self.size else ""
            return f"data mode: {jobs} images over {self.size} ranks, job j on rank j mod {self.size}{idle}"
        return None

    # -------------------------------------------------------- agreeing

    def agree(self, fn: Callable[[], T]) -> T:
        """fn() on every rank; if it raised a ClearGenError on any, all raise one: rank 0 the (first)
        error, which the CLI prints, the others a copy, which it does not. fn must run no collective: a
        rank that fails before it would leave the others waiting in it."""
        value, error = _attempt(fn)
        if self.mode != "none" and self.size > 1:
            self._raise_any(error, [m for _, m in self._all_gather((None, _message(error)))])
        elif error is not None:
            raise error
        return value

    def collect(self, fn: Callable[[], T | None]) -> list[T]:
        """Data mode: this rank's job of the round (fn), then every rank's result of the round, in job order,
        on rank 0 (the others get []). Any other mode: fn()'s result, unless None."""
        if self.mode != "data":
            value = fn()
            return [] if value is None else [value]
        value, error = _attempt(fn)
        pairs = self._all_gather((value, _message(error))) if self.size > 1 else [(value, _message(error))]
        self._raise_any(error, [m for _, m in pairs])
        return [v for v, _ in pairs if v is not None] if self.rank == 0 else []

    def _raise_any(self, own: ClearGenError | None, messages: list[str | None]) -> None:
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if not failed:
            return
        if self.rank != 0:
            raise ClearGenError(failed[0][1])  # rank 0 prints it; the CLI keeps this rank quiet
        if own is not None:
            raise own
        rank, message = failed[0]
        raise ClearGenError(f"rank {rank}: {message}")

    def own(self, error: ClearGenError) -> ClearGenError:
        """A failure of this rank alone in the middle of a sequence-mode run (the others wait in a
        collective, so there is no agreeing): named by rank, so that this rank prints it."""
        if self.sequence and self.size > 1 and not isinstance(error, ParallelError):
            return ParallelError(f"rank {self.rank}: {error}")
        return error

    # -------------------------------------------------------- sharing

    def my_jobs(self, jobs: int) -> list[int | None]:
        """The jobs this rank runs: all of them, or in data mode one a round (None: none this round)."""
        if self.mode != "data":
            return list(range(jobs))
        rounds = -(-jobs // self.size)
        mine = (k * self.size + self.rank for k in range(rounds))
        return [j if j < jobs else None for j in mine]

    def from_rank0(self, value: T) -> T:
        """Rank 0's value (a picklable object, e.g. the random seeds) on every rank."""
        if self.mode == "none" or self.size == 1:
            return value
        box = [value]
        self.comm(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def share(self, tensor: Tensor) -> Tensor:
        """Sequence mode: rank 0's tensor on every rank (the same shape everywhere). Else the tensor."""
        if not self.sequence or self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        self.comm(lambda: dist.broadcast(tensor, src=0))
        return tensor

    def mean(self, t: Tensor) -> Tensor:
        """`t` averaged over the ranks, in place (a training step's losses); `t` itself alone."""
        if self.size > 1:
            self.comm(lambda: dist.all_reduce(t))
            t /= self.size
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on one (a Ctrl-C on one rank stops them all)."""
        if self.size == 1:
            return flag
        t = torch.tensor([float(flag)], device=device)
        self.comm(lambda: dist.all_reduce(t))
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.size > 1:
            self.comm(dist.barrier)

    def _all_gather(self, value: Any) -> list:
        out = [None] * self.size
        self.comm(lambda: dist.all_gather_object(out, value))
        return out

    def comm(self, fn: Callable[[], T]) -> T:
        """A collective; if it fails (a rank died, or stayed silent past the timeout), ParallelError."""
        try:
            return fn()
        except RuntimeError as e:  # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError)
            raise ParallelError(
                f"rank {self.rank}: lost contact with the other ranks ({_cause(e, self.timeout_s)}); "
                "one of them stopped or hung: see its error line"
            ) from None


def _attempt(fn: Callable[[], T]) -> tuple[T | None, ClearGenError | None]:
    try:
        return fn(), None
    except ClearGenError as e:
        return None, e


def _message(error: ClearGenError | None) -> str | None:
    return None if error is None else str(error)


def _cause(error: RuntimeError, timeout_s: float) -> str:
    """'timed out after 600 s', or the backend's first sentence without its source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"timed out after {timeout_s:.0f} s"
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]  # gloo's "[.../pair.cc:537] Connection closed by peer ..."
    return text.split(". ")[0][:160]


# ---------------------------------------------------------------- joining torchrun's job


def start(requested: str, device: str) -> tuple[World, torch.device]:
    """This process's World and device: World() and --device alone, or under torchrun its rank, with the
    process group joined and the GPU cuda:LOCAL_RANK. The mode stays `requested` until `decide`."""
    check_mode(requested)
    if not launched():
        if requested != "auto":
            raise ConfigError(f"--parallel {requested} needs several processes: launch with {LAUNCH}")
        return World(), resolve_device(device)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = _rank_device(device, rank, int(os.environ.get("LOCAL_RANK", "0")))
    timeout = _timeout()
    _join(dev, rank, timeout)
    return World(rank, size, requested, timeout), dev


def _rank_device(device: str, rank: int, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for a GPU run (--device auto or cuda); the CPU for --device cpu."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; use --device cuda"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ParallelError(
            f"rank {rank}: torchrun started process {local_rank} of this node, which has {count} GPUs; "
            f"use --nproc-per-node {count}"
        )
    return torch.device("cuda", local_rank)


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout in seconds, e.g. 600")
    return value


def _join(device: torch.device, rank: int, timeout_s: float) -> None:
    """Join torchrun's process group once per process: NCCL on GPUs, gloo on CPUs."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a second run in this process
        if dist.get_backend() != backend:
            raise ConfigError(
                f"this process joined a {dist.get_backend()} group; a {backend} run needs a new process"
            )
        return
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # rendezvous or store failures
        raise ParallelError(f"rank {rank}: cannot join the torchrun job ({_cause(e, timeout_s)})") from None
    atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- head-parallel attention


def _slices(length: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of `parts` contiguous slices of `length` positions, sizes differing by <= 1."""
    base, extra = divmod(length, parts)
    bounds, start = [], 0
    for p in range(parts):
        end = start + base + (p < extra)
        bounds.append((start, end))
        start = end
    return bounds


def check_heads(world: World, heads: int) -> None:
    """Sequence mode splits attention heads over the ranks: they must divide `heads`."""
    if heads % world.size:
        fits = [p for p in range(2, heads + 1) if heads % p == 0]
        raise ConfigError(
            f"sequence mode splits attention heads over ranks: {heads} heads cannot be split over "
            f"{world.size}; use {', '.join(map(str, fits[:6]))} processes, or --parallel data"
        )


class SequenceShards:
    """Head-parallel ("Ulysses") CLEAR over the ranks of `world`: pass it as apply_clear(parallel=...).

    attention.py's input hook calls `shard_inputs` once it has tile-ordered the tokens, each CLEAR
    processor calls `gather_heads` before pooling and attention and `scatter_heads` after, and the
    output hook calls `gather_image` before restoring row-major order.
    """

    def __init__(self, world: World, heads: int, family=None):
        check_heads(world, heads)
        self.world, self.heads = world, heads
        self.family = family or models.family()  # the model's adapter: its call's argument names
        self.sizes: list[int] = []  # tokens of the joint sequence on each rank, this forward
        self.image_sizes: list[int] = []  # image tokens on each rank, this forward

    def shard_inputs(self, kwargs: dict) -> dict:
        """The transformer's inputs cut to this rank's slice of the joint [text ; image] sequence: its text
        and image hidden states and their RoPE ids (so positions still move with their tokens), and a
        ControlNet's residuals (added to the image tokens; each rank ran the whole ControlNet)."""
        text, hidden = kwargs["encoder_hidden_states"], kwargs["hidden_states"]  # (B, T, C'), (B, N, C)
        t = text.shape[1]
        bounds = _slices(t + hidden.shape[1], self.world.size)
        self.sizes = [end - start for start, end in bounds]
        self.image_sizes = [max(end, t) - max(start, t) for start, end in bounds]
        start, end = bounds[self.world.rank]
        txt, img = slice(min(start, t), min(end, t)), slice(max(start, t) - t, max(end, t) - t)
        txt_ids = kwargs["txt_ids"][0] if kwargs["txt_ids"].ndim == 3 else kwargs["txt_ids"]  # (T, 3)
        residuals = {
            name: [sample[:, img] for sample in kwargs[name]]
            for name in self.family.RESIDUALS
            if kwargs.get(name) is not None
        }
        return {
            **kwargs,
            "encoder_hidden_states": text[:, txt],
            "txt_ids": txt_ids[txt],
            "hidden_states": hidden[:, img],
            self.family.IMAGE_IDS: kwargs[self.family.IMAGE_IDS][img],
            **residuals,
        }

    def gather_heads(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L_p, H, D) each, this rank's tokens -> (B, L, H/P, D) each: every token, this rank's heads."""
        p, n = self.world.size, query.shape[1]
        qkv = torch.stack([query, key, value])  # (3, B, L_p, H, D)
        _, b, _, h, d = qkv.shape
        send = qkv.view(3, b, n, p, h // p, d).permute(3, 2, 0, 1, 4, 5)  # (P, L_p, 3, B, H/P, D)
        send = send.contiguous()
        recv = send.new_empty(sum(self.sizes), 3, b, h // p, d)  # (L, 3, B, H/P, D): rank 0's tokens first
        self.world.comm(lambda: dist.all_to_all_single(recv, send.flatten(0, 1), self.sizes, [n] * p))
        q, k, v = recv.permute(1, 2, 0, 3, 4).contiguous().unbind(0)  # (B, L, H/P, D) each
        return q, k, v

    def scatter_heads(self, out: Tensor) -> Tensor:
        """(B, L, H/P, D), every token of this rank's heads -> (B, L_p, H, D): its tokens, every head."""
        p, rank = self.world.size, self.world.rank
        b, _, hp, d = out.shape
        send = out.permute(1, 0, 2, 3).contiguous()  # (L, B, H/P, D): rank 0's tokens first
        n = self.sizes[rank]
        recv = send.new_empty(p * n, b, hp, d)  # (P * L_p, B, H/P, D): each rank's heads of these tokens
        self.world.comm(lambda: dist.all_to_all_single(recv, send, [n] * p, self.sizes))
        return recv.view(p, n, b, hp, d).permute(2, 1, 0, 3, 4).reshape(b, n, p * hp, d)  # (B, L_p, H, D)

    def gather_image(self, x: Tensor) -> Tensor:
        """(B, N_p, C), this rank's image tokens of the output -> (B, N, C), every rank's, in order."""
        b, n, c = x.shape
        width = max(self.image_sizes)
        padded = x.new_zeros(b, width, c)  # all_gather wants one shape on every rank
        padded[:, :n] = x
        parts = [torch.empty_like(padded) for _ in range(self.world.size)]
        self.world.comm(lambda: dist.all_gather(parts, padded))
        return torch.cat([part[:, :size] for part, size in zip(parts, self.image_sizes, strict=True)], dim=1)


# ---------------------------------------------------------------- the communication model

LINKS = {  # bytes per second one GPU can send: what `bench --what plan --gpus` prices the traffic at
    "NVLink": 900e9,  # H100 / H200 SXM NVLink 4, as quoted (both directions together)
    "PCIe": 64e9,  # PCIe 5.0 x16, one direction
    "400 Gb/s": 50e9,  # one 400 Gb/s NIC per GPU between nodes (InfiniBand NDR, RoCE)
}
ASSUMED_FLOPS = 400e12  # sustained bf16 FLOP/s per GPU for the compute column (H100 SXM dense peak: 989e12)


def head_parallel_bytes(shape: FluxShape, geo: Geometry, gpus: int, element: int = 2) -> float:
    """Bytes one rank sends per denoising step in sequence mode (it receives as many).

    Per layer, each rank holds L/P tokens of q, k and v (L = T + N, C channels) and sends all but its own
    heads' share: 3 L C (P - 1) / P^2 elements; the attention output comes back the same way, L C (P - 1)
    / P^2. Once a step the output's image tokens are gathered: N x in_channels x (P - 1) / P.
    """
    p, c, length = gpus, shape.hidden, geo.q_len
    per_layer = 4 * length * c * (p - 1) / p**2
    output = geo.image_len * shape.in_channels * (p - 1) / p
    return (per_layer * shape.layers + output) * element


def halo_bytes(shape: FluxShape, geo: Geometry, gpus: int, element: int = 2) -> float:
    """Bytes the busiest rank would send per step with the halo layout (on paper; not implemented).

    Each rank holds a band of h / P image rows and every text token. Per layer it sends its neighbours
    above and below the keys and values of the r - 1 rows next to them (an image query sees keys up to
    r - 1 rows away), all-gathers its share of the pooled keys and values (f > 1: every image query sees
    every pooled key), and all-reduces the text queries' partial attention over its band (T x C outputs
    and T x H softmax sums; a ring all-reduce sends 2 (P - 1) / P of them).
    """
    p, c = gpus, shape.hidden
    if p == 1:
        return 0.0
    halo = 2 * 2 * (geo.window - 1) * geo.width * c  # k and v, to two neighbours
    pooled = 2 * geo.down_len * c * (p - 1) / p
    text = 2 * geo.text_len * (c + shape.heads) * (p - 1) / p
    output = geo.image_len * shape.in_channels * (p - 1) / p
    return ((halo + pooled + text) * shape.layers + output) * element
