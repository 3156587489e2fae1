"""CLEAR inside a tiny FluxTransformer2DModel against a dense reference written here, independently.

The reference keeps tokens row-major, builds the circle mask with explicit coordinates and pools the
down-sampled keys with explicit loops; it shares nothing with clear_gen but diffusers' own layers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_inputs, tiny_transformer
from diffusers.models.embeddings import apply_rotary_emb

import clear_gen
from clear_gen.attention.backends import clear_attention
from clear_gen.attention.processor import ClearAttnProcessor
from clear_gen.attention.weights import expected_checkpoint
from clear_gen.core.geometry import Geometry
from clear_gen.errors import CheckpointError, ConfigError


class ReferenceProcessor:
    """CLEAR attention the slow, obvious way: row-major tokens, dense mask, SDPA."""

    def __init__(self, text_len, h, w, r, f, spatial_weight, proportional):
        self.text_len, self.h, self.w, self.r, self.f = text_len, h, w, r, f
        self.spatial_weight, self.proportional = spatial_weight, proportional

    def mask(self) -> torch.Tensor:
        T, h, w, r, f = self.text_len, self.h, self.w, self.r, self.f
        n, m = h * w, (h // f) * (w // f) if f > 1 else 0
        mask = torch.zeros(T + n, T + n + m, dtype=torch.bool)
        mask[:T, : T + n] = True  # text rows: text and image, no down-sampled tokens
        mask[T:, :T] = True  # image rows: all text
        mask[T:, T + n :] = True  # image rows: all down-sampled tokens
        for i in range(n):
            yi, xi = divmod(i, w)
            for j in range(n):
                yj, xj = divmod(j, w)
                mask[T + i, T + j] = (yi - yj) ** 2 + (xi - xj) ** 2 < r * r
        return mask

    def pool(self, x):  # x: (B, N, H, D) row-major
        f, h, w = self.f, self.h, self.w
        grid = x.view(x.shape[0], h, w, *x.shape[2:])
        s = self.spatial_weight.view(f, f)
        out = torch.zeros(x.shape[0], h // f, w // f, *x.shape[2:], dtype=x.dtype)
        for cy in range(h // f):
            for cx in range(w // f):
                for i in range(f):
                    for j in range(f):
                        out[:, cy, cx] += s[i, j] * grid[:, cy * f + i, cx * f + j]
        return out.flatten(1, 2)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        def heads(t):
            return t.unflatten(-1, (attn.heads, attn.head_dim))

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(e))), q], 1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(e))), k], 1)
            v = torch.cat([heads(attn.add_v_proj(e)), v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        T = self.text_len
        if self.f > 1:
            k = torch.cat([k, self.pool(k[:, T:])], 1)
            v = torch.cat([v, self.pool(v[:, T:])], 1)
        n_tokens = q.shape[1] * (10 if self.f > 1 else 1)
        scale = math.sqrt(math.log(n_tokens) / math.log(4608) / attn.head_dim) if self.proportional else None
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask(), scale=scale
        )
        out = out.transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :T], out[:, T:]
        return attn.to_out[0](image), attn.to_add_out(text)


def clear_checkpoint(model, f: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """A checkpoint in the published format, with random values, for this model."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.2 for k, shape in expected_checkpoint(model, f).items()}


def reference_output(model, sd, inputs, text_len, h, w, r, f, proportional, ntk):
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: v for k, v in sd.items() if "spatial" not in k}, strict=False)
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(ref, kind)):
            weight = sd.get(f"{kind}.{i}.attn.processor.spatial_weight")
            block.attn.set_processor(ReferenceProcessor(text_len, h, w, r, f, weight, proportional))
    ref.pos_embed.theta = 10000 * ntk
    with torch.no_grad():
        return ref(**inputs).sample


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# batch, text_len, h, w, r, f, proportional, ntk: square and not, grids not multiples of the tile.
CASES = [
    (2, 7, 12, 20, 4, 1, False, 1.0),
    (1, 77, 16, 16, 8, 4, True, 10.0),
    (2, 5, 10, 18, 2, 2, True, 1.0),
    (1, 16, 24, 20, 8, 4, False, 10.0),
    (1, 3, 9, 13, 2, 1, True, 10.0),
    (2, 130, 8, 32, 4, 2, False, 1.0),
    (1, 5, 9, 12, 3, 3, False, 1.0),  # f divides no tile side: pooled by a gather, row-major
]


