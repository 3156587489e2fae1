"""Tiny FLUX-architecture models and inputs, built locally: no network, about a second on a CPU."""

from __future__ import annotations

import pytest
import torch

HEADS, HEAD_DIM = 2, 16
ROPE_AXES = (4, 6, 6)  # sums to HEAD_DIM


def tiny_transformer(seed: int = 0, layers: int = 1, single_layers: int = 1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=ROPE_AXES,
    )
    return model.eval()


def grid_ids(h: int, w: int) -> torch.Tensor:
    """img_ids of a row-major h x w grid, as FluxPipeline makes them: (h * w, 3) = [0, row, col]."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h).view(-1, 1)
    ids[..., 2] = torch.arange(w).view(1, -1)
    return ids.view(-1, 3)


def tiny_inputs(batch: int, text_len: int, h: int, w: int, dtype=torch.float32, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, h * w, 4, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, 32, generator=g).to(dtype),
        timestep=torch.full((batch,), 0.7, dtype=dtype),
        img_ids=grid_ids(h, w),
        txt_ids=torch.zeros(text_len, 3),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
    )


@pytest.fixture
def transformer():
    return tiny_transformer()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny FLUX.1 pipeline in diffusers format, written once per test session (read-only for tests)."""
    from tiny_pipeline import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("model"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache (modules use it with pytest.mark.usefixtures)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.fixture
def roomy_cpu(monkeypatch):
    """A CPU with memory for real FLUX.1 in fp32: a CPU run of it is otherwise refused by its memory plan
    before the checks after it (the weights on disk or the Hub) are reached."""
    from clear_gen.plan import gpus

    monkeypatch.setattr(gpus, "available_memory", lambda: 10**12)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """clear-gen in this process: (exit code, stdout, stderr)."""
    from clear_gen.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def tiny2(tmp_path_factory):
    """A tiny FLUX.2 [klein] pipeline in diffusers format (CFG: not distilled), written once per session."""
    from tiny_pipeline import save_tiny_flux2

    return save_tiny_flux2(tmp_path_factory.mktemp("model2"))


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory):
    """The tiny FLUX.1 pipeline saved as a FluxKontextPipeline (tiny FLUX.1 Kontext), once per session."""
    from tiny_pipeline import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("kontext"), pipeline="FluxKontextPipeline")
