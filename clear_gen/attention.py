"""CLEAR attention for diffusers' FluxTransformer2DModel: processor, backends, apply/remove.

`apply_clear` does four things to a transformer, all undone by `remove_clear`:
1. a `ClearAttnProcessor` on every double and single block (same signature as FluxAttnProcessor);
2. RoPE theta multiplied by `ntk_factor`;
3. hooks that tile-order the image tokens and their RoPE positions at the transformer's input and
   restore row-major order at its output, so every layer works on tiles with no per-layer gather; the
   positions fed to RoPE are exact integers whatever dtype `img_ids` came in (see positions.py); under
   torchrun's sequence mode the hooks also keep this rank's slice of the sequence, and the processors
   trade it for every token of this rank's heads around attention (parallel.SequenceShards);
4. optionally, a CLEAR checkpoint's projections and spatial weights (see `_load` for where the
   originals are kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from . import geometry as G
from .errors import CheckpointError, ConfigError
from .positions import GridCache, exact_ids

BACKENDS = ("auto", "flex", "dense")
DENSE_MAX_ELEMENTS = 1 << 26  # q_len * kv_len; beyond it the dense mask and scores are too large


@dataclass
class ClearConfig:
    window: int  # r: image keys with dy^2 + dx^2 < r^2
    down_factor: int = 1  # f: pooled key per f x f cell; 1 = none
    proportional_attention: bool = False  # scale sqrt(log_4608(N) / d) instead of 1/sqrt(d)
    ntk_factor: float = 1.0  # RoPE theta multiplier
    backend: str = "auto"  # auto | flex | dense


@dataclass
class _Layout:
    """What one forward pass needs: the geometry and the permutation that tile-orders its tokens."""

    geometry: G.Geometry
    perm: Tensor  # (N,) row-major index of each tile-order position, on the device
    inv: Tensor  # (N,) tile-order position of each row-major token


@dataclass
class _ClearState:
    """Shared by the transformer's hooks and all its processors."""

    config: ClearConfig
    layout: _Layout | None = None
    originals: dict[str, Tensor] = field(default_factory=dict)  # replaced parameters' data (see _load)
    processors: dict[str, object] = field(default_factory=dict)  # the processors we replaced
    theta: float = 10000.0
    hooks: list = field(default_factory=list)
    grids: GridCache = field(default_factory=GridCache)
    parallel: object | None = None  # parallel.SequenceShards in torchrun's sequence mode, else None


# ---------------------------------------------------------------- backends


_compiled_flex = None
FLEX_RECOMPILE_LIMIT = 64  # kernels per process: one per geometry, dtype and batch (a few per run)