@pytest.mark.parametrize("backend", ["dense", "flex"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-{}x{}-r{}-f{}-p{:d}-ntk{:g}".format(*c))
def test_matches_dense_reference(case, backend):
    batch, text_len, h, w, r, f, proportional, ntk = case
    model = tiny_transformer()
    sd = clear_checkpoint(model, f)
    inputs = tiny_inputs(batch, text_len, h, w)
    expected = reference_output(model, sd, inputs, text_len, h, w, r, f, proportional, ntk)
    clear_gen.apply_clear(
        model,
        window=r,
        down_factor=f,
        state_dict=sd,
        proportional_attention=proportional,
        ntk_factor=ntk,
        backend=backend,
    )
    with torch.no_grad():
        got = model(**inputs).sample
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_flex_matches_reference(dtype):
    text_len, h, w, r, f = 9, 16, 16, 4, 2
    model = tiny_transformer().to(dtype)
    sd = {k: v.to(dtype) for k, v in clear_checkpoint(model, f).items()}
    inputs = tiny_inputs(2, text_len, h, w, dtype=dtype)
    expected = reference_output(model, sd, inputs, text_len, h, w, r, f, True, 10.0)
    clear_gen.apply_clear(
        model, window=r, down_factor=f, state_dict=sd, proportional_attention=True, ntk_factor=10.0
    )
    with torch.no_grad():
        got = model(**inputs).sample
    assert got.dtype == dtype
    assert rel_err(got, expected) < 2e-2


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_window_beyond_diagonal_is_stock_attention(backend):
    model = tiny_transformer()
    inputs = tiny_inputs(2, 11, 10, 14, seed=3)
    with torch.no_grad():
        stock = model(**inputs).sample
        clear_gen.apply_clear(model, window=18, backend=backend)  # 18^2 > 9^2 + 13^2
        got = model(**inputs).sample
    assert rel_err(got, stock) < 1e-5


def test_remove_clear_restores_stock_bit_for_bit():
    model = tiny_transformer()
    inputs = tiny_inputs(1, 7, 8, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        stock = model(**inputs).sample
        clear_gen.apply_clear(
            model,
            window=3,
            down_factor=2,
            state_dict=clear_checkpoint(model, 2),
            ntk_factor=10.0,
            backend="dense",
        )
        assert not torch.equal(model(**inputs).sample, stock)
        clear_gen.remove_clear(model)
        again = model(**inputs).sample
    assert torch.equal(again, stock)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert clear_gen.clear_config(model) is None
    assert model.pos_embed.theta == 10000


def test_apply_twice_replaces_previous():
    model = tiny_transformer()
    inputs = tiny_inputs(1, 7, 8, 8)
    with torch.no_grad():
        stock = model(**inputs).sample
        clear_gen.apply_clear(model, window=2, ntk_factor=10.0, backend="dense")
        clear_gen.apply_clear(model, window=50, backend="dense")
        assert rel_err(model(**inputs).sample, stock) < 1e-5
    assert model.pos_embed.theta == 10000


def test_training_free_spatial_weights_are_uniform():
    model = tiny_transformer()
    clear_gen.apply_clear(model, window=4, down_factor=4)
    procs = [b.attn.processor for b in [*model.transformer_blocks, *model.single_transformer_blocks]]
    assert all(isinstance(p, ClearAttnProcessor) for p in procs)
    for p in procs:
        assert p.spatial_weight.shape == (1, 1, 1, 4, 1, 4, 1)
        assert torch.all(p.spatial_weight == 1 / 16)
    assert "transformer_blocks.0.attn.processor.spatial_weight" in model.state_dict()


def test_published_format_checkpoint_loads():
    model = tiny_transformer()
    sd = clear_checkpoint(model, 4)
    clear_gen.apply_clear(model, window=8, down_factor=4, state_dict=sd)
    state = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(state[key], value), key
    assert "single_transformer_blocks.0.attn.to_q.weight" in sd
    assert "single_transformer_blocks.0.attn.to_out.0.weight" not in sd  # single blocks have no to_out
    assert "transformer_blocks.0.attn.add_q_proj.weight" not in sd  # text branch comes from the base


def _refused(model, sd, down_factor, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    processors = [b.attn.processor for b in model.transformer_blocks]
    with pytest.raises(CheckpointError, match=match):
        clear_gen.apply_clear(model, window=8, down_factor=down_factor, state_dict=sd)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [b.attn.processor for b in model.transformer_blocks] == processors
    assert clear_gen.clear_config(model) is None


def test_checkpoint_missing_key_is_refused_and_nothing_loaded():
    model = tiny_transformer()
    sd = clear_checkpoint(model, 1)
    del sd["single_transformer_blocks.0.attn.to_k.bias"]
    _refused(model, sd, 1, "lacks 1 keys.*single_transformer_blocks.0.attn.to_k.bias")


def test_checkpoint_unexpected_key_is_refused():
    model = tiny_transformer()
    sd = clear_checkpoint(model, 1)
    sd["transformer_blocks.7.attn.to_q.weight"] = torch.zeros(32, 32)
    _refused(model, sd, 1, "unexpected keys: transformer_blocks.7.attn.to_q.weight")


def test_checkpoint_of_another_model_is_refused():
    other = tiny_transformer()
    sd = clear_checkpoint(other, 1)
    sd["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(64, 32)
    _refused(tiny_transformer(), sd, 1, r"transformer_blocks.0.attn.to_q.weight is \(64, 32\)")


def test_down_sampled_checkpoint_with_down_factor_1_is_refused():
    model = tiny_transformer()
    _refused(model, clear_checkpoint(model, 4), 1, "down-sampled .f = 4.*pass down_factor=4")


def test_checkpoint_with_other_down_factor_is_refused():
    model = tiny_transformer()
    _refused(model, clear_checkpoint(model, 2), 4, "spatial_weight is \\(1, 1, 1, 2, 1, 2, 1\\)")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "window must be a positive integer"),
        (dict(window=4, down_factor=0), "down_factor"),
        (dict(window=4, backend="cuda-magic"), "unknown attention backend 'cuda-magic'"),
        (dict(window=4, ntk_factor=0), "ntk_factor"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        clear_gen.apply_clear(tiny_transformer(), **kwargs)


def test_fused_projections_are_refused():
    model = tiny_transformer()
    model.fuse_qkv_projections()
    with pytest.raises(ConfigError, match="unfuse_qkv_projections"):
        clear_gen.apply_clear(model, window=4)


def test_grid_not_divisible_by_down_factor_is_refused():
    model = tiny_transformer()
    clear_gen.apply_clear(model, window=4, down_factor=4)
    with pytest.raises(ConfigError, match="divisible by 4"), torch.no_grad():
        model(**tiny_inputs(1, 3, 8, 10))


def test_img_ids_that_are_not_a_grid_are_refused():
    model = tiny_transformer()
    clear_gen.apply_clear(model, window=4)
    inputs = tiny_inputs(1, 3, 4, 4)
    inputs["img_ids"] = inputs["img_ids"].flip(0)
    with pytest.raises(ConfigError, match="row-major image grid"), torch.no_grad():
        model(**inputs)


def test_dense_backend_refuses_large_sequences():
    geo = Geometry(512, 128, 128, 8)  # 2048 px: 16896 tokens
    q = torch.zeros(1, 1, 1, 8)
    with pytest.raises(ConfigError, match="too large; use --backend gather, flex or auto"):
        clear_attention(q, q, q, geo, 1.0, backend="dense")


def test_positional_call_and_tuple_output():
    model = tiny_transformer()
    inputs = tiny_inputs(1, 5, 6, 10)
    with torch.no_grad():
        stock = model(**inputs).sample
        clear_gen.apply_clear(model, window=20, backend="dense")
        args = [inputs.pop(k) for k in ("hidden_states", "encoder_hidden_states", "pooled_projections")]
        got = model(*args, **inputs, return_dict=False)[0]
    assert rel_err(got, stock) < 1e-5


def test_flex_recompile_limit_is_an_error_not_a_silent_uncompiled_run(monkeypatch):
    import clear_gen.attention.backends as A

    def call(side: int):
        geo = Geometry(3, side, side, 2)
        q = torch.randn(1, 1, geo.q_len, 16)  # k, v apart: torch 2.11's CPU flex refuses one buffer for all
        return clear_attention(q, q.clone(), q.clone(), geo, 0.25, "flex")

    process_limit = torch._dynamo.config.recompile_limit
    monkeypatch.setattr(A, "FLEX_RECOMPILE_LIMIT", 1)
    with pytest.raises(ConfigError, match="different sizes in this process"):
        for side in (5, 6, 7):  # new sizes: each needs a kernel of its own
            call(side)
    monkeypatch.setattr(A, "FLEX_RECOMPILE_LIMIT", 64)
    assert torch.isfinite(call(9)).all()  # the process-wide setting was never touched: still compiles
    assert torch._dynamo.config.recompile_limit == process_limit


def test_checkpoint_on_the_models_device_and_dtype_is_swapped_in_not_copied(transformer):
    sd = clear_checkpoint(transformer, 1)  # float32 on the CPU, like the model
    key = "transformer_blocks.0.attn.to_q.weight"
    original_ptr = transformer.get_parameter(key).data_ptr()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    clear_gen.apply_clear(transformer, window=2, state_dict=sd)
    assert transformer.get_parameter(key).data_ptr() == sd[key].data_ptr()  # shares the checkpoint
    clear_gen.remove_clear(transformer)
    assert transformer.get_parameter(key).data_ptr() == original_ptr  # the original storage is back
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
    # Another dtype cannot be shared: copied in, and the originals restored exactly.
    half = {k: v.bfloat16() for k, v in sd.items()}
    clear_gen.apply_clear(transformer, window=2, state_dict=half)
    assert torch.equal(transformer.get_parameter(key), half[key].float())
    clear_gen.remove_clear(transformer)
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


def test_full_attention_step_is_measured_once_per_size(transformer):
    from clear_gen.files.record import StageTiming
    from clear_gen.run.measure import StepCall, StockSteps, capture_transformer_call

    geo = Geometry(5, 8, 8, 2)
    clear_gen.apply_clear(transformer, window=2)
    with capture_transformer_call(transformer) as inputs, torch.no_grad():
        transformer(**tiny_inputs(1, 5, 8, 8))
    calls = []
    transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    reapply = lambda: clear_gen.apply_clear(transformer, window=2)  # noqa: E731
    timings, stock = [StageTiming(128, 128, "CLEAR r=2", 2, 1.0, 0.01) for _ in range(2)], StockSteps()
    for timing in timings:
        stock.time(StepCall(transformer, inputs), timing, geo, torch.device("cpu"), reapply)
    assert len(calls) == 2  # one warm-up and one timed stock step, for the first image only
    assert timings[0].full_step_s == timings[1].full_step_s > 0 and not timings[1].full_estimated


def test_full_attention_step_with_a_controlnet_runs_both_with_stock_attention(transformer):
    """The stage's steps ran the ControlNet and the transformer; the stock step it is compared with runs
    both too, each with its stock attention, the transformer taking the ControlNet's fresh residuals."""
    from test_controlnet import tiny_controlnet

    from clear_gen.attention import clear_config
    from clear_gen.files.record import StageTiming
    from clear_gen.run.measure import StepCall, StockSteps, capture_transformer_call

    net = tiny_controlnet(transformer, union=False)
    inputs = tiny_inputs(1, 5, 8, 8)
    cond = torch.randn(1, 64, 4)
    clear_gen.apply_clear(transformer, window=2)
    clear_gen.apply_clear(net, window=2)
    with capture_transformer_call(transformer) as seen, capture_transformer_call(net) as net_seen:
        with torch.no_grad():
            blocks, singles = net(
                hidden_states=inputs["hidden_states"], controlnet_cond=cond, encoder_hidden_states=inputs[
                    "encoder_hidden_states"], pooled_projections=inputs["pooled_projections"],
                timestep=inputs["timestep"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
                guidance=inputs["guidance"], return_dict=False,
            )  # fmt: skip
            transformer(**inputs, controlnet_block_samples=blocks, controlnet_single_block_samples=singles)
    calls = []
    for model in (net, transformer):
        model.register_forward_pre_hook(lambda m, a: calls.append((type(m).__name__, clear_config(m))))

    def reapply():
        clear_gen.apply_clear(transformer, window=2)
        clear_gen.apply_clear(net, window=2)

    timing = StageTiming(128, 128, "CLEAR r=2", 2, 1.0, 0.01)
    step = StepCall(transformer, seen, net, net_seen)
    StockSteps().time(step, timing, Geometry(5, 8, 8, 2), torch.device("cpu"), reapply)
    assert calls == [("FluxControlNetModel", None), ("FluxTransformer2DModel", None)] * 2  # warm-up, timed
    assert timing.full_step_s > 0 and not timing.full_estimated
    assert clear_config(net) is not None and clear_config(transformer) is not None  # CLEAR again


def test_cpu_copies_are_views_of_one_buffer_of_exactly_their_bytes():
    from clear_gen.attention.weights import cpu_copies, flat_bytes

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(37, 11, generator=g).bfloat16(),  # odd sizes: 814 bytes
        "a.bias": torch.randn(37, generator=g),  # float32 after a bf16 tensor: needs alignment
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "b.weight": torch.randn(5, 3, generator=g).half().t(),  # not contiguous
        "empty": torch.empty(0, 4),
    }
    copies = cpu_copies(tensors, pin=False)
    assert list(copies) == list(tensors)
    storages = {c.untyped_storage().data_ptr() for c in copies.values()}
    assert len(storages) == 1  # one allocation
    assert copies["a.weight"].untyped_storage().nbytes() == flat_bytes(tensors.values())
    assert flat_bytes(tensors.values()) == 37 * 11 * 2 + 37 * 4 + 8 + 15 * 2
    for name, t in tensors.items():
        assert copies[name].dtype == t.dtype and torch.equal(copies[name], t)  # shape, dtype, values
    tensors["a.bias"].zero_()
    assert copies["a.bias"].abs().sum() > 0  # copies, not aliases


def test_copied_originals_share_one_buffer(transformer):
    sd = {k: v.bfloat16() for k, v in clear_checkpoint(transformer, 1).items()}  # another dtype: copied in
    clear_gen.apply_clear(transformer, window=2, state_dict=sd)
    originals = list(transformer._clear_state.originals.values())
    assert len(originals) == len(sd) and len({t.untyped_storage().data_ptr() for t in originals}) == 1
    assert originals[0].untyped_storage().nbytes() == sum(t.numel() * 4 for t in originals)  # float32
    clear_gen.remove_clear(transformer)


def test_checkpoint_that_stays_on_the_cpu_is_pinned_in_one_buffer_for_a_cuda_model(monkeypatch):
    """No GPU here: a transformer that says it is on CUDA with too little free memory for the checkpoint."""
    from types import SimpleNamespace

    from clear_gen.run import generate

    pinned = []
    monkeypatch.setattr(generate, "cpu_copies", lambda tensors, pin: pinned.append(pin) or dict(tensors))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10, 100))
    weight = SimpleNamespace(device=torch.device("cuda"))
    cuda_model = type("FluxTransformer2DModel", (), {})()  # the family is known by the class name
    cuda_model.x_embedder, cuda_model.dtype = SimpleNamespace(weight=weight), torch.bfloat16
    sd = {"w": torch.ones(4, 4)}
    assert generate.place_clear_weights(sd, cuda_model, activation_bytes=1) == sd and pinned == [True]


@pytest.mark.parametrize("f", [1, 2])
def test_text_rows_apart_are_exactly_clear(f):
    """flex-split: SDPA for the text query rows, FlexAttention for the image rows; the dense reference's
    values, in an output whose (B, L, H, D) reshape is a view."""
    geo = Geometry(128, 16, 24, 3, f)
    g = torch.Generator().manual_seed(f)
    rand = lambda n: torch.randn(2, n, 3, 16, generator=g).transpose(1, 2)  # noqa: E731  (B, H, L, D)
    q, k, v = rand(geo.q_len), rand(geo.kv_len), rand(geo.kv_len)
    split = clear_attention(q, k, v, geo, 0.25, "flex-split")
    torch.testing.assert_close(split, clear_attention(q, k, v, geo, 0.25, "dense"), rtol=1e-5, atol=1e-5)
    assert split.transpose(1, 2).is_contiguous()
    odd = Geometry(100, 16, 24, 3, f)  # text rows end inside a block: the one kernel
    q, k, v = (t[:, :, : odd.kv_len] for t in (q, k, v))
    torch.testing.assert_close(clear_attention(q[:, :, : odd.q_len], k, v, odd, 0.25, "flex-split"),
                               clear_attention(q[:, :, : odd.q_len], k, v, odd, 0.25, "dense"))  # fmt: skip


def test_text_rows_apart_in_the_model_match_the_reference():
    text_len, h, w, r, f = 128, 16, 16, 4, 2
    model = tiny_transformer()
    sd = clear_checkpoint(model, f)
    inputs = tiny_inputs(1, text_len, h, w)
    expected = reference_output(model, sd, inputs, text_len, h, w, r, f, True, 10.0)
    clear_gen.apply_clear(model, window=r, down_factor=f, state_dict=sd, proportional_attention=True,
                          ntk_factor=10.0, backend="flex-split")  # fmt: skip
    with torch.no_grad():
        got = model(**inputs).sample
    assert rel_err(got, expected) < 1e-5


def test_flex_split_runs_only_when_asked():
    from clear_gen.attention.backends import choose

    geo = Geometry(512, 64, 64, 8)
    assert choose("auto", torch.device("cpu"), geo).name == "flex"  # never auto's choice
    assert choose("flex-split", torch.device("cpu"), geo).name == "flex-split"
    with pytest.raises(ConfigError, match="no backward pass on cpu"):
        choose("flex-split", torch.device("cpu"), geo, training=True)


def test_full_attention_step_too_large_to_run_is_composed_from_timed_attention_ops(transformer, monkeypatch):
    """The CLEAR step less its CLEAR attention ops plus as many stock ones, each op timed once at this size;
    the stock step itself never runs."""
    from clear_gen.files.record import StageTiming
    from clear_gen.run import measure as M

    geo = Geometry(5, 8, 8, 2)
    clear_gen.apply_clear(transformer, window=2)
    with M.capture_transformer_call(transformer) as inputs, torch.no_grad():
        transformer(**tiny_inputs(1, 5, 8, 8))
    ops, steps = [], []
    monkeypatch.setattr(M, "attention_ops_ms", lambda *args: ops.append(args) or (50.0, 10.0))
    transformer.register_forward_pre_hook(lambda m, a: steps.append(1))
    timings, stock = [StageTiming(128, 128, "CLEAR r=2", 2, 1.0, 0.5) for _ in range(2)], M.StockSteps()
    step, cpu = M.StepCall(transformer, inputs), torch.device("cpu")
    for timing in timings:  # fits=False: the memory plan says the stock step's activations do not fit
        stock.time(step, timing, geo, cpu, lambda: None, fits=False)
    assert steps == [] and len(ops) == 1  # composed once per size, then remembered
    (geometry, heads, head_dim, _, dtype, backend) = ops[0]
    assert (geometry, heads, head_dim, dtype, backend) == (geo, 2, 16, torch.float32, "auto")
    for timing in timings:
        assert timing.full_composed and not timing.full_estimated
        assert timing.full_step_s == pytest.approx(0.5 + 2 * (0.050 - 0.010))  # 2 blocks: 1 double, 1 single


def test_attention_ops_are_timed_on_the_models_layout():
    from clear_gen.run import measure as M

    geo = Geometry(5, 8, 8, 2, 2)
    q, k, v = M.random_qkv(geo, 2, 16, torch.device("cpu"), torch.float32)
    assert (q.shape, k.shape) == ((1, 2, geo.q_len, 16), (1, 2, geo.kv_len, 16))
    assert q.transpose(1, 2).is_contiguous()  # (B, L, H, D) memory, as the processor passes it
    stock_ms, clear_ms = M.attention_ops_ms(geo, 2, 16, torch.device("cpu"), torch.float32, "dense")
    assert stock_ms > 0 and clear_ms > 0
    assert M.composed_full_step(1.0, 57, 1.5, 0.025) == pytest.approx(1.0 + 57 * 1.475)


# Sequences shorter than one 128-token block, as the tests that issue 24 saw fail (the 9 x 13 case above;
# test_quantize's 8 x 8 grid with 8 text tokens in bf16) and with down-sampled keys (q_len != kv_len).
# batch, text_len, h, w, r, f, dtype
FRESH_CACHE_CASES = [
    (1, 3, 9, 13, 2, 1, "float32"),
    (1, 8, 8, 8, 2, 1, "bfloat16"),
    (2, 5, 8, 8, 2, 2, "float32"),
]


def fresh_cache_child() -> None:
    """Run by test_flex_in_a_fresh_inductor_cache_matches_the_reference in a new process: one line per case,
    `<case> <relative error>`."""
    for batch, text_len, h, w, r, f, name in FRESH_CACHE_CASES:
        dtype = getattr(torch, name)
        model = tiny_transformer().to(dtype)
        sd = {k: v.to(dtype) for k, v in clear_checkpoint(model, f).items()}
        inputs = tiny_inputs(batch, text_len, h, w, dtype=dtype)
        expected = reference_output(model, sd, inputs, text_len, h, w, r, f, False, 1.0)
        clear_gen.apply_clear(model, window=r, down_factor=f, state_dict=sd, backend="flex")
        with torch.no_grad():
            got = model(**inputs).sample
        print(f"T{text_len}-{h}x{w}-r{r}-f{f}-{name} {rel_err(got, expected)}", flush=True)


@pytest.mark.slow  # compiles FlexAttention three times in a new process
def test_flex_in_a_fresh_inductor_cache_matches_the_reference(tmp_path):
    """Issue 24: the compiled CPU kernel was reported to give NaN or wrong values below one 128-token block
    when the inductor cache is fresh (and to be right with a warm one, so that an earlier run's cache hides
    it). Here every kernel is compiled in an empty TORCHINDUCTOR_CACHE_DIR, in a process of its own."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = os.environ | {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "PYTHONPATH": os.pathsep.join([tests, *sys.path]),
    }
    command = [sys.executable, "-c", "import test_attention; test_attention.fresh_cache_child()"]
    done = subprocess.run(command, env=env, cwd=tests, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = dict(line.split() for line in done.stdout.splitlines())
    assert len(errors) == len(FRESH_CACHE_CASES), done.stdout
    for case, err in errors.items():
        assert float(err) < (2e-2 if case.endswith("bfloat16") else 1e-5), (case, err)  # NaN fails too
