"""A transformer with FLUX.1-dev's architecture and random weights, built directly on the device.

Speed does not depend on weight values, so `clear-gen bench --what step` times this instead of the
30 GB checkpoint. Built on the 'meta' device and materialised in the target dtype: no float32 copy of
the 12B parameters is ever allocated.
"""

from __future__ import annotations

import torch

from . import flops as FL
from .errors import ConfigError


def flux_shape(heads: int, head_dim: int, layers: int) -> FL.FluxShape:
    """FLUX.1-dev's transformer with `layers` blocks split 1 : 2 as in FLUX (57 = 19 double + 38 single)."""
    if layers < 1:
        raise ConfigError(f"--layers must be at least 1, got {layers}")
    double = max(1, round(layers * 19 / 57))
    return FL.FluxShape(heads=heads, head_dim=head_dim, double=double, single=layers - double)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (index, row, column) summing to head_dim in FLUX's 16 : 56 : 56 proportion."""
    if head_dim % 32:
        raise ConfigError(f"--head-dim must be a multiple of 32 for the step benchmark, got {head_dim}")
    side = (head_dim - head_dim // 8) // 2
    return (head_dim // 8, side, side)


def free_bytes(device: torch.device) -> int:
    """Memory free on the device: the GPU's, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_transformer(shape: FL.FluxShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """FluxTransformer2DModel with FLUX.1-dev's configuration and random weights, made on the device in
    dtype (built on 'meta' first, so no float32 copy is ever allocated). Refused, with the sizes, when
    its weights alone would not fit in the device's free memory."""
    need = FL.parameter_count(shape) * torch.empty(0, dtype=dtype).element_size()
    if need > free_bytes(device):
        raise ConfigError(
            f"a transformer of {shape.layers} layers x {shape.heads} heads x {shape.head_dim} needs "
            f"{need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')} and {device} has "
            f"{free_bytes(device) / 1e9:.1f} GB free; shrink it with --layers, --heads or --head-dim"
        )
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError:
        raise ConfigError("the step benchmark needs diffusers: pip install 'diffusers>=0.35'") from None
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=shape.double,
            num_single_layers=shape.single,
            attention_head_dim=shape.head_dim,
            num_attention_heads=shape.heads,
            joint_attention_dim=shape.joint_dim,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=rope_axes(shape.head_dim),
            in_channels=shape.in_channels,
        )
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)  # meta: no memory yet
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)  # keeps activations O(1)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)  # biases 0, norm weights 1
    return model.eval().requires_grad_(False)


def step_inputs(model, res: int, text_len: int, device, dtype, seed: int = 0) -> dict:
    """Random latents and text features, with FluxPipeline's ids: img_ids rows [0, y, x] row-major."""
    side, cfg = res // 16, model.config
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # (h, w) each
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).view(-1, 3)  # (N, 3)
    return {
        "hidden_states": rand(1, side * side, cfg.in_channels),  # (B, N, 64) packed latents
        "encoder_hidden_states": rand(1, text_len, cfg.joint_attention_dim),  # (B, T, 4096)
        "pooled_projections": rand(1, cfg.pooled_projection_dim),  # (B, 768)
        "timestep": torch.tensor([1.0], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "img_ids": img_ids.to(device, dtype),
        "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