def _flex(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """Compiled FlexAttention with the analytic block mask. (B, H, L, D) in and out."""
    return compiled_flex(query, key, value, G.block_mask(geo, str(query.device)), scale)


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


@lru_cache(maxsize=4)
def _cached_dense_mask(geo: G.Geometry, device: str) -> Tensor:
    return G.dense_mask(geo, device)


def _dense(query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float) -> Tensor:
    """SDPA with an explicit boolean mask: the small-size reference. (B, H, L, D) in and out."""
    if geo.q_len * geo.kv_len > DENSE_MAX_ELEMENTS:
        raise ConfigError(
            f"the dense backend needs a {geo.q_len} x {geo.kv_len} mask, too large; use backend='flex'"
        )
    mask = _cached_dense_mask(geo, str(query.device))  # (Lq, Lkv) bool
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def clear_attention(
    query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float, backend: str = "auto"
) -> Tensor:
    """CLEAR attention over a tile-ordered sequence (keys include any down-sampled tokens).

    query (B, H, q_len, D), key/value (B, H, kv_len, D) -> (B, H, q_len, D).
    """
    run = _flex if resolve_backend(backend, query.device) == "flex" else _dense
    return run(query, key, value, geo, scale)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type in ("cuda", "cpu") else "dense"
    return backend


# ---------------------------------------------------------------- the processor


def pool_keys(x: Tensor, geo: G.Geometry, inv: Tensor, weight: Tensor) -> Tensor:
    """Down-sampled tokens: sum_{i,j<f} s[i,j] x[cell_y*f+i, cell_x*f+j]. x: (B, N, H, D) tile order.

    Returns (B, M, H, D), one token per f x f cell. Attention treats every down-sampled key alike (all
    image queries see all of them, text queries none), so their order is free: cells come in tile order,
    pooled from strided views of x without a copy of it. Tiles whose sides f does not divide fall back to
    a gather into row-major order.
    """
    f, (th, tw) = geo.down_factor, geo.tile
    s = weight.view(f, f)
    if th % f or tw % f:
        grid = x[:, inv].unflatten(1, (geo.height // f, f, geo.width // f, f))  # (B, h/f, f, w/f, f, H, D)
        return _weighted_cells(grid, s).flatten(1, 2)  # (B, M, H, D), row-major cells
    pieces = []
    for rows, band in _tile_bands(x, geo):  # band: (B, R, rows * w, H, D), R tile rows of `rows` rows
        main = geo.width // tw * tw  # columns in whole-width tiles; the rest is the edge tile
        if main:
            tiles = band[:, :, : rows * main].unflatten(2, (main // tw, rows // f, f, tw // f, f))
            pieces.append(_weighted_cells(tiles, s).flatten(1, -3))  # (B, cells, H, D)
        if geo.width > main:
            edge = band[:, :, rows * main :].unflatten(2, (rows // f, f, (geo.width - main) // f, f))
            pieces.append(_weighted_cells(edge, s).flatten(1, -3))
    return torch.cat(pieces, dim=1)


def _tile_bands(x: Tensor, geo: G.Geometry) -> list[tuple[int, Tensor]]:
    """Tile-ordered (B, N, H, D) as rows of tiles: whole-height ones, then the cut last one if any."""
    th, w = geo.tile[0], geo.width
    whole = geo.height // th
    bands = [(th, x[:, : whole * th * w].unflatten(1, (whole, th * w)))] if whole else []
    if geo.height > whole * th:
        rest = geo.height - whole * th
        bands.append((rest, x[:, whole * th * w :].unflatten(1, (1, rest * w))))
    return bands


def _weighted_cells(v: Tensor, s: Tensor) -> Tensor:
    """(..., a=f, cols, b=f, H, D) -> (..., cols, H, D): sum of s[a, b] * v[..., a, :, b], in float32."""
    f = s.shape[0]
    out = torch.zeros(v[..., 0, :, 0, :, :].shape, dtype=torch.float32, device=v.device)
    for a in range(f):
        for b in range(f):
            out.add_(v[..., a, :, b, :, :].float() * s[a, b].float())
    return out.to(v.dtype)


class ClearAttnProcessor(torch.nn.Module):
    """FluxAttnProcessor with CLEAR's local attention. An nn.Module so that `spatial_weight` is
    saved and loaded as `...attn.processor.spatial_weight`, as in the published checkpoints."""

    def __init__(self, state: _ClearState, like: Tensor):
        super().__init__()
        self._state = [state]  # a list, so nn.Module does not try to register or copy it
        f = state.config.down_factor
        if f > 1:
            init = torch.full((1, 1, 1, f, 1, f, 1), 1.0 / f**2, dtype=like.dtype, device=like.device)
            self.spatial_weight = torch.nn.Parameter(init, requires_grad=False)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        state = self._state[0]
        layout = state.layout
        assert layout is not None, "CLEAR attention runs inside its transformer's forward (hooks set it up)"
        assert attention_mask is None, "CLEAR attention takes no attention_mask"
        geo = layout.geometry
        # 1. Projections and q/k RMSNorm, exactly as FluxAttnProcessor: (B, L, H, D).
        query, key, value = _project(hidden_states, attn.head_dim, attn.to_q, attn.to_k, attn.to_v)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            assert state.parallel is not None or encoder_hidden_states.shape[1] == geo.text_len
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            eq, ek, ev = _project(encoder_hidden_states, attn.head_dim, *projections)
            query = torch.cat([attn.norm_added_q(eq), query], dim=1)  # (B, T + N, H, D): text first
            key = torch.cat([attn.norm_added_k(ek), key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if state.parallel is not None:  # sequence mode: (B, T + N, H/P, D), every token of this rank's heads
            query, key, value = state.parallel.gather_heads(query, key, value)
        assert query.shape[1] == geo.q_len, (query.shape, geo)
        # 2. Down-sampled keys and values from post-norm, post-RoPE keys, appended after the image.
        if geo.down_factor > 1:
            image = slice(geo.text_len, None)
            key = torch.cat([key, pool_keys(key[:, image], geo, layout.inv, self.spatial_weight)], dim=1)
            value = torch.cat([value, pool_keys(value[:, image], geo, layout.inv, self.spatial_weight)], 1)
        # 3. Attention over (B, H, L, D).
        scale = G.attention_scale(geo, attn.head_dim, state.config.proportional_attention)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D)
        out = clear_attention(q, k, v, geo, scale, state.config.backend).transpose(1, 2)  # (B, T + N, H, D)
        if state.parallel is not None:  # sequence mode: back to this rank's tokens, every head
            out = state.parallel.scatter_heads(out)
        out = out.flatten(2, 3).to(query.dtype)  # (B, L, H * D)
        # 4. Output projections, exactly as FluxAttnProcessor.
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]  # this rank's text tokens in sequence mode
        text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def _project(x: Tensor, head_dim: int, *linears) -> list[Tensor]:
    """(B, L, C) -> one (B, L, H, D) per linear."""
    return [linear(x).unflatten(-1, (-1, head_dim)) for linear in linears]


# ---------------------------------------------------------------- token order hooks


@lru_cache(maxsize=8)
def _device_layout(geo: G.Geometry, device: str) -> _Layout:
    """The layout of a geometry with its permutations on the device, copied there once."""
    perm = G.tile_order(geo.height, geo.width, geo.tile).to(device)
    return _Layout(geo, perm, G.inverse_order(geo.height, geo.width, geo.tile).to(device))


_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")


def _pre_hook(state: _ClearState, module, args: tuple, kwargs: dict):
    """Tile-order hidden_states and exact img_ids (positions.py) and record the layout for this forward."""
    kwargs = {**dict(zip(_ARGS, args, strict=False)), **kwargs}  # positional arguments by name
    hidden, text, img_ids = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["img_ids"]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    grid = state.grids(img_ids)  # found once per ids tensor, not at every step (no GPU sync)
    h, w, f = grid.height, grid.width, state.config.down_factor
    if h % f or w % f:
        raise ConfigError(f"CLEAR with down factor {f} needs a token grid divisible by {f}; got {h} x {w}")
    geo = G.image_geometry(text.shape[1], h, w, state.config.window, f)
    state.layout = _device_layout(geo, str(hidden.device))
    kwargs["hidden_states"] = hidden[:, state.layout.perm]  # (B, N, C) tile order
    kwargs["img_ids"] = exact_ids(grid, hidden.device)[state.layout.perm]  # positions move with tokens
    if state.parallel is not None:  # sequence mode: this rank's slice of [text ; image]
        kwargs = state.parallel.shard_inputs(kwargs)
    return (), kwargs


def _post_hook(state: _ClearState, module, args, output):
    """Back to row-major order (in sequence mode, once every rank's image tokens are gathered)."""
    inv = state.layout.inv
    state.layout = None
    sample = output[0] if isinstance(output, tuple) else output.sample
    if state.parallel is not None:
        sample = state.parallel.gather_image(sample)  # (B, N, C): every rank's image tokens, tile order
    if isinstance(output, tuple):
        return (sample[:, inv], *output[1:])
    output.sample = sample[:, inv]
    return output


# ---------------------------------------------------------------- checkpoints


def _attn_modules(transformer) -> dict[str, torch.nn.Module]:
    """'transformer_blocks.{i}.attn' / 'single_transformer_blocks.{i}.attn' -> module."""
    out = {}
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, kind)):
            out[f"{kind}.{i}.attn"] = block.attn
    return out


def expected_checkpoint(transformer, down_factor: int) -> dict[str, torch.Size]:
    """Keys and shapes of a published CLEAR checkpoint for this transformer."""
    shapes = {}
    for name, attn in _attn_modules(transformer).items():
        layers = ["to_q", "to_k", "to_v"] + (["to_out.0"] if name.startswith("transformer_") else [])
        for layer in layers:
            module = attn.get_submodule(layer)
            shapes[f"{name}.{layer}.weight"] = module.weight.shape
            if module.bias is not None:
                shapes[f"{name}.{layer}.bias"] = module.bias.shape
        if down_factor > 1:
            shapes[f"{name}.processor.spatial_weight"] = torch.Size((1, 1, 1, down_factor, 1, down_factor, 1))
    return shapes


def _first(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_checkpoint(transformer, state_dict: Mapping[str, Tensor], down_factor: int) -> None:
    """Refuse a checkpoint that does not fit, naming its first offending keys."""
    expected = expected_checkpoint(transformer, down_factor)
    spatial = [k for k in state_dict if k.endswith("processor.spatial_weight")]
    if spatial and down_factor == 1:
        f = state_dict[spatial[0]].shape[3] if state_dict[spatial[0]].dim() == 7 else "?"
        raise CheckpointError(
            f"this CLEAR checkpoint is down-sampled (f = {f}: {_first(spatial, 1)}) but down_factor=1; "
            f"pass down_factor={f}"
        )
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing:
        raise CheckpointError(
            f"CLEAR checkpoint lacks {len(missing)} keys the model needs: {_first(missing)}"
        )
    if unexpected:
        raise CheckpointError(f"CLEAR checkpoint has {len(unexpected)} unexpected keys: {_first(unexpected)}")
    wrong = [k for k, shape in expected.items() if tuple(state_dict[k].shape) != tuple(shape)]
    if wrong:
        k = sorted(wrong)[0]
        raise CheckpointError(
            f"CLEAR checkpoint does not fit this model: {k} is {tuple(state_dict[k].shape)}, "
            f"the model wants {tuple(expected[k])} ({len(wrong)} keys differ)"
        )


def _load(transformer, state: _ClearState, state_dict: Mapping[str, Tensor]) -> None:
    """Put the checkpoint's tensors in place, keeping the replaced originals for remove_clear.

    A tensor already on its parameter's device and in its dtype is swapped in without a copy (the
    parameter then shares the checkpoint's storage, and the original stays where it was): with both
    sets on the GPU, apply and remove cost nothing. Any other is copied in, the original going to
    (pinned, on a CUDA machine) CPU memory.
    """
    with torch.no_grad():
        for key, value in state_dict.items():
            param = transformer.get_parameter(key)
            if key.endswith("spatial_weight"):
                param.copy_(value)
            elif value.device == param.device and value.dtype == param.dtype:
                state.originals.setdefault(key, param.data)
                param.data = value
            else:
                state.originals.setdefault(key, _cpu_copy(param))
                param.copy_(value)


def _cpu_copy(t: Tensor) -> Tensor:
    pin = t.is_cuda  # page-locked: the copies back to the GPU run at full bus speed
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t.detach())


def _restore(transformer, originals: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in originals.items():
            param = transformer.get_parameter(key)
            if value.device == param.device:
                param.data = value
            else:
                param.copy_(value, non_blocking=True)  # from pinned memory: asynchronous


# ---------------------------------------------------------------- public API


def _validate(config: ClearConfig) -> None:
    if not isinstance(config.window, int) or config.window < 1:
        raise ConfigError(f"window must be a positive integer, got {config.window!r}")
    if not isinstance(config.down_factor, int) or config.down_factor < 1:
        raise ConfigError(f"down_factor must be a positive integer, got {config.down_factor!r}")
    if not config.ntk_factor > 0:
        raise ConfigError(f"ntk_factor must be positive, got {config.ntk_factor!r}")
    resolve_backend(config.backend, torch.device("cpu"))


def apply_clear(
    transformer,
    *,
    window: int,
    down_factor: int = 1,
    state_dict: Mapping[str, Tensor] | None = None,
    proportional_attention: bool = False,
    ntk_factor: float = 1.0,
    backend: str = "auto",
    parallel: object | None = None,
) -> None:
    """Turn a diffusers FluxTransformer2DModel into its CLEAR version, in place (see module docstring).

    Applying again first removes the previous CLEAR. A checkpoint that does not fit is refused
    before anything changes. `parallel`: a parallel.SequenceShards for torchrun's sequence mode.
    """
    config = ClearConfig(window, down_factor, proportional_attention, ntk_factor, backend)
    _validate(config)
    if any(getattr(a, "fused_projections", False) for a in _attn_modules(transformer).values()):
        raise ConfigError("CLEAR needs separate q/k/v projections: call transformer.unfuse_qkv_projections()")
    if state_dict is not None:
        check_checkpoint(transformer, state_dict, down_factor)
    remove_clear(transformer)
    state = _ClearState(config, theta=transformer.pos_embed.theta, parallel=parallel)
    like = transformer.x_embedder.weight
    for name, attn in _attn_modules(transformer).items():
        state.processors[name] = attn.processor
        attn.set_processor(ClearAttnProcessor(state, like))
    if state_dict is not None:
        _load(transformer, state, state_dict)
    transformer.pos_embed.theta = state.theta * ntk_factor
    state.hooks = [
        transformer.register_forward_pre_hook(lambda m, a, k: _pre_hook(state, m, a, k), with_kwargs=True),
        transformer.register_forward_hook(lambda m, a, o: _post_hook(state, m, a, o)),
    ]
    transformer._clear_state = state


def remove_clear(transformer) -> None:
    """Back to the stock attention: processors, RoPE theta, token order and replaced weights restored."""
    state: _ClearState | None = getattr(transformer, "_clear_state", None)
    if state is None:
        return
    for handle in state.hooks:
        handle.remove()
    modules = _attn_modules(transformer)
    for name, processor in state.processors.items():
        modules[name].set_processor(processor)
    _restore(transformer, state.originals)
    transformer.pos_embed.theta = state.theta
    del transformer._clear_state


def clear_config(transformer) -> ClearConfig | None:
    """The CLEAR settings of a transformer, or None when it runs stock attention."""
    state = getattr(transformer, "_clear_state", None)
    return None if state is None else state.config
