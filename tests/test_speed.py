"""--compile and --cache (speed.py): compiled blocks match eager ones, caches skip block evaluations and
compose with CLEAR's hooks in either order, --cache none changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_inputs, tiny_transformer

from clear_gen.attention import apply_clear, remove_clear
from clear_gen.errors import ConfigError
from clear_gen.files.record import ImageRecord
from clear_gen.models.flux1 import use_exact_positions
from clear_gen.plan.spec import parse_cache
from clear_gen.run import speed as S

CLEAR = dict(window=3, down_factor=2, backend="flex")


def steps(h: int = 8, w: int = 12, n: int = 4, same: bool = False) -> list[dict]:
    """Inputs of n transformer calls: the same every time, or a new latent each call."""
    return [tiny_inputs(1, 8, h, w, seed=1 if same else 1 + i) for i in range(n)]


def outputs(model, calls: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**x, return_dict=False)[0] for x in calls]


def cached(model, spec: str, calls: list[dict]) -> tuple[list[torch.Tensor], S.BlockCount]:
    with torch.no_grad(), S.step_cache(model, parse_cache(spec)) as count:
        return outputs(model, calls), count


def untouched(model) -> bool:
    """No diffusers hook left on any module, and every forward the class's own."""
    return all(
        not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in model.modules()
    ) and all(getattr(m.forward, "__func__", None) is type(m).forward for m in model.modules())


@pytest.mark.parametrize(
    "spec, kind, value",
    [("none", "none", None), ("fbc", "fbc", 0.05), ("FBC:0.2", "fbc", 0.2), ("taylorseer", "taylorseer", 5.0),
     ("taylorseer:3", "taylorseer", 3.0), (None, "none", None)],
)  # fmt: skip
def test_cache_specs(spec, kind, value):
    choice = parse_cache(spec)
    assert (choice.kind, choice.value) == (kind, value)
    assert parse_cache(str(choice)) == choice  # what a PNG records reads back the same


@pytest.mark.parametrize(
    "spec", ["teacache", "fbc:x", "fbc:0", "fbc:-1", "taylorseer:0", "taylorseer:2.5", "none:1"]
)
def test_bad_cache_specs_are_one_line_errors(spec):
    with pytest.raises(ConfigError, match="--cache"):
        parse_cache(spec)


def test_cache_none_installs_nothing_and_changes_nothing():
    model = tiny_transformer(layers=2, single_layers=2)
    calls = steps()
    before = outputs(model, calls)
    with torch.no_grad(), S.step_cache(model, parse_cache("none")) as count:
        assert count is None and untouched(model)
        during = outputs(model, calls)
    assert all(torch.equal(a, b) for a, b in zip(before, during, strict=True))


@pytest.mark.parametrize("spec", ["fbc:0.5", "taylorseer:2"])
def test_caches_skip_block_evaluations_and_leave_no_hook(spec):
    model = tiny_transformer(layers=2, single_layers=2)  # 4 blocks
    calls = steps(n=5, same=True)  # the same input: first-block caching skips every call after the first
    plain = outputs(model, calls)
    outs, count = cached(model, spec, calls)
    assert count.calls == 5 and count.blocks == 4
    if spec.startswith("fbc"):  # the first block always runs; the other 3 only on the first call
        assert count.evaluated == 5 + 3 and count.skipped == 3 * 4
    else:  # taylorseer:2 runs calls 0, 1, 2 and 4 (3 warm-up steps, then one in 2) and predicts call 3
        assert count.evaluated == 4 * 4 and count.skipped == 4
    assert torch.equal(outs[0], plain[0])  # a computed call is the model's own
    after = outputs(model, calls)
    assert untouched(model) and all(torch.equal(a, b) for a, b in zip(after, plain, strict=True))


