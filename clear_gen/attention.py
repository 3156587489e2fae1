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
   originals are kept). On a quantized transformer (torchao, GGUF, bitsandbytes) the projections come in
   as plain Linear layers in the compute dtype, and remove_clear puts the quantized ones back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
    layout: _Layout | None = None  # of the latest forward (set by the input hook)
    originals: dict[str, Tensor] = field(default_factory=dict)  # replaced parameters' data (see _load)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # quantized projections swapped out
    processors: dict[str, object] = field(default_factory=dict)  # the processors we replaced
    theta: float = 10000.0
    hooks: list = field(default_factory=list)
    grids: GridCache = field(default_factory=GridCache)
    parallel: object | None = None  # parallel.SequenceShards in torchrun's sequence mode, else None


# ---------------------------------------------------------------- backends


_compiled_flex = None
FLEX_RECOMPILE_LIMIT = 64  # kernels per process: one per geometry, dtype and batch (a few per run)


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


@torch.compiler.disable  # outside compiled blocks (--compile): flex is compiled on its own, static shapes
def clear_attention(
    query: Tensor, key: Tensor, value: Tensor, geo: G.Geometry, scale: float, backend: str = "auto"
) -> Tensor:
    """CLEAR attention over a tile-ordered sequence (keys include any down-sampled tokens).

    query (B, H, q_len, D), key/value (B, H, kv_len, D) -> (B, H, q_len, D).
    """
    run = _flex if resolve_backend(backend, query.device) == "flex" else _dense
    return run(query, key, value, geo, scale)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    check_backend(backend)
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
        state = self._state[0]
        layout = state.layout
        assert layout is not None, "CLEAR attention runs inside its transformer's forward (hooks set it up)"
        assert attention_mask is None, "CLEAR attention takes no attention_mask"
        geo = layout.geometry
        # 1. Projections, q/k RMSNorm and RoPE, as FluxAttnProcessor computes them: (B, L, H, D), text
        # first. Norm and RoPE run over token slices (the same values; see _normed_rotated). In sequence
        # mode L is this rank's slice of the tokens.
        text, head_dim, parallel = encoder_hidden_states, attn.head_dim, state.parallel
        if text is not None:
            assert parallel is not None or text.shape[1] == geo.text_len
        extra = geo.kv_len - geo.q_len if parallel is None else 0  # room for the down-sampled keys
        q_parts = [(attn.add_q_proj(text), attn.norm_added_q)] if text is not None else []
        q_parts.append((attn.to_q(hidden_states), attn.norm_q))
        query = _normed_rotated(q_parts, image_rotary_emb, head_dim)
        del q_parts
        k_parts = [(attn.add_k_proj(text), attn.norm_added_k)] if text is not None else []
        k_parts.append((attn.to_k(hidden_states), attn.norm_k))
        key = _normed_rotated(k_parts, image_rotary_emb, head_dim, extra=extra)
        del k_parts
        v_parts = [attn.add_v_proj(text)] if text is not None else []
        v_parts.append(attn.to_v(hidden_states))  # (B, N, H * D)
        # 2. Down-sampled keys and values (from post-norm, post-RoPE keys), after the image's.
        if parallel is None:
            assert query.shape[1] == geo.q_len, (query.shape, geo)
            key, value = self._with_down_sampled(key, v_parts, geo, layout, head_dim)
        else:  # sequence mode: every token for this rank's heads, (B, T + N, H/P, D), then pool
            value = torch.cat(v_parts, dim=1) if len(v_parts) > 1 else v_parts[0]
            query, key, value = parallel.gather_heads(query, key, value.unflatten(-1, (-1, head_dim)))
            assert query.shape[1] == geo.q_len, (query.shape, geo)
            if geo.down_factor > 1:
                image = slice(geo.text_len, geo.q_len)
                key = torch.cat([key, pool_keys(key[:, image], geo, layout.inv, self.spatial_weight)], dim=1)
                value = torch.cat(
                    [value, pool_keys(value[:, image], geo, layout.inv, self.spatial_weight)], 1
                )
        del v_parts
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

    def _with_down_sampled(self, key: Tensor, v_parts: list[Tensor], geo: G.Geometry, layout, head_dim: int):
        """(key, value) with the pooled keys written into key's spare rows and the pooled values appended:
        (B, kv_len, H, D) each."""
        if geo.down_factor > 1:
            keys = key[:, geo.text_len : geo.q_len]
            key[:, geo.q_len :] = pool_keys(keys, geo, layout.inv, self.spatial_weight)
            values = v_parts[-1][:, -geo.image_len :].unflatten(-1, (-1, head_dim))  # (B, N, H, D)
            v_parts.append(pool_keys(values, geo, layout.inv, self.spatial_weight).flatten(2, 3))
        value = torch.cat(v_parts, dim=1) if len(v_parts) > 1 else v_parts[0]  # (B, kv_len, H * D)
        return key, value.unflatten(-1, (-1, head_dim))  # (B, kv_len, H, D)


