"""LoRAs with CLEAR: adapters stay separate, CLEAR's checkpoint goes under them, remove_clear keeps them."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_inputs, tiny_transformer
from test_attention import ReferenceProcessor, clear_checkpoint, rel_err

import clear_gen
from clear_gen.errors import ConfigError, WeightsError
from clear_gen.weights.lora import check_flux_lora, parse_loras
from clear_gen.weights.spec import LoraSpec

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "ff.net.0.proj", "ff.net.2"]
TARGETS += ["proj_mlp", "proj_out"]  # the single blocks' feed-forward and output


def add_lora(model, name: str, seed: int, rank: int = 2, alpha: float = 4.0) -> None:
    """A peft LoRA with random (non-zero) A and B on the attention and feed-forward layers."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(config, adapter_name=name)
    with torch.no_grad():  # larger than peft's init, so a lost LoRA shows
        for module in model.modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                module.lora_B[name].weight.normal_(0, 0.3)


def merged_by_hand(lora_model, base, scales: dict[str, float], sd=None):
    """A copy of `base` with CLEAR's checkpoint `sd` loaded, then each LoRA's scale alpha/r B @ A added."""
    ref = copy.deepcopy(base)
    if sd is not None:
        ref.load_state_dict({k: v for k, v in sd.items() if "spatial" not in k}, strict=False)
    with torch.no_grad():
        for name, module in lora_model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            target = ref.get_submodule(name)
            for adapter, scale in scales.items():
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                target.weight += scale * module.lora_alpha[adapter] / module.r[adapter] * (b @ a)
    return ref


def with_reference_attention(ref, sd, text_len, h, w, r, f):
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(ref, kind)):
            weight = sd.get(f"{kind}.{i}.attn.processor.spatial_weight") if sd else None
            block.attn.set_processor(ReferenceProcessor(text_len, h, w, r, f, weight, False))
    return ref


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-clear", "clear-then-lora"])
def test_clear_checkpoint_goes_under_the_lora_either_order(lora_first):
    text_len, h, w, r, f = 5, 8, 12, 3, 2
    base = tiny_transformer()
    model = copy.deepcopy(base)
    sd = clear_checkpoint(base, f)
    inputs = tiny_inputs(1, text_len, h, w)
    kwargs = dict(window=r, down_factor=f, state_dict=sd, backend="dense")
    if lora_first:
        add_lora(model, "a", seed=3)
        clear_gen.apply_clear(model, **kwargs)
    else:
        clear_gen.apply_clear(model, **kwargs)
        add_lora(model, "a", seed=3)
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "Linear" and hasattr(
        model.transformer_blocks[0].attn.to_q, "base_layer"
    )  # the LoRA wrapper is still there
    ref = with_reference_attention(merged_by_hand(model, base, {"a": 1.0}, sd), sd, text_len, h, w, r, f)
    assert rel_err(run(model, inputs), run(ref, inputs)) < 1e-5
    # remove_clear: stock attention with the base's weights, and the LoRA still on them.
    clear_gen.remove_clear(model)
    stock_with_lora = merged_by_hand(model, base, {"a": 1.0})
    assert rel_err(run(model, inputs), run(stock_with_lora, inputs)) < 1e-5
    assert rel_err(run(model, inputs), run(base, inputs)) > 1e-3  # the LoRA does change the output


def test_two_loras_with_scales_under_training_free_clear():
    text_len, h, w, r = 4, 10, 10, 4
    base = tiny_transformer(seed=2)
    model = copy.deepcopy(base)
    add_lora(model, "a", seed=4)
    add_lora(model, "b", seed=5, rank=3, alpha=3.0)
    model.set_adapters(["a", "b"], weights=[0.7, -0.4])
    clear_gen.apply_clear(model, window=r, backend="flex")
    inputs = tiny_inputs(2, text_len, h, w, seed=6)
    ref = merged_by_hand(model, base, {"a": 0.7, "b": -0.4})
    ref = with_reference_attention(ref, None, text_len, h, w, r, 1)
    assert rel_err(run(model, inputs), run(ref, inputs)) < 1e-5


