"""--quantize, --quantize-text, GGUF --transformer files, CLEAR on quantized transformers (CPU, tiny models).

GGUF files are written here with the `gguf` package (Q8_0, Q4_0 and Q5_0: it cannot write K-quants) under
diffusers' key names, as diffusers' single-file loader reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from conftest import tiny_inputs, tiny_transformer
from tiny_pipeline import save_tiny_flux

import clear_gen
from clear_gen.attention.weights import expected_checkpoint
from clear_gen.errors import ClearGenError, WeightsError
from clear_gen.files.record import ImageRecord
from clear_gen.plan.records import options_from_record
from clear_gen.weights import gguf as GG
from clear_gen.weights import quantize as Q
from clear_gen.weights.loading import load_pipeline, load_transformer
from clear_gen.weights.spec import WeightsSpec

PROJECTIONS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v",
]
GGUF_TYPES = ("Q8_0", "Q4_0", "Q5_0")
INT8_TOLERANCE = 0.02  # int8 weight-only vs bf16, CLEAR applied: max |error| / max |output| (measured 0.008)


# ---------------------------------------------------------------- helpers


def write_gguf(model: torch.nn.Module, path: Path, names=None) -> Path:
    """`model`'s state dict as GGUF: 2-D weights whose rows are whole 32-blocks cycle through Q8_0/Q4_0/Q5_0,
    everything else stays F32 (as community files keep biases and norms)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(str(path), arch="flux")
    for i, (key, value) in enumerate(model.state_dict().items()):
        array = value.float().numpy()
        name = names(key) if names else key
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            kind = GGMLQuantizationType[GGUF_TYPES[i % len(GGUF_TYPES)]]
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)  # bytes (rows, blocks x size)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def clear_checkpoint(model, seed: int = 3, down_factor: int = 1) -> dict[str, torch.Tensor]:
    """A CLEAR checkpoint for `model`, in the published key format, float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in expected_checkpoint(model, down_factor).items()}


def storage(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of what a quantized weight stores: torchao's inner tensors (int8, scales), else its bytes."""
    names = getattr(weight, "tensor_data_names", None)
    inner = [getattr(weight, n) for n in names] if names else [weight.as_subclass(torch.Tensor)]
    return [t.detach().clone() for t in inner]