ROPE_CHUNK_TOKENS = 8192  # tokens per slice of q/k norm and RoPE (whose float32 temporaries are 6x q's size)


def _normed_rotated(
    parts: list[tuple[Tensor, torch.nn.Module]],
    rope: tuple[Tensor, Tensor] | None,
    head_dim: int,
    extra: int = 0,
) -> Tensor:
    """RMSNorm then RoPE of projected queries or keys: [(text, its norm),] (image, its norm), each
    (B, l, H * D) -> (B, T + N + extra, H, D); the last `extra` rows are left for the caller.

    FluxAttnProcessor norms each part, concatenates them and applies RoPE to the whole; both work token
    by token, so running them over slices of ROPE_CHUNK_TOKENS tokens straight into one output gives the
    same values without a concatenated copy or RoPE's full-size float32 temporaries.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    length, out, start = sum(x.shape[1] for x, _ in parts), None, 0
    for x, norm in parts:
        for s in range(0, x.shape[1], ROPE_CHUNK_TOKENS):
            piece = norm(x[:, s : s + ROPE_CHUNK_TOKENS].unflatten(-1, (-1, head_dim)))  # (B, l, H, D)
            rows = slice(start + s, start + s + piece.shape[1])
            if rope is not None:
                piece = apply_rotary_emb(piece, (rope[0][rows], rope[1][rows]), sequence_dim=1)
            if out is None:
                out = piece.new_empty(
                    (piece.shape[0], length + extra, *piece.shape[2:])
                )  # (B, L + extra, H, D)
            out[:, rows] = piece
        start += x.shape[1]
    return out


# ---------------------------------------------------------------- token order hooks


@lru_cache(maxsize=8)
def _device_layout(geo: G.Geometry, device: str) -> _Layout:
    """The layout of a geometry with its permutations on the device, copied there once."""
    perm = G.tile_order(geo.height, geo.width, geo.tile).to(device)
    return _Layout(geo, perm, G.inverse_order(geo.height, geo.width, geo.tile).to(device))


_ARGS = (  # FluxTransformer2DModel.forward's positional parameters
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
    "joint_attention_kwargs",
    "controlnet_block_samples",
    "controlnet_single_block_samples",
)
_CONTROLNET_ARGS = ("hidden_states", "controlnet_cond", "controlnet_mode", "conditioning_scale")
_CONTROLNET_ARGS += _ARGS[1:7]  # FluxControlNetModel.forward's
_RESIDUALS = ("controlnet_block_samples", "controlnet_single_block_samples")  # lists of (B, N, C) row-major


def _is_controlnet(module) -> bool:
    return hasattr(module, "controlnet_x_embedder")


def _pre_hook(state: _ClearState, module, args: tuple, kwargs: dict):
    """Tile-order hidden_states, exact img_ids (positions.py) and a ControlNet's residuals; record the layout
    for this forward."""
    names = _CONTROLNET_ARGS if _is_controlnet(module) else _ARGS
    kwargs = {**dict(zip(names, args, strict=False)), **kwargs}  # positional arguments by name
    hidden, text, img_ids = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["img_ids"]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    grid = state.grids(img_ids)  # found once per ids tensor, not at every step (no GPU sync)
    h, w, f = grid.height, grid.width, state.config.down_factor
    if h % f or w % f:
        raise ConfigError(f"CLEAR with down factor {f} needs a token grid divisible by {f}; got {h} x {w}")
    text_len = text.shape[1] + int(getattr(module, "union", False))  # a union ControlNet adds a mode token
    geo = G.image_geometry(text_len, h, w, state.config.window, f)
    state.layout = _device_layout(geo, str(hidden.device))
    perm = state.layout.perm
    kwargs["hidden_states"] = hidden[:, perm]  # (B, N, C) tile order
    kwargs["img_ids"] = exact_ids(grid, hidden.device)[perm]  # positions move with tokens
    for name in _RESIDUALS:  # a ControlNet's, added to the image tokens after each block: tile order too
        if kwargs.get(name) is not None:
            kwargs[name] = [sample[:, perm] for sample in kwargs[name]]
    if state.parallel is not None:  # sequence mode: this rank's slice of [text ; image]
        kwargs = state.parallel.shard_inputs(kwargs)
    return (), kwargs


def _control_hook(state: _ClearState, module, args: tuple):
    """A ControlNet's condition, packed (B, N, C) row-major as its controlnet_x_embedder takes it (whether the
    pipeline packed it or its input_hint_block did): tile order, like the hidden_states it is added to."""
    return (args[0][:, state.layout.perm], *args[1:])


def _post_hook(state: _ClearState, module, args, output):
    """Back to row-major order (in sequence mode, once every rank's image tokens are gathered): the
    transformer's sample, or every residual a ControlNet returns. The layout stays recorded: a
    gradient-checkpointed backward pass runs the blocks (and so the processors) again after the forward has
    returned."""
    inv = state.layout.inv
    if _is_controlnet(module):
        rows = [None if s is None else [t[:, inv] for t in s] for s in _residuals(output)]
        if isinstance(output, tuple):
            return tuple(rows)
        output.controlnet_block_samples, output.controlnet_single_block_samples = rows
        return output
    sample = output[0] if isinstance(output, tuple) else output.sample
    if state.parallel is not None:
        sample = state.parallel.gather_image(sample)  # (B, N, C): every rank's image tokens, tile order
    if isinstance(output, tuple):
        return (sample[:, inv], *output[1:])
    output.sample = sample[:, inv]
    return output


def _residuals(output) -> tuple:
    if isinstance(output, tuple):
        return output
    return output.controlnet_block_samples, output.controlnet_single_block_samples


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
            module = _base(attn.get_submodule(layer))
            shapes[f"{name}.{layer}.weight"] = torch.Size((module.out_features, module.in_features))
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
    (pinned, on a CUDA machine) CPU memory. A quantized projection is never written into, and a
    sequentially offloaded one holds no data to write into (`_swapped_whole`): a plain Linear holding
    the checkpoint's tensors takes its place, and the original module waits in `state.modules`.
    """
    swapped: dict[str, dict[str, Tensor]] = {}  # module name -> {"weight": ..., "bias": ...}
    with torch.no_grad():
        for key, value in state_dict.items():
            name, _, kind = key.rpartition(".")
            if kind != "spatial_weight" and _swapped_whole(_base(transformer.get_submodule(name))):
                swapped.setdefault(name, {})[kind] = value
                continue
            param = transformer.get_parameter(_base_key(transformer, key))
            if kind == "spatial_weight":
                param.copy_(value)
            elif value.device == param.device and value.dtype == param.dtype:
                state.originals.setdefault(key, param.data)
                param.data = value
            else:
                state.originals.setdefault(key, _cpu_copy(param))
                param.copy_(value)
        for name, tensors in swapped.items():
            original = _base(transformer.get_submodule(name))
            state.modules.setdefault(name, original)
            transformer.set_submodule(
                _base_name(transformer, name), _plain_linear(original, tensors, transformer.dtype)
            )


def _base(module: torch.nn.Module) -> torch.nn.Module:
    """The projection itself: under a LoRA (peft's LoraLayer wraps it as `base_layer`), the wrapped one."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _base_name(transformer, name: str) -> str:
    """`name`, or `name.base_layer` when a LoRA wraps that projection now: CLEAR's weights and the originals
    it keeps always belong to the projection under the LoRA, whether the LoRA came before CLEAR or after."""
    module = transformer.get_submodule(name)
    return f"{name}.base_layer" if hasattr(module, "get_base_layer") and module is not _base(module) else name


def _base_key(transformer, key: str) -> str:
    """A parameter key of the checkpoint's format ('...attn.to_q.weight') as it is named now."""
    name, _, kind = key.rpartition(".")
    return f"{_base_name(transformer, name)}.{kind}" if kind != "spatial_weight" else key


def _swapped_whole(module: torch.nn.Module) -> bool:
    """A projection replaced as a module rather than in its parameters: one in quantized storage (a torchao
    tensor-subclass weight, a GGUFLinear holding a GGUFParameter, a bitsandbytes Linear4bit; anything
    but a plain Linear with a plain Parameter, so nothing is ever copied into packed bytes), or one under
    accelerate's sequential offload (its weight is on 'meta', the data in the hook's CPU map)."""
    quantized = type(module) is not torch.nn.Linear or type(module.weight) is not torch.nn.Parameter
    return quantized or getattr(getattr(module, "_hf_hook", None), "offload", False)


def _plain_linear(original: torch.nn.Module, tensors: dict, dtype: torch.dtype) -> torch.nn.Linear:
    """A Linear of `original`'s size holding the checkpoint's tensors in the compute dtype, on `original`'s
    device (no copy when a tensor is already there in that dtype). Under sequential offload (an accelerate
    hook that offloads `original`) it is offloaded alike, to run on the hook's device."""
    hook = getattr(original, "_hf_hook", None)
    offloaded = getattr(hook, "offload", False)
    device = torch.device("cpu") if offloaded else original.weight.device
    linear = torch.nn.Linear(original.in_features, original.out_features, "bias" in tensors, device="meta")
    for kind, value in tensors.items():
        setattr(linear, kind, torch.nn.Parameter(value.to(device, dtype), requires_grad=False))
    if offloaded:
        from accelerate import cpu_offload

        cpu_offload(linear, hook.execution_device)
    return linear


def _cpu_copy(t: Tensor) -> Tensor:
    pin = t.is_cuda  # page-locked: the copies back to the GPU run at full bus speed
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t.detach())