def test_sequential_like_swap_keeps_lora_wrapper(monkeypatch):
    """A projection swapped whole (quantized or offloaded) is swapped under the LoRA, not instead of it."""
    from clear_gen.attention import weights

    base = tiny_transformer()
    model = copy.deepcopy(base)
    add_lora(model, "a", seed=3)
    monkeypatch.setattr(weights, "_swapped_whole", lambda module: True)
    original = model.transformer_blocks[0].attn.to_q.base_layer
    sd = clear_checkpoint(base, 1)
    clear_gen.apply_clear(model, window=3, state_dict=sd, backend="dense")
    wrapper = model.transformer_blocks[0].attn.to_q
    assert hasattr(wrapper, "base_layer") and wrapper.base_layer is not original
    assert torch.equal(wrapper.base_layer.weight, sd["transformer_blocks.0.attn.to_q.weight"])
    clear_gen.remove_clear(model)
    assert model.transformer_blocks[0].attn.to_q.base_layer is original


# ---------------------------------------------------------------- parsing and checks


def test_lora_specs_parse(tmp_path):
    file = tmp_path / "style.safetensors"
    file.write_bytes(b"")
    specs = parse_loras(
        [f"{file}:0.8", "owner/repo", "owner/other/sub/x.safetensors:-1", "o/r3"], ["a.safetensors"]
    )
    assert specs == [
        LoraSpec(str(file.resolve()), None, 0.8),
        LoraSpec("owner/repo", "a.safetensors", 1.0),
        LoraSpec("owner/other", "sub/x.safetensors", -1.0),
        LoraSpec("o/r3", "pytorch_lora_weights.safetensors", 1.0),
    ]
    assert specs[2].spec == "owner/other/sub/x.safetensors:-1"
    assert parse_loras([specs[0].spec]) == [specs[0]]  # the recorded form reads back


@pytest.mark.parametrize(
    "loras, files, match",
    [
        (["owner/repo:strong"], [], "scale 'strong' is not a number"),
        (["owner/repo:nan"], [], "not a number"),
        (["./missing.safetensors"], [], "no such file"),
        (["owner/repo/x.safetensors"], ["y.safetensors"], "--lora-file y.safetensors: no --lora owner/repo"),
    ],
)
def test_bad_lora_specs(loras, files, match):
    with pytest.raises(ConfigError, match=match):
        parse_loras(loras, files)


def test_lora_of_another_model_names_its_first_key():
    model = tiny_transformer()
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)}
    check_flux_lora(good, model, _path("ok.safetensors"))
    wrong_size = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64)}
    with pytest.raises(WeightsError, match="to_q.lora_A.weight is \\(2, 64\\)"):
        check_flux_lora(wrong_size, model, _path("big.safetensors"))
    with pytest.raises(WeightsError, match="not a LoRA for this FLUX.1 transformer: it has transformer.down"):
        check_flux_lora({"transformer.down_blocks.0.lora_A.weight": torch.zeros(2, 2)}, model, _path("x"))


def _path(name):
    from pathlib import Path

    return Path(name)


# ---------------------------------------------------------------- the CLI, end to end