def forward(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base folder holding conftest's tiny transformer (the one tiny_inputs feed), saved in float32."""
    path = tmp_path_factory.mktemp("base")
    tiny_transformer().save_pretrained(path / "transformer")
    return path


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> Path:
    return write_gguf(tiny_transformer(), tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf")


def quantized(base: Path, dtype: torch.dtype, **opts):
    return load_transformer(WeightsSpec("dev", **opts), base, dtype)


# ---------------------------------------------------------------- CLEAR on quantized transformers


def test_int8_with_clear_matches_the_unquantized_output(base):
    from diffusers import FluxTransformer2DModel

    inputs = tiny_inputs(1, 8, 8, 8, torch.bfloat16)
    outs = []
    for model in (
        FluxTransformer2DModel.from_pretrained(base, subfolder="transformer", torch_dtype=torch.bfloat16),
        quantized(base, torch.bfloat16, quantize="int8"),
    ):
        clear_gen.apply_clear(model, window=2, state_dict=clear_checkpoint(model))
        outs.append(forward(model, inputs).float())
    reference, int8 = outs
    error = (int8 - reference).abs().max() / reference.abs().max()
    assert 0 < error < INT8_TOLERANCE  # quantized (not equal), and close


# what torchao's recommended_inductor_config_setter flips
INDUCTOR_FLAGS = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "fx_graph_cache")


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantizing_leaves_the_process_inductor_settings_alone(mode):
    import torch._inductor.config as inductor

    before = {name: getattr(inductor, name) for name in INDUCTOR_FLAGS}
    before["unique_kernel_names"] = inductor.triton.unique_kernel_names
    Q.quantize_built(tiny_transformer(), mode)  # torchao's default would set every flag to True
    after = {name: getattr(inductor, name) for name in INDUCTOR_FLAGS}
    after["unique_kernel_names"] = inductor.triton.unique_kernel_names
    assert after == before and not before["coordinate_descent_tuning"]
    assert Q.transformer_config(mode, torch.bfloat16).quant_type.set_inductor_config is False


@pytest.mark.parametrize("kind", ["int8", "gguf"])
def test_clear_checkpoint_swaps_plain_linears_in_and_remove_restores_the_quantized_ones(
    kind, base, base_gguf
):
    model = (
        quantized(base, torch.bfloat16, quantize="int8")
        if kind == "int8"
        else quantized(base, torch.float32, transformer=str(base_gguf))
    )
    inputs = tiny_inputs(1, 8, 8, 8, model.dtype)
    before = forward(model, inputs)
    originals = {name: model.get_submodule(name) for name in PROJECTIONS}
    stored = {name: storage(m.weight) for name, m in originals.items()}  # int8 + scales, GGUF's bytes
    assert all(type(m.weight) is not torch.nn.Parameter for m in originals.values())  # quantized storage
    sd = clear_checkpoint(model)
    for _ in range(2):  # the SDEdit recipe switches between full attention and CLEAR within one run
        clear_gen.apply_clear(model, window=2, state_dict=sd)
        for name in PROJECTIONS:
            swapped = model.get_submodule(name)
            assert type(swapped) is torch.nn.Linear and type(swapped.weight) is torch.nn.Parameter
            assert swapped.weight.dtype == model.dtype
            assert torch.equal(swapped.weight, sd[f"{name}.weight"].to(model.dtype))
        assert not torch.equal(forward(model, inputs), before)
        clear_gen.remove_clear(model)
        assert all(model.get_submodule(name) is module for name, module in originals.items())
        for name in PROJECTIONS:  # never written into
            assert all(map(torch.equal, storage(originals[name].weight), stored[name]))
        assert torch.equal(forward(model, inputs), before)


@pytest.mark.parametrize("kind, down_factor", [("bf16", 1), ("bf16", 2), ("int8", 1)])
def test_clear_under_sequential_offload(base, kind, down_factor):
    """accelerate's sequential offload (here with the CPU as execution device): the checkpoint's Linears
    are offloaded alike and the output is the one without offload; remove_clear restores the original."""
    from accelerate import cpu_offload
    from diffusers import FluxTransformer2DModel

    def load():
        if kind == "int8":
            return quantized(base, torch.bfloat16, quantize="int8")
        return FluxTransformer2DModel.from_pretrained(base / "transformer", torch_dtype=torch.bfloat16)

    inputs = tiny_inputs(1, 8, 8, 8, torch.bfloat16)
    plain, offloaded = load(), load()
    cpu_offload(offloaded, torch.device("cpu"))
    sd = clear_checkpoint(plain, down_factor=down_factor)
    before = forward(offloaded, inputs)
    for model in (plain, offloaded):
        clear_gen.apply_clear(model, window=2, down_factor=down_factor, state_dict=sd)
    assert hasattr(offloaded.get_submodule(PROJECTIONS[0]), "_hf_hook")
    assert torch.equal(forward(offloaded, inputs), forward(plain, inputs))
    clear_gen.remove_clear(offloaded)
    assert torch.equal(forward(offloaded, inputs), before)


def test_expected_checkpoint_reads_a_quantized_layers_true_shape(base_gguf, base):
    model = quantized(base, torch.float32, transformer=str(base_gguf))
    packed = model.get_submodule("transformer_blocks.0.attn.to_q").weight
    assert packed.dtype == torch.uint8  # (out, blocks x bytes), not (out, in)
    assert expected_checkpoint(model, 1) == expected_checkpoint(tiny_transformer(), 1)


# ---------------------------------------------------------------- GGUF files


def flux_dev_bfl_shapes(guidance: bool = True) -> dict[str, tuple[int, ...]]:
    """FLUX.1-dev's transformer under the original (BFL) names community GGUF files use, written out from
    the architecture: 19 double blocks, 38 single blocks, hidden 3072, MLP 12288, 24 heads of 128."""
    h, mlp = 3072, 12288
    s = {"img_in.weight": (h, 64), "img_in.bias": (h,), "txt_in.weight": (h, 4096), "txt_in.bias": (h,)}
    s |= {"final_layer.linear.weight": (64, h), "final_layer.linear.bias": (64,)}
    s |= {
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for emb, n in [("time_in", 256), ("vector_in", 768)] + ([("guidance_in", 256)] if guidance else []):
        s |= {f"{emb}.in_layer.weight": (h, n), f"{emb}.in_layer.bias": (h,)}
        s |= {f"{emb}.out_layer.weight": (h, h), f"{emb}.out_layer.bias": (h,)}
    for i in range(19):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            s |= {f"{p}_mod.lin.weight": (6 * h, h), f"{p}_mod.lin.bias": (6 * h,)}
            s |= {f"{p}_attn.qkv.weight": (3 * h, h), f"{p}_attn.qkv.bias": (3 * h,)}
            s |= {f"{p}_attn.norm.query_norm.scale": (128,), f"{p}_attn.norm.key_norm.scale": (128,)}
            s |= {f"{p}_attn.proj.weight": (h, h), f"{p}_attn.proj.bias": (h,)}
            s |= {f"{p}_mlp.0.weight": (mlp, h), f"{p}_mlp.0.bias": (mlp,)}
            s |= {f"{p}_mlp.2.weight": (h, mlp), f"{p}_mlp.2.bias": (h,)}
    for i in range(38):
        p = f"single_blocks.{i}"
        s |= {f"{p}.linear1.weight": (3 * h + mlp, h), f"{p}.linear1.bias": (3 * h + mlp,)}
        s |= {f"{p}.linear2.weight": (h, h + mlp), f"{p}.linear2.bias": (h,)}
        s |= {f"{p}.modulation.lin.weight": (3 * h, h), f"{p}.modulation.lin.bias": (3 * h,)}
        s |= {f"{p}.norm.query_norm.scale": (128,), f"{p}.norm.key_norm.scale": (128,)}
    return s


FLUX_DEV_CONFIG = dict(
    attention_head_dim=128,
    guidance_embeds=True,
    in_channels=64,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=19,
    num_single_layers=38,
    patch_size=1,
    pooled_projection_dim=768,
    axes_dims_rope=[16, 56, 56],
)


def test_community_gguf_names_map_onto_flux_dev_by_name_and_shape():
    bfl = flux_dev_bfl_shapes()
    mapped = GG.diffusers_shapes(bfl)
    assert mapped == GG.parameter_shapes(FLUX_DEV_CONFIG)  # every parameter, each in its shape
    assert mapped["transformer_blocks.0.attn.to_q.weight"] == (3072, 3072)  # qkv split in three
    assert mapped["single_transformer_blocks.0.proj_mlp.weight"] == (12288, 3072)  # linear1 split
    prefixed = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    GG.check_transformer_shapes(
        "flux1-dev-Q8_0.gguf", prefixed, FLUX_DEV_CONFIG
    )  # the full checkpoint's names


def test_community_gguf_that_does_not_fit_the_base_is_one_line():
    with pytest.raises(WeightsError, match=r"lacks 4 tensors .*guidance_embedder.* needs --model dev"):
        GG.check_transformer_shapes("schnell.gguf", flux_dev_bfl_shapes(guidance=False), FLUX_DEV_CONFIG)
    cut = {k: v for k, v in flux_dev_bfl_shapes().items() if k != "double_blocks.3.img_attn.proj.weight"}
    with pytest.raises(WeightsError, match=r"cut.gguf is not a whole FLUX.1 transformer .*double_blocks.3"):
        GG.check_transformer_shapes("cut.gguf", cut, FLUX_DEV_CONFIG)
    wide = {**flux_dev_bfl_shapes(), "img_in.weight": (3072, 128)}
    with pytest.raises(
        WeightsError, match=r"x_embedder.weight is \(3072, 128\), the base wants \(3072, 64\)"
    ):
        GG.check_transformer_shapes("wide.gguf", wide, FLUX_DEV_CONFIG)


def test_gguf_header_gives_names_types_and_torch_order_shapes(base_gguf):
    tensors = GG.gguf_tensors(base_gguf)
    model = tiny_transformer()
    assert {k: shape for k, (_, shape) in tensors.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    assert {kind for kind, _ in tensors.values()} == {*GGUF_TYPES, "F32"}


def test_truncated_or_foreign_gguf_is_refused_in_one_line(base_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(base_gguf.read_bytes()[: base_gguf.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"cut.gguf is not a readable GGUF file, truncated or not GGUF"):
        GG.check_gguf_file(cut)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(WeightsError, match=r"not a readable GGUF file"):
        GG.check_gguf_file(tmp_path / "text.gguf")
    llama = write_gguf(torch.nn.Linear(32, 8), tmp_path / "llama.gguf", names=lambda k: f"blk.0.attn_q.{k}")
    with pytest.raises(WeightsError, match=r"llama.gguf is not a FLUX.1 transformer \(its tensors: blk.0"):
        GG.check_gguf_file(llama)


# ---------------------------------------------------------------- checks


def test_cuda_only_modes_are_refused_without_cuda_naming_what_runs():
    cpu = torch.device("cpu")
    assert Q.device_problems("nf4", "none", cpu) == [
        "--quantize nf4 needs a CUDA GPU; on cpu use --quantize int8 or fp8"
    ]
    assert "--quantize fp8dq needs a CUDA GPU" in Q.device_problems("fp8dq", "none", cpu)[0]
    assert Q.device_problems("none", "nf4", cpu) == [
        "--quantize-text nf4 needs a CUDA GPU; on cpu use --quantize-text int8 or fp8"
    ]
    assert Q.device_problems("int8", "fp8", cpu) == [] and Q.device_problems("fp8", "int8", cpu) == []


def test_fp8dq_on_a_card_without_fp8_matmuls_names_fp8_and_int8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    [problem] = Q.device_problems("fp8dq", "none", torch.device("cuda"))
    assert "needs fp8 matmuls" in problem and "RTX 3090 is 8.6" in problem
    assert "use --quantize fp8 (same memory) or int8" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert Q.device_problems("fp8dq", "none", torch.device("cuda")) == []


@pytest.mark.parametrize("package", ["bitsandbytes", "torchao"])
def test_a_missing_package_gives_the_pip_command(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    mode = "nf4" if package == "bitsandbytes" else "int8"
    assert Q.device_problems(mode, "none", torch.device("cuda")) == [
        f"--quantize {mode} needs {package}: pip install {package}"
    ]
    with pytest.raises(
        ClearGenError, match=f"^--quantize-text {mode} needs {package}: pip install {package}$"
    ):
        Q.check_device("none", mode, torch.device("cuda"))


def test_names_are_checked_from_the_arguments_alone():
    with pytest.raises(ClearGenError, match=r"unknown --quantize 'q4'; choose none, fp8, fp8dq, int8 or nf4"):
        Q.check_names("q4", "none", None)
    with pytest.raises(
        ClearGenError, match=r"unknown --quantize-text 'fp8dq'; choose none, int8, fp8 or nf4"
    ):
        Q.check_names("none", "fp8dq", None)
    with pytest.raises(ClearGenError, match=r"takes a FLUX.1 transformer .gguf file"):
        Q.check_names("none", "none", "flux1-dev.safetensors")
    with pytest.raises(
        ClearGenError, match=r"x.gguf is quantized already \(GGUF\); leave out --quantize int8"
    ):
        Q.check_names("int8", "none", "dir/x.gguf")


def test_gguf_with_sequential_offload_is_refused():
    problems = Q.device_problems("none", "none", torch.device("cuda"), "sequential", gguf=True)
    assert problems == [
        "a GGUF --transformer does not run with --offload sequential (accelerate drops its quantization "
        "types); use --offload model"
    ]


# ---------------------------------------------------------------- end to end on the tiny pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny / "transformer")
    return write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-flux-mixed.gguf")


@pytest.fixture(autouse=True)
def _offline(offline_hub):
    """Every test here runs offline with an empty Hugging Face cache (conftest's offline_hub)."""


def common(tiny: Path, out: Path) -> list[str]:
    return ["a red fox", "--model", str(tiny), "--out", f"{out}/", "--max-sequence-length", "16", "--steps",
            "2", "--res", "256", "--seed", "7", "--backend", "dense", "--no-compare-full"]  # fmt: skip


def saved(out: Path) -> ImageRecord:
    [png] = sorted(out.glob("*.png"))
    return ImageRecord.from_png(png)


@pytest.mark.slow
def test_load_pipeline_quantizes_the_transformer_and_t5(tiny):
    weights = WeightsSpec(str(tiny), quantize="int8", quantize_text="fp8")
    pipe = load_pipeline(weights, "none", torch.device("cpu"), torch.bfloat16)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    t5_q = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight
    assert type(t5_q).__name__ == "Float8Tensor"
    clip = [m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert clip and all(type(m.weight) is torch.nn.Parameter for m in clip)  # CLIP stays as it was


@pytest.mark.slow
def test_quantize_int8_end_to_end_in_bf16(tiny, tmp_path, capsys):
    code, _, err = run(
        common(tiny, tmp_path) + ["--dtype", "bf16", "--quantize", "int8", "--quantize-text", "int8"], capsys
    )
    assert code == 0, err
    assert "(transformer int8, T5 int8)" in err
    record = saved(tmp_path)
    assert (record.extra["quantize"], record.extra["quantize_text"], record.extra["dtype"]) == (
        "int8",
        "int8",
        "bf16",
    )
    again = options_from_record(record)
    assert (again.quantize, again.quantize_text) == ("int8", "int8")


@pytest.mark.slow
def test_gguf_transformer_generates_through_the_cli_with_clear(tiny, tiny_gguf, tmp_path, capsys):
    plain, gguf = tmp_path / "plain", tmp_path / "gguf"
    assert run(common(tiny, plain) + ["--window", "2"], capsys)[0] == 0
    code, _, err = run(common(tiny, gguf) + ["--window", "2", "--transformer", str(tiny_gguf)], capsys)
    assert code == 0, err
    assert "(transformer tiny-flux-mixed.gguf)" in err
    record = saved(gguf)
    assert record.extra["transformer"] == str(tiny_gguf) and record.window == 2
    assert options_from_record(record).transformer == str(tiny_gguf)
    again = options_from_record(record, quantize="int8")  # --from it with --quantize: the base, quantized
    assert (again.transformer, again.quantize) == (None, "int8")
    from PIL import Image

    images = [np.asarray(Image.open(next(d.glob("*.png")))) for d in (plain, gguf)]
    assert images[0].shape == images[1].shape and not np.array_equal(*images)  # the GGUF weights ran


def error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded weights although the run was refused")

    monkeypatch.setattr("clear_gen.run.generate.load_pipeline", refuse)
    monkeypatch.setattr("clear_gen.run.generate.load_clear_weights", refuse)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--quantize", "nf4"], "--quantize nf4 needs a CUDA GPU; on cpu use --quantize int8 or fp8"),
        (["--quantize", "fp8dq"], "--quantize fp8dq needs a CUDA GPU; on cpu use --quantize int8 or fp8"),
        (
            ["--quantize-text", "nf4"],
            "--quantize-text nf4 needs a CUDA GPU; on cpu use --quantize-text int8 or fp8",
        ),
        (["--quantize", "int4"], "unknown --quantize 'int4'"),
        (["--transformer", "x.safetensors"], "--transformer takes a FLUX.1 transformer .gguf file"),
    ],
)
def test_bad_quantization_is_one_line_before_loading(tiny, tmp_path, capsys, nothing_loads, args, expected):
    code, _, err = run(common(tiny, tmp_path) + ["--device", "cpu"] + args, capsys)
    assert expected in error_line(code, err)


@pytest.mark.parametrize("kind", ["truncated", "foreign", "missing", "hub offline"])
def test_bad_gguf_transformer_is_one_line_before_loading(
    kind, tiny, tiny_gguf, tmp_path, capsys, nothing_loads
):
    if kind == "truncated":
        spec = tmp_path / "cut.gguf"
        spec.write_bytes(tiny_gguf.read_bytes()[:-100])
        expected = "cut.gguf is not a readable GGUF file, truncated or not GGUF"
    elif kind == "foreign":
        spec = write_gguf(torch.nn.Linear(32, 8), tmp_path / "llm.gguf", names=lambda k: f"blk.0.ffn_up.{k}")
        expected = "llm.gguf is not a FLUX.1 transformer (its tensors: blk.0.ffn_up.bias"
    elif kind == "missing":
        spec, expected = (
            tmp_path / "nowhere.gguf",
            "--transformer " + str(tmp_path / "nowhere.gguf") + ": no such",
        )
    else:
        spec, expected = (
            "someone/flux-gguf/flux1-dev-Q4_K_S.gguf",
            "run `hf download someone/flux-gguf flux1-dev-Q4",
        )
    code, _, err = run(common(tiny, tmp_path / "out") + ["--transformer", str(spec)], capsys)
    assert expected in error_line(code, err)


def test_gguf_of_another_model_is_one_line(tiny, base_gguf, tmp_path, capsys, nothing_loads):
    """conftest's transformer (4 latent channels) on the tiny pipeline's base (64): refused before loading."""
    code, _, err = run(common(tiny, tmp_path) + ["--transformer", str(base_gguf)], capsys)
    line = error_line(code, err)
    assert (
        "does not fit the base's transformer: proj_out.bias is (4,), the base wants (64,) (3 tensors" in line
    )
