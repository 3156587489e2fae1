"""FLUX.1's VAE (diffusers' AutoencoderKL) decoding and encoding in tiles, exactly: the tiled picture equals
the untiled one to float rounding, at the memory of about one activation of the VAE's largest level.

diffusers' own tiling (`enable_tiling`, `--vae-tiling fast`) decodes 1024 px tiles as separate pictures,
each with its own GroupNorm statistics, its own mid-block attention and zeros at its edges, and cross-fades
256 px seams: tones shift from tile to tile. Here nothing is computed twice differently:

1. Decode: conv_in and the mid block (its attention over the whole latent) run on the whole latent, as
   untiled; encode: the mid block, conv_norm_out and conv_out run on the whole latent after the down blocks.
2. The up (down) blocks run over tiles (core/tiles.py: one grid, scaled per level), one GroupNorm at a
   time. A GroupNorm normalises with its input's statistics over the whole picture, and that input depends
   on every GroupNorm before it, so each GroupNorm costs a sweep over all the tiles: per-channel moments
   (count, mean, squared deviations, in float32) of each tile's core, merged across tiles, pooled into the
   norm's groups; the next sweep normalises with them. A ResnetBlock2D (norm1, SiLU, conv1, norm2, SiLU,
   conv2, + shortcut) with input x is two sweeps:
     hidden: conv1(SiLU(norm1(x))) on each core, x read with a 1 px halo: its moments, then discarded;
     out:    the whole block on each core, x read with a 2 px halo: parked, its moments gathered, x's
             tiles freed as soon as no later tile reads them.
   A level's first block reads x through the resampling before it (decode: Upsample2D, nearest x2 + conv;
   encode: conv_in, or Downsample2D, a stride-2 conv): x is recomputed from the level below in each sweep
   rather than parked (decode, top level: twice the px and channels of what is parked), after one more
   sweep for its moments. Decode ends with conv_norm_out, SiLU and conv_out in one sweep writing the
   picture; encode assembles the last level's output whole for the mid block.
   So a decode is 28 sweeps (4 levels x 3 blocks x 2, 3 resamplings, the output) and computes about twice
   the untiled FLOPs (conv1 twice, each upsampler three times); what is parked at a time is one level's
   residual stream (128 channels at full size at the top), plus the one before it until its sweep has
   passed. models/flux1/activations.py counts it for the memory plan.
3. Every sweep reads a 1-2 px halo at its own level, never the blocks' whole receptive field: the up
   blocks' is 12.25 latent px (98 px on every side of a latent px's own 8; measured
   in tests/test_vae_tiling.py with the GroupNorm statistics held fixed), which a one-pass tiling would
   need as its halo, on top of whole-picture statistics it cannot have.

Zero padding stays where the untiled VAE has it, at the picture's edges: every convolution's input is read
around its box from the neighbouring tiles, and zeros only stand for what lies outside the picture. The
GroupNorm modules are called as modules (a torch function mode swaps in the whole-picture statistics), so
offload hooks that move weights per module keep working; parked tiles may live on another device (the CPU,
with sequential offload) than the one that computes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ...core.tiles import (
    LATENT_PX,
    Box,
    Tile,
    TileGrid,
    clip,
    down_source,
    halo_source,
    releases,
    tile_grid,
    up_source,
)
from ...errors import ConfigError

# ---------------------------------------------------------------- whole-picture GroupNorm statistics


class Moments:
    """Per-channel count, mean and sum of squared deviations (M2) of an activation, merged tile by tile
    (Chan et al.'s parallel update, in float32), pooled into a GroupNorm's groups when one reads them."""

    def __init__(self) -> None:
        self.n = 0  # elements per channel so far
        self.mean: Tensor | None = None  # (B, C), float32 (float64 for a float64 VAE)
        self.m2: Tensor | None = None  # (B, C)

    def add(self, x: Tensor) -> None:
        """Count a tile's core x: (B, C, h, w)."""
        var, mean = torch.var_mean(x.to(_opmath(x.dtype)), dim=(2, 3), correction=0)  # (B, C) each
        n = x.shape[2] * x.shape[3]
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, var * n
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.n * n / total)
        self.n = total

    def groups(self, groups: int) -> tuple[Tensor, Tensor]:
        """(mean, biased variance) of each of `groups` groups of channels: (B, G) each."""
        b, c = self.mean.shape
        mean = self.mean.view(b, groups, c // groups)  # (B, G, C/G)
        group_mean = mean.mean(-1)  # (B, G): every channel counts as many elements
        spread = (mean - group_mean[..., None]).square().sum(-1)  # (B, G): the channel means' own
        m2 = self.m2.view(b, groups, c // groups).sum(-1) + self.n * spread
        return group_mean, m2 / (self.n * (c // groups))


class _WholePicture(TorchFunctionMode):
    """Inside it, group_norm normalises with these whole-picture moments instead of its input's own; the
    module's weight and bias are used as its forward passes them (offload hooks have placed them)."""

    def __init__(self, moments: Moments) -> None:
        super().__init__()
        self.moments = moments

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.group_norm:
            return _group_norm(self.moments, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _group_norm(moments: Moments, x: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """F.group_norm with the given moments: each channel normalised with its group's mean and variance by
    batch_norm's fused kernel (statistics and affine in float32, float64 for float64; x's dtype out)."""
    mean, var = moments.groups(num_groups)  # (B, G)
    per_group = x.shape[1] // num_groups
    mean, var = mean.repeat_interleave(per_group, dim=1), var.repeat_interleave(per_group, dim=1)  # (B, C)
    weight, bias = (None if p is None else p.to(mean.dtype) for p in (weight, bias))
    out = [F.batch_norm(x[i : i + 1], mean[i], var[i], weight, bias, False, 0.0, eps) for i in range(len(x))]
    return out[0] if len(out) == 1 else torch.cat(out)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """What statistics and normalisation compute in: float32, or float64 for a float64 VAE."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normed(norm: torch.nn.Module, x: Tensor, moments: Moments) -> Tensor:
    with _WholePicture(moments):
        return norm(x)


# ---------------------------------------------------------------- parked activations and boxes


def _crop(x: Tensor, have: Box, box: Box) -> Tensor:
    """The part over `box` of x, which covers `have` (box inside have)."""
    top, left = box[0] - have[0], box[2] - have[2]
    return x[:, :, top : top + box[1] - box[0], left : left + box[3] - box[2]]


class Parked:
    """An activation of one level (`scale` x the latent) kept as its tiles' cores, with its moments: read
    back around any box onto the computing device, freed tile by tile. `store`: where the tiles live (None:
    where they were computed)."""

    def __init__(self, grid: TileGrid, scale: int, device: torch.device, store: torch.device | None = None):
        self.grid, self.scale, self.device, self.store = grid, scale, device, store
        self.bounds = grid.bounds(scale)
        self.tiles: dict[Tile, Tensor] = {}
        self.moments = Moments()

    @classmethod
    def whole(cls, x: Tensor, grid: TileGrid, scale: int) -> Parked:
        """A whole (B, C, H, W) tensor as parked tiles (views of it; its moments counted tile by tile)."""
        parked = cls(grid, scale, x.device)
        for tile in grid.tiles():
            parked.put(tile, _crop(x, parked.bounds, grid.core(tile, scale)))
        return parked

    def put(self, tile: Tile, x: Tensor) -> None:
        self.moments.add(x)
        self.tiles[tile] = x if self.store is None else x.to(self.store)

    def drop(self, tiles: list[Tile]) -> None:
        for tile in tiles:
            del self.tiles[tile]

    def read(self, box: Box) -> Tensor:
        """The activation over `box` (inside the picture), from the tiles it overlaps: (B, C, h, w)."""
        rows: dict[int, list[Tensor]] = {}
        for tile in self.grid.touching(box, self.scale):
            core = self.grid.core(tile, self.scale)
            rows.setdefault(tile[0], []).append(_crop(self.tiles[tile], core, clip(core, box)))
        band = [torch.cat(parts, dim=3) if len(parts) > 1 else parts[0] for parts in rows.values()]
        x = torch.cat(band, dim=2) if len(band) > 1 else band[0]
        return x.to(self.device)

    def assembled(self) -> Tensor:
        """The whole activation as one tensor; the tiles are dropped."""
        x = self.read(self.bounds)
        self.tiles.clear()
        return x


@dataclass
class _Input:
    """A level's input: read from `parked`, or made from it (the level below) by a resampling."""

    parked: Parked
    make: Callable[[Box], Tensor] | None = None  # x over a box; None: parked.read
    source: Callable[[Box], Box] | None = None  # the box of `parked` that x over a box reads; None: itself
    moments: Moments | None = None  # known without a sweep (parked at this level)

    def over(self, box: Box) -> Tensor:
        return self.parked.read(box) if self.make is None else self.make(box)

    def reads(self, box: Box) -> Box:
        return box if self.source is None else clip(self.source(box), self.parked.bounds)


def _stream(parked: Parked) -> _Input:
    return _Input(parked, moments=parked.moments)


def _upsampled(parked: Parked, upsampler: torch.nn.Module) -> _Input:
    """The level above `parked`, made by Upsample2D (nearest x2, then a 3 x 3 conv) on any box: from the
    low box under it and its neighbours (up_source), inside the picture; the conv's own zero padding is the
    picture's edge, and the ring it pads elsewhere lies outside the box."""

    def make(box: Box) -> Tensor:
        src = clip(up_source(box), parked.bounds)
        return _crop(upsampler(parked.read(src)), tuple(2 * v for v in src), box)

    return _Input(parked, make, up_source)


def _downsampled(parked: Parked, downsampler: torch.nn.Module) -> _Input:
    """The level below `parked`, made by Downsample2D (a zero row and column padded at the bottom and
    right, then a 3 x 3 stride-2 conv) on any box: its own padding is the picture's edge, or a row past
    what the box reads."""

    def make(box: Box) -> Tensor:
        return downsampler(parked.read(clip(down_source(box), parked.bounds)))  # exactly box

    return _Input(parked, make, down_source)


def _convolved(parked: Parked, conv: torch.nn.Module) -> _Input:
    """A 3 x 3 conv (padding 1) of `parked`, at its level, on any box: the encoder's conv_in."""
    bounds = parked.bounds

    def make(box: Box) -> Tensor:
        src = halo_source(box, 1, bounds)
        return _conv3(conv, parked.read(src), src, box, bounds)

    return _Input(parked, make, functools.partial(halo_source, halo=1, bounds=bounds))


def _conv3(conv: torch.nn.Module, x: Tensor, have: Box, box: Box, bounds: Box) -> Tensor:
    """A 3 x 3 conv (the module, padding 1) on `box`, from x over `have` (the box grown by 1 inside the
    picture, or more): the neighbours' pixels around the box; the conv's own zero padding falls on the
    picture's edge, or on the ring around the box it does not return."""
    src = halo_source(box, 1, bounds)
    return _crop(conv(_crop(x, have, src)), src, box)


# ---------------------------------------------------------------- a level: its ResnetBlock2Ds in sweeps


def _hidden(block, x: Tensor, have: Box, box: Box, bounds: Box, mx: Moments) -> Tensor:
    """conv1(SiLU(norm1(x))) of a ResnetBlock2D on `box`, from x over `have` (box grown by 1, or more)."""
    src = halo_source(box, 1, bounds)
    a = block.nonlinearity(_normed(block.norm1, _crop(x, have, src), mx))
    return _conv3(block.conv1, a, src, box, bounds)


def _resnet(block, x: Tensor, have: Box, box: Box, bounds: Box, mx: Moments, mh: Moments) -> Tensor:
    """The whole ResnetBlock2D on `box`, as its forward orders it, from x over `have` (box grown by 2)."""
    inner = halo_source(box, 1, bounds)
    a = block.nonlinearity(_normed(block.norm2, _hidden(block, x, have, inner, bounds, mx), mh))
    h = _conv3(block.conv2, block.dropout(a), inner, box, bounds)
    short = _crop(x, have, box)
    if block.conv_shortcut is not None:
        short = block.conv_shortcut(short)
    out = short + h
    return out if block.output_scale_factor == 1 else out / block.output_scale_factor  # x / 1: the same


def _sweep(grid: TileGrid, scale: int, make: Callable[[Box], Tensor], keep, x: _Input | None = None) -> None:
    """make(core) of every tile in raster order, handed to keep(tile, tensor); with `x` (the input that
    make reads with a 2 px halo), its parked tiles are freed after the last tile that reads them."""
    if x is not None:
        bounds = grid.bounds(scale)
        after = releases(grid, lambda core: x.reads(halo_source(core, 2, bounds)), scale, x.parked.scale)
    for tile in grid.tiles():
        keep(tile, make(grid.core(tile, scale)))
        if x is not None:
            x.parked.drop(after[tile])


def _moments(grid: TileGrid, scale: int, make: Callable[[Box], Tensor]) -> Moments:
    moments = Moments()
    _sweep(grid, scale, make, lambda tile, y: moments.add(y))
    return moments


def _level(resnets, x: _Input, grid: TileGrid, scale: int, store: torch.device | None) -> Parked:
    """A level's ResnetBlock2Ds over the tiles, two sweeps each (after one for the moments of a resampled
    input): its output, parked."""
    bounds = grid.bounds(scale)
    mx = x.moments if x.moments is not None else _moments(grid, scale, x.over)
    for block in resnets:

        def hidden(box: Box, block=block, x=x, mx=mx) -> Tensor:
            have = halo_source(box, 1, bounds)
            return _hidden(block, x.over(have), have, box, bounds, mx)

        mh = _moments(grid, scale, hidden)

        def out(box: Box, block=block, x=x, mx=mx, mh=mh) -> Tensor:
            have = halo_source(box, 2, bounds)
            return _resnet(block, x.over(have), have, box, bounds, mx, mh)

        parked = Parked(grid, scale, x.parked.device, store)
        _sweep(grid, scale, out, parked.put, x)
        x, mx = _stream(parked), parked.moments
    return x.parked


# ---------------------------------------------------------------- decode and encode


def decode(vae, z: Tensor, tile: int, store: torch.device | None = None) -> Tensor:
    """The VAE's decode of latents z (B, 16, h, w) into pixels (B, 3, 8h, 8w), in tiles of at most `tile`
    px a side, equal to the untiled decode to float rounding. `store`: where parked tiles live (None: the
    computing device)."""
    dec = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    # 1. conv_in and the mid block, its attention included, on the whole latent.
    x = dec.mid_block(dec.conv_in(z), None)
    dtype, grid = x.dtype, tile_grid(z.shape[2], z.shape[3], tile // LATENT_PX)
    # 2. The up blocks, level by level (1, 2, 4, 8 x the latent), each through its predecessor's upsampler.
    stream, upsampler = Parked.whole(x, grid, 1), None
    del x
    for level, block in enumerate(dec.up_blocks):
        x = _stream(stream) if upsampler is None else _upsampled(stream, upsampler)
        stream = _level(block.resnets, x, grid, 2**level, store)
        upsampler = block.upsamplers[0] if block.upsamplers else None
    # 3. conv_norm_out, SiLU, conv_out: one sweep writing the picture.
    scale, bounds = stream.scale, stream.bounds
    out = torch.empty(z.shape[0], dec.conv_out.out_channels, *bounds[1::2], device=z.device, dtype=dtype)

    def pixels(box: Box) -> Tensor:
        have = halo_source(box, 1, bounds)
        a = dec.conv_act(_normed(dec.conv_norm_out, stream.read(have), stream.moments))
        return _conv3(dec.conv_out, a, have, box, bounds)

    def write(tile: Tile, y: Tensor) -> None:
        top, bottom, left, right = grid.core(tile, scale)
        out[:, :, top:bottom, left:right] = y

    _sweep(grid, scale, pixels, write, _stream(stream))
    return out


def encode(vae, x: Tensor, tile: int, store: torch.device | None = None) -> Tensor:
    """The VAE's encode of pixels x (B, 3, H, W) into the posterior's moments (B, 32, H/8, W/8), what
    AutoencoderKL._encode returns, in tiles of at most `tile` px a side, equal to the untiled encode to
    float rounding. `store`: where parked tiles live (None: the computing device)."""
    enc = vae.encoder
    grid = tile_grid(x.shape[2] // LATENT_PX, x.shape[3] // LATENT_PX, tile // LATENT_PX)
    # 1. conv_in, then the down blocks level by level (8, 4, 2, 1 x the latent), each through its
    #    predecessor's downsampler.
    picture = Parked.whole(x, grid, LATENT_PX)
    level_input = _convolved(picture, enc.conv_in)
    for level, block in enumerate(enc.down_blocks):
        stream = _level(block.resnets, level_input, grid, LATENT_PX >> level, store)
        if block.downsamplers:
            level_input = _downsampled(stream, block.downsamplers[0])
    # 2. The mid block, its attention included, conv_norm_out, SiLU and conv_out on the whole latent.
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(stream.assembled()))))
    return h if vae.quant_conv is None else vae.quant_conv(h)


# ---------------------------------------------------------------- the VAE of a stage


def _tiled_decode(vae, z: Tensor, return_dict: bool = True, *, tile: int, store: torch.device | None):
    """AutoencoderKL.tiled_decode's signature, decoding exactly (what _decode calls above one tile)."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    pixels = decode(vae, z, tile, store)
    return DecoderOutput(sample=pixels) if return_dict else (pixels,)


def set_vae_tiling(vae, mode: str, tile: int, store: torch.device | None = None) -> None:
    """How the VAE encodes and decodes from now on (a stage's pictures, whoever calls it: the img2img and
    ControlNet pipelines' encodes, clear-gen's decode): "off"; "fast", diffusers' tiles of `tile` px with
    cross-faded seams; "exact", this module's, tile cores of `tile` px (parked tiles on `store`, None: the
    computing device). Either tiling applies to pictures larger than one tile; smaller ones run whole."""
    for name in ("tiled_decode", "_tiled_encode"):  # what an earlier stage's exact tiling installed
        vae.__dict__.pop(name, None)
    if mode == "off":
        vae.disable_tiling()
        return
    if mode == "exact":
        check_layout(vae)
        vae.tiled_decode = functools.partial(_tiled_decode, vae, tile=tile, store=store)
        vae._tiled_encode = functools.partial(encode, vae, tile=tile, store=store)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // LATENT_PX


def check_layout(vae) -> None:
    """Exact tiling walks AutoencoderKL's blocks as FLUX.1's VAE has them; another layout is refused."""
    problems = []
    for block in [*vae.decoder.up_blocks, *vae.encoder.down_blocks]:
        if type(block).__name__ not in ("UpDecoderBlock2D", "DownEncoderBlock2D"):
            problems.append(f"an {type(block).__name__}")
        for r in block.resnets:
            convs = (r.conv1.kernel_size, r.conv1.padding, r.conv2.kernel_size, r.conv2.padding)
            if r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None:
                problems.append("a ResnetBlock2D that resamples or takes a time embedding")
            if convs != ((3, 3), (1, 1)) * 2:
                problems.append("a ResnetBlock2D whose convolutions are not 3 x 3")
        for up in getattr(block, "upsamplers", None) or []:
            if up.norm is not None or up.use_conv_transpose or not (up.use_conv and up.interpolate):
                problems.append("an Upsample2D other than nearest x2 and a convolution")
        for down in getattr(block, "downsamplers", None) or []:
            if down.norm is not None or not down.use_conv or down.padding != 0:
                problems.append("a Downsample2D other than a padded stride-2 convolution")
    if not isinstance(vae.decoder.conv_norm_out, torch.nn.GroupNorm):
        problems.append("a SpatialNorm")
    if problems:
        raise ConfigError(
            f"--vae-tiling exact knows FLUX.1's VAE (AutoencoderKL); this one has {problems[0]}: "
            "use --vae-tiling fast"
        )