@pytest.fixture
def lora_file(tiny, tmp_path):
    """A LoRA for the tiny pipeline's transformer, saved as diffusers does."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    model = FluxTransformer2DModel.from_pretrained(tiny, subfolder="transformer")
    add_lora(model, "x", seed=8)
    layers = get_peft_model_state_dict(model, adapter_name="x")
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=layers)
    return tmp_path / "lora" / "pytorch_lora_weights.safetensors"


def cli_args(tiny, out) -> list[str]:
    return ["a lighthouse", "--model", str(tiny), "--out", f"{out}/", "--max-sequence-length", "16"] + [
        "--steps", "2", "--first-steps", "2", "--backend", "dense", "--window", "2", "--stages", "64,128",
        "--seed", "3", "--json", "--no-compare-full",
    ]  # fmt: skip


def pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.mark.slow
@pytest.mark.usefixtures("offline_hub")
def test_cli_lora_is_recorded_and_rerun_by_from(tiny, lora_file, tmp_path, capsys):
    code, out, err = run_cli([*cli_args(tiny, tmp_path / "a"), "--lora", f"{lora_file}:0.7"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["extra"]["loras"] == [f"{lora_file.resolve()}:0.7"]
    code, out, err = run_cli(["info", row["path"], "--json"], capsys)
    assert code == 0 and json.loads(out)["extra"]["loras"] == [f"{lora_file.resolve()}:0.7"]
    code, out, err = run_cli(["--from", row["path"], "--out", f"{tmp_path / 'b'}/", "--json"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(pixels(row["path"]), pixels(json.loads(out)["path"]))
    code, out, err = run_cli(cli_args(tiny, tmp_path / "c"), capsys)  # the same without the LoRA
    assert code == 0, err
    assert not np.array_equal(pixels(row["path"]), pixels(json.loads(out)["path"]))


@pytest.mark.usefixtures("offline_hub")
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--lora", "LORA:strong"], "error: --lora .*: the scale 'strong' is not a number"),
        (
            ["--lora", "LORA:abc"],
            "error: --lora .*:abc: the scale 'abc' is not a number",
        ),  # text, not an emoji
        (["--lora", "OTHER"], "error: other.safetensors is not a FLUX.1 LoRA .*its first key is lora_unet_"),
        (["--lora", "someone/lora-repo"], "error: .*LoRA someone/lora-repo/pytorch_lora_weights.safetensors"),
    ],
)
def test_cli_bad_lora_is_one_line(tiny, lora_file, tmp_path, capsys, extra, match):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"  # an SDXL-style kohya LoRA
    names = [
        "lora_unet_down_blocks_0_attentions_0_proj_in." + k for k in ("lora_down.weight", "lora_up.weight")
    ]
    save_file({names[0]: torch.zeros(4, 8), names[1]: torch.zeros(8, 4)}, str(other))
    extra = [a.replace("LORA", str(lora_file)).replace("OTHER", str(other)) for a in extra]
    code, out, err = run_cli([*cli_args(tiny, tmp_path / "a"), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert re.search(match, lines[-1]), lines[-1]


@pytest.mark.parametrize("kind", ["int8", "gguf"])
def test_lora_on_a_quantized_transformer_keeps_its_wrapper_through_clear(kind, tmp_path):
    from test_quantize import clear_checkpoint as quantized_checkpoint
    from test_quantize import forward, quantized, write_gguf

    tiny_transformer().save_pretrained(tmp_path / "transformer")
    if kind == "int8":
        model = quantized(tmp_path, torch.bfloat16, quantize="int8")
    else:
        model = quantized(
            tmp_path, torch.float32, transformer=str(write_gguf(tiny_transformer(), tmp_path / "t.gguf"))
        )
    inputs = tiny_inputs(1, 8, 8, 8, model.dtype)
    add_lora(model, "a", seed=3)
    with_lora = forward(model, inputs)
    wrapper = model.transformer_blocks[0].attn.to_q
    quantized_layer = wrapper.base_layer
    clear_gen.apply_clear(model, window=2, state_dict=quantized_checkpoint(model))
    assert model.transformer_blocks[0].attn.to_q is wrapper  # the LoRA stays
    assert type(wrapper.base_layer) is torch.nn.Linear  # CLEAR's projection under it
    forward(model, inputs)
    clear_gen.remove_clear(model)
    assert wrapper.base_layer is quantized_layer
    assert torch.equal(forward(model, inputs), with_lora)
