"""ControlNet residuals with CLEAR: tile-ordered in the transformer; CLEAR on the ControlNet's own blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_inputs, tiny_transformer
from test_attention import ReferenceProcessor, clear_checkpoint, rel_err

import clear_gen
from clear_gen.geometry import choose_tile, tile_order


def tiny_controlnet(transformer, union: bool, seed: int = 7):
    """A FluxControlNetModel from the tiny transformer, its zero-initialised layers made random."""
    from diffusers import FluxControlNetModel

    config = {**dict(transformer.config), "num_layers": 1, "num_single_layers": 1}
    config["num_mode"] = 3 if union else None
    torch.manual_seed(seed)
    net = FluxControlNetModel.from_config(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.normal_(0, 0.3)
    return net


def reference_processors(model, sd, text_len, h, w, r, f):
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(model, kind)):
            weight = sd.get(f"{kind}.{i}.attn.processor.spatial_weight") if sd else None
            block.attn.set_processor(ReferenceProcessor(text_len, h, w, r, f, weight, False))


def control_then_transformer(net, transformer, inputs, cond, mode):
    with torch.no_grad():
        blocks, singles = net(
            hidden_states=inputs["hidden_states"], controlnet_cond=cond, controlnet_mode=mode,
            conditioning_scale=0.8, encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
            img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=inputs["guidance"],
            return_dict=False,
        )  # fmt: skip
        return transformer(
            **inputs, controlnet_block_samples=blocks, controlnet_single_block_samples=singles
        ).sample


@pytest.mark.parametrize("union", [False, True], ids=["plain", "union"])
@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_clear_with_controlnet_residuals_matches_the_dense_reference(union, backend):
    text_len, h, w, r, f = 5, 12, 20, 3, 2
    assert not torch.equal(tile_order(h, w, choose_tile(h, w)), torch.arange(h * w))  # tiles reorder
    base = tiny_transformer()
    net = tiny_controlnet(base, union)
    sd = clear_checkpoint(base, f)
    inputs = tiny_inputs(2, text_len, h, w)
    cond = torch.randn(2, h * w, 4, generator=torch.Generator().manual_seed(9))
    mode = torch.tensor([[1], [2]]) if union else None
    # Reference: row-major tokens, the dense mask, CLEAR's weights loaded by hand, in both models.
    ref, ref_net = copy.deepcopy(base), copy.deepcopy(net)
    ref.load_state_dict({k: v for k, v in sd.items() if "spatial" not in k}, strict=False)
    reference_processors(ref, sd, text_len, h, w, r, f)
    reference_processors(ref_net, None, text_len + int(union), h, w, r, 1)
    expected = control_then_transformer(ref_net, ref, inputs, cond, mode)
    clear_gen.apply_clear(base, window=r, down_factor=f, state_dict=sd, backend=backend)
    clear_gen.apply_clear(net, window=r, backend=backend)  # the ControlNet: training-free CLEAR
    got = control_then_transformer(net, base, inputs, cond, mode)
    assert rel_err(got, expected) < 1e-5
    with torch.no_grad():  # the residuals do change the output: a misplaced one would show
        assert rel_err(ref(**inputs).sample, expected) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("img2img", [False, True], ids=["text-to-image", "img2img"])
def test_diffusers_controlnet_pipelines_with_clear_match_the_dense_reference(tiny, img2img):
    """FluxControlNetPipeline and its img2img twin call the ControlNet and the transformer with their own
    arguments: with CLEAR on both, the latents equal those of the row-major dense reference processors."""
    import inspect

    from diffusers import FluxControlNetImg2ImgPipeline, FluxControlNetPipeline, FluxPipeline
    from PIL import Image

    base = FluxPipeline.from_pretrained(tiny)
    net = tiny_controlnet(base.transformer, union=True)
    kind = FluxControlNetImg2ImgPipeline if img2img else FluxControlNetPipeline
    wanted = inspect.signature(kind.__init__).parameters
    pipe = kind(controlnet=net, **{k: v for k, v in base.components.items() if k in wanted})
    pipe.set_progress_bar_config(disable=True)
    h, w, text_len, r = 12, 20, 16, 3  # tokens: 192 x 320 px; tiles of 8 x 16 reorder them
    noise = torch.rand(h * 16, w * 16, 3, generator=torch.Generator().manual_seed(2))
    picture = Image.fromarray((noise * 255).byte().numpy())
    extra = dict(image=picture, strength=0.7) if img2img else {}

    def run():
        return pipe(
            "a hill", control_image=picture, control_mode=1, controlnet_conditioning_scale=0.8, width=w * 16,
            height=h * 16, num_inference_steps=2, max_sequence_length=text_len, output_type="latent",
            generator=torch.Generator().manual_seed(1), **extra,
        ).images  # fmt: skip

    reference_processors(pipe.transformer, None, text_len, h, w, r, 1)
    reference_processors(net, None, text_len + 1, h, w, r, 1)  # the union ControlNet's mode token
    expected = run()
    clear_gen.apply_clear(pipe.transformer, window=r, backend="flex")
    clear_gen.apply_clear(net, window=r, backend="flex")
    got = run()
    assert got.shape == expected.shape and got.shape[1] == h * w
    assert rel_err(got, expected) < 1e-5