@pytest.mark.parametrize("clear_first", [True, False])
def test_clear_and_cache_hooks_compose_in_either_order(clear_first):
    """CLEAR + a cache that never skips = CLEAR alone, bit for bit; a skipping cache does the same under
    CLEAR whichever was installed first; removing CLEAR under the cache leaves stock + cache."""
    from diffusers.hooks import FirstBlockCacheConfig

    torch.manual_seed(0)
    calls = steps(n=4)
    model = tiny_transformer(layers=2, single_layers=2)
    use_exact_positions(model)
    stock = outputs(model, calls)
    apply_clear(model, **CLEAR)
    clear_alone = outputs(model, calls)
    remove_clear(model)
    for threshold in (1e-9, 10.0):  # never skips / skips every call after the first
        if clear_first:
            apply_clear(model, **CLEAR)
            model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        else:
            model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
            apply_clear(model, **CLEAR)
        with model.cache_context("cond"):
            both = outputs(model, calls)
        remove_clear(model)  # stock attention again, the cache still on
        model._reset_stateful_cache()  # a new image: the cache forgets the last one
        with model.cache_context("cond"):
            stock_cached = outputs(model, calls)
        model.disable_cache()
        if threshold < 1:
            assert all(torch.equal(a, b) for a, b in zip(both, clear_alone, strict=True))
            assert all(torch.equal(a, b) for a, b in zip(stock_cached, stock, strict=True))
        else:
            assert torch.equal(both[0], clear_alone[0]) and not torch.equal(both[1], clear_alone[1])
            assert torch.equal(stock_cached[0], stock[0])
        assert all(torch.equal(a, b) for a, b in zip(outputs(model, calls), stock, strict=True))


def test_clear_under_a_cache_gives_the_same_whichever_went_first():
    from diffusers.hooks import FirstBlockCacheConfig

    results = []
    for clear_first in (True, False):
        model = tiny_transformer(layers=2, single_layers=2)
        use_exact_positions(model)
        install = [lambda m=model: apply_clear(m, **CLEAR),
                   lambda m=model: m.enable_cache(FirstBlockCacheConfig(threshold=0.3))]  # fmt: skip
        for step in install if clear_first else install[::-1]:
            step()
        with model.cache_context("cond"):
            results.append(outputs(model, steps(n=4, same=True)))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.slow  # compiles the blocks
def test_compiled_clear_transformer_equals_eager():
    torch.manual_seed(0)
    model = tiny_transformer(layers=2, single_layers=2)
    use_exact_positions(model)
    calls = [tiny_inputs(1, 8, 8, 12), tiny_inputs(1, 8, 12, 16)]  # two sizes: a recompile
    apply_clear(model, **CLEAR)
    eager_clear = outputs(model, calls)
    remove_clear(model)
    eager_stock = outputs(model, calls[:1])
    S.compile_blocks(model)
    S.compile_blocks(model)  # idempotent
    apply_clear(model, **CLEAR)
    compiled_clear = outputs(model, calls)
    remove_clear(model)
    compiled_stock = outputs(model, calls[:1])  # as when generate times full attention
    for a, b in zip(eager_clear + eager_stock, compiled_clear + compiled_stock, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert model.transformer_blocks[0]._compiled_call_impl is not None


@pytest.mark.slow  # a whole tiny pipeline
@pytest.mark.usefixtures("offline_hub")
def test_generate_with_a_cache_reports_skipped_blocks_and_from_re_makes_it(tiny, tmp_path, capsys):
    args = ["a red castle", "--model", str(tiny), "--max-sequence-length", "16", "--backend", "dense",
            "--window", "2", "--res", "128", "--stages", "64,128", "--first-steps", "4", "--steps", "6",
            "--seed", "3", "--no-compare-full"]  # fmt: skip
    code, out, err = run_cli([*args, "--out", f"{tmp_path}/a/", "--cache", "fbc:10", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    stages = row["timings"]["stages"]
    assert [s["block_evals"] + s["blocks_skipped"] for s in stages] == [4 * 2, 5 * 2]  # calls x 2 blocks
    # threshold 10: after the first call, only the first of the 2 blocks runs
    assert all(s["blocks_skipped"] == s["block_evals"] - 2 for s in stages)
    assert "skipped" in err and ImageRecord.from_png(Path(row["path"])).extra["cache"] == "fbc:10"
    code, out, err = run_cli(["--from", row["path"], "--out", f"{tmp_path}/b/", "--json"], capsys)
    again = json.loads(out)
    assert code == 0 and again["timings"]["stages"][1]["blocks_skipped"] == stages[1]["blocks_skipped"]
    code, _, err = run_cli([*args, "--out", f"{tmp_path}/c/", "--cache", "fbc:nope"], capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: --cache")
