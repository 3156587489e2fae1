"""What a benchmark runs on and whether CLEAR computes the right thing there: `--what check` (CLEAR's kernel
against the dense reference on one block's attention, sampled query rows where the reference would not fit;
also the attention op's own check) and `--what env` (versions, card, free memory).
"""

from __future__ import annotations

import torch

from ..attention.backends import DENSE_MAX_ELEMENTS, choose, clear_attention
from ..core import geometry as G
from ..core.device import device_name
from ..run.measure import random_qkv

CHECK_ATOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # CLEAR vs dense reference
CHECK_ROWS = 256  # query rows per sampled place where the dense reference over every row would not fit


def dense_fits(geo: G.Geometry) -> bool:
    """The dense reference (the dense backend) takes this size."""
    return geo.q_len * geo.kv_len <= DENSE_MAX_ELEMENTS


def check_attention(
    geo: G.Geometry,
    heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str = "auto",
) -> dict:
    """CLEAR (`backend`, in dtype) against the dense masked SDPA reference in float32 on the same inputs:
    every query row where the dense reference fits, else the rows of check_rows."""
    q, k, v = random_qkv(geo, heads, head_dim, device, dtype, seed=1)
    scale = head_dim**-0.5
    rows = check_rows(geo).to(q.device)
    out = clear_attention(q, k, v, geo, scale, backend)[:, :, rows].float()
    err = (out - reference_rows(q, k, v, geo, scale, rows)).abs().max().item()
    return {
        "check_res": geo.height * 16, "check_max_err": err, "check_ok": bool(err <= CHECK_ATOL[dtype]),
        "check_tol": CHECK_ATOL[dtype], "check_rows": "all" if len(rows) == geo.q_len else len(rows),
    }  # fmt: skip


def check_rows(geo: G.Geometry) -> torch.Tensor:
    """Every query row where the dense reference fits, else CHECK_ROWS rows at each of: the first text rows,
    the first image rows (the top-left tiles), the middle and the last (bottom-right)."""
    if dense_fits(geo):
        return torch.arange(geo.q_len)
    starts = (0, geo.text_len, (geo.text_len + geo.q_len) // 2, geo.q_len - CHECK_ROWS)
    return torch.cat([torch.arange(s, min(s + CHECK_ROWS, geo.q_len)) for s in starts]).unique()


def reference_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: G.Geometry, scale: float, rows: torch.Tensor
) -> torch.Tensor:
    """Masked SDPA in float32 over the query rows `rows` (B, H, len(rows), D): CLEAR's mask rows evaluated
    pair by pair (geometry.make_mask_mod), no block lists."""
    import torch.nn.functional as F

    kv = torch.arange(geo.kv_len, device=q.device)
    mask = G.make_mask_mod(geo, q.device)(0, 0, rows[:, None], kv[None, :])  # (rows, kv_len) bool
    q_rows, k, v = q[:, :, rows].float(), k.float(), v.float()
    return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask, scale=scale)


def check_row(
    base: dict, geo: G.Geometry, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """`--what check` at one size: CLEAR's kernel against the dense reference on one block's attention
    (heads x head_dim); `base`: the size's row (suite's _base_row)."""
    row = {**base, "heads": heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch.")}
    return {**row, **check_attention(geo, heads, head_dim, device, dtype)}


def attention_check(
    geo: G.Geometry,
    heads: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str = "auto",
) -> dict:
    """The attention part's check: the backend's kernel (auto: the device's), and the backend running its
    text rows apart (its `split`: flex-split for flex) when the text rows end on a block boundary (its error
    in `check_split_max_err`; both must pass)."""
    chosen = choose(backend, device, geo)
    check = check_attention(geo, heads, head_dim, device, dtype, chosen.name)
    if chosen.split is not None and geo.text_len % G.BLOCK == 0:
        split = check_attention(geo, heads, head_dim, device, dtype, chosen.split)
        check["check_split_max_err"] = split["check_max_err"]
        check["check_ok"] = check["check_ok"] and split["check_ok"]
    return check


# ---------------------------------------------------------------- env

ENV_PACKAGES = ("triton", "diffusers", "torchao", "transformers", "huggingface-hub", "flash-attn-4")


def env_row(device: torch.device) -> dict:
    """What runs the benchmarks: Python and the versions of torch and its neighbours, the card, its memory."""
    import platform
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    row = {
        "what": "env", "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), **{name: version(name) for name in ENV_PACKAGES},
        "capability": None, "free_gb": None, "total_gb": None,
    }  # fmt: skip
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        major, minor = torch.cuda.get_device_capability(device)
        row.update(capability=f"{major}.{minor}", free_gb=free / 1e9, total_gb=total / 1e9)
    return row