def _restore(transformer, originals: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in originals.items():
            param = transformer.get_parameter(_base_key(transformer, key))
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
    like = torch.empty(0, dtype=transformer.dtype, device=_compute_device(transformer))  # not GGUF's uint8
    for name, attn in _attn_modules(transformer).items():
        state.processors[name] = attn.processor
        attn.set_processor(ClearAttnProcessor(state, like))
    if state_dict is not None:
        _load(transformer, state, state_dict)
    transformer.pos_embed.theta = state.theta * ntk_factor
    _register_hooks(transformer, state)
    transformer._clear_state = state


def _register_hooks(transformer, state: _ClearState) -> None:
    state.hooks = [
        transformer.register_forward_pre_hook(lambda m, a, k: _pre_hook(state, m, a, k), with_kwargs=True),
        transformer.register_forward_hook(lambda m, a, o: _post_hook(state, m, a, o)),
    ]
    if _is_controlnet(transformer):
        embedder = transformer.controlnet_x_embedder
        state.hooks.append(embedder.register_forward_pre_hook(lambda m, a: _control_hook(state, m, a)))


def _compute_device(transformer) -> torch.device:
    """Where the transformer computes: its weights' device, or under accelerate's sequential offload (the
    weights on 'meta' between calls) its hook's execution device."""
    hook = getattr(transformer.x_embedder, "_hf_hook", None)
    if getattr(hook, "offload", False):
        return torch.device(hook.execution_device)
    return transformer.x_embedder.weight.device


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
    for name, module in state.modules.items():
        transformer.set_submodule(_base_name(transformer, name), module)
    _restore(transformer, state.originals)
    transformer.pos_embed.theta = state.theta
    del transformer._clear_state


def clear_config(transformer) -> ClearConfig | None:
    """The CLEAR settings of a transformer, or None when it runs stock attention."""
    state = getattr(transformer, "_clear_state", None)
    return None if state is None else state.config


@contextmanager
def original_attention(transformer) -> Iterator[None]:
    """Inside: the stock model that CLEAR was applied to (its processors, RoPE theta, row-major tokens
    and the projections a checkpoint replaced); outside: CLEAR exactly as before.

    The replaced projections are swapped back by pointer, not copied, so they must be on the same device
    as the CLEAR ones: this is how a distillation's full-attention teacher shares every weight with its
    CLEAR student (clear_gen.distill). Do not step an optimiser inside.
    """
    state: _ClearState | None = getattr(transformer, "_clear_state", None)
    assert state is not None, "original_attention needs a transformer with CLEAR applied"
    modules = _attn_modules(transformer)
    clear_processors = {name: modules[name].processor for name in state.processors}
    clear_data = {key: transformer.get_parameter(key).data for key in state.originals}
    assert all(value.device == clear_data[key].device for key, value in state.originals.items()), (
        "original_attention swaps projections by pointer: keep the originals on the model's device"
    )
    for handle in state.hooks:
        handle.remove()
    for name, processor in state.processors.items():
        modules[name].set_processor(processor)
    _restore(transformer, state.originals)
    transformer.pos_embed.theta = state.theta
    try:
        yield
    finally:
        _restore(transformer, clear_data)
        for name, processor in clear_processors.items():
            modules[name].set_processor(processor)
        transformer.pos_embed.theta = state.theta * state.config.ntk_factor
        _register_hooks(transformer, state)
