"""Several processes as torchrun starts them, on the CPU: gloo over 127.0.0.1 on a free port.

Ranks are forked, with torchrun's environment, from a fork server that has imported torch and diffusers
once (forking this process could deadlock: its OpenMP threads do not survive a fork) and run clear-gen's
CLI cases one after another; one test launches torchrun itself. Every wait has a deadline: a hang fails
the test instead of stalling the run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import save_tiny_controlnet, save_tiny_flux

from clear_gen.core.flops import FluxShape
from clear_gen.core.geometry import image_geometry
from clear_gen.errors import ConfigError, WeightsError
from clear_gen.run import world as PL

DEADLINE_S = 120  # a launch that takes longer has hung (each takes seconds)


# ---------------------------------------------------------------- no processes


def test_slices_cover_the_sequence_in_order():
    for length, parts in [(133, 3), (5, 5), (10, 4), (96, 2)]:
        bounds = PL._slices(length, parts)
        sizes = [end - start for start, end in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == length and max(sizes) - min(sizes) <= 1
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


def test_jobs_modes_and_rounds():
    world = PL.World(rank=1, size=2, mode="auto")
    assert world.decide(5).mode == "data" and world.decide(1).mode == "sequence"
    assert PL.World(rank=0, size=2, mode="data").my_jobs(5) == [0, 2, 4]
    assert PL.World(rank=1, size=2, mode="data").my_jobs(5) == [1, 3, None]  # the last round: no job
    assert PL.World(rank=1, size=2, mode="sequence").my_jobs(3) == [0, 1, 2]
    assert PL.World().decide(5).mode == "none" and PL.World().writes
    assert not PL.World(rank=1, size=2, mode="sequence").writes


def test_heads_that_do_not_split_are_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        PL.SequenceShards(PL.World(rank=0, size=4, mode="sequence"), heads=6)
    assert "6 heads cannot be split over 4" in str(e.value) and "2, 3, 6" in str(e.value)
    assert "\n" not in str(e.value)


def test_parallel_modes_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert PL.start("auto", "cpu") == (PL.World(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node N -m clear_gen"):
        PL.start("sequence", "cpu")
    with pytest.raises(ConfigError, match="choose one of auto, sequence, data"):
        PL.start("tensor", "cpu")


def test_one_process_world_is_the_plain_path():
    world = PL.World()
    assert world.agree(lambda: 3) == 3
    assert world.collect(lambda: 4) == [4] and world.collect(lambda: None) == []
    with pytest.raises(WeightsError):
        world.agree(lambda: (_ for _ in ()).throw(WeightsError("missing")))
    t = torch.ones(2)
    assert world.share(t) is t and world.from_rank0([1, 2]) == [1, 2]


def test_collective_failures_become_one_line():
    world = PL.World(rank=1, size=2, mode="sequence", timeout_s=30)

    def closed():
        raise RuntimeError("[/src/gloo/tcp/pair.cc:537] Connection closed by peer [1.2.3.4]:5. More.")

    def timed_out():
        raise RuntimeError("[/src/gloo/unbound_buffer.cc:129] Timed out waiting 30000ms for send operation")

    for fn, cause in ((closed, "Connection closed by peer [1.2.3.4]:5"), (timed_out, "timed out after 30 s")):
        with pytest.raises(PL.ParallelError) as e:
            world.comm(fn)
        assert str(e.value).startswith("rank 1: lost contact with the other ranks") and cause in str(e.value)


def test_communication_model_by_hand():
    shape = FluxShape(heads=4, head_dim=8, double=1, single=1, in_channels=4)  # C = 32, 2 layers
    geo = image_geometry(text_len=8, height=8, width=8, window=3)  # L = 72 tokens, N = 64
    # 4 L C (P - 1) / P^2 per layer, two layers, and N x 4 channels x 1/2 gathered, 2 bytes each
    assert PL.head_parallel_bytes(shape, geo, 2) == (4 * 72 * 32 / 4 * 2 + 64 * 4 / 2) * 2
    assert PL.head_parallel_bytes(shape, geo, 1) == 0 and PL.halo_bytes(shape, geo, 1) == 0
    # halo: k and v of r - 1 = 2 rows of 8 tokens to two neighbours; text: 2 x 8 x (32 + 4) x 1/2
    assert PL.halo_bytes(shape, geo, 2) == ((4 * 2 * 8 * 32 + 8 * 36) * 2 + 64 * 4 / 2) * 2


def test_bench_plan_gpus_rows():
    from clear_gen import bench

    rows = bench.run("plan", [1024], window=8, down_factor=4, gpus=[2, 5])
    comm = [r for r in rows if r["what"] == "comm"]
    assert [r["gpus"] for r in comm] == [2, 5]
    assert comm[0]["a2a_gb"] > 0 and comm[0]["a2a_s NVLink"] < comm[0]["a2a_s PCIe"]
    assert comm[1]["a2a_gb"] is None  # 24 heads do not split over 5
    with pytest.raises(ConfigError, match="--what plan"):
        bench.run("attention", [1024], gpus=[2])


def test_compare_is_refused_under_torchrun(monkeypatch, capsys):
    from clear_gen.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["compare", "a castle", "--res", "128"])
    assert e.value.code == 1 and "compare runs in one process" in capsys.readouterr().err


# ---------------------------------------------------------------- forked ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_context():
    """Processes forked from a server that imported clear-gen and diffusers' FLUX pipelines, nothing more."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "test_parallel",
            "clear_gen.cli.app",
            "clear_gen.weights.loading",
            "diffusers.pipelines.flux.pipeline_flux",
        ]
    )
    return ctx


def torchrun_env(rank: int, size: int, port: int) -> dict[str, str]:
    hub = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")}  # the test's, offline
    return {
        **hub,
        "RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        PL.TIMEOUT_ENV: "30",
    }


def _cli(argv: list[str], stem: str) -> int:
    """clear-gen's CLI with stdout and stderr in stem.out / stem.err (line-buffered): its exit code."""
    from clear_gen.cli import main

    saved = sys.stdout, sys.stderr
    with open(f"{stem}.out", "w", buffering=1) as out, open(f"{stem}.err", "w", buffering=1) as err:
        sys.stdout, sys.stderr = out, err
        try:
            main(argv)
            return 0
        except SystemExit as e:
            return e.code or 0
        finally:
            sys.stdout, sys.stderr = saved


def _spy_decodes(log: list):
    """Keep the latents of every VAE decode (this rank's)."""
    import clear_gen.run.render as R

    real = R._decode

    def spy(run, latents, stage, what):
        log.append(latents.detach().cpu().clone())
        return real(run, latents, stage, what)

    R._decode = spy


def _rank_main(env: dict, rank: int, cases: list[dict], out: str) -> None:
    """A forked rank: torchrun's environment, then each case's CLI run; codes and latents into `out`."""
    import clear_gen.run.generate as P

    os.environ.update(env)
    decoded: list = []
    _spy_decodes(decoded)
    codes, load = [], P.load_pipeline
    for i, case in enumerate(cases):
        decoded.clear()
        broken = case.get("fail_on_rank") == rank
        P.load_pipeline = _missing if broken else load
        codes.append(_cli(case["argv"], f"{out}/{i}.{rank}"))
        torch.save(list(decoded), f"{out}/{i}.{rank}.pt")
    Path(f"{out}/codes.{rank}.json").write_text(json.dumps(codes))
    os._exit(0)


def _missing(*args, **kwargs):
    raise WeightsError("no FLUX.1 weights on this node; fetch them with `clear-gen download --base dev`")


def launch(size: int, cases: list[dict], out: Path) -> list[list[int]]:
    """Fork `size` ranks running `cases`; each rank's exit codes, or a failure if any rank outlives the
    deadline (then every rank is killed)."""
    out.mkdir(parents=True, exist_ok=True)
    ctx, port = ranks_context(), free_port()
    envs = [torchrun_env(r, size, port) for r in range(size)]
    ranks = [ctx.Process(target=_rank_main, args=(envs[r], r, cases, str(out))) for r in range(size)]
    for p in ranks:
        p.start()
    hung = _wait(ranks, time.monotonic() + DEADLINE_S)
    assert not hung, f"ranks {hung} still running after {DEADLINE_S} s: a hang"
    return [json.loads((out / f"codes.{r}.json").read_text()) for r in range(size)]


def _wait(ranks, deadline: float) -> list[int]:
    """Join every process by the deadline; kill and name those still alive."""
    for p in ranks:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(ranks) if p.is_alive()]
    for i in hung:
        ranks[i].kill()
        ranks[i].join(5)
    return hung


def read(out: Path, case: int, rank: int) -> tuple[str, str]:
    return (out / f"{case}.{rank}.out").read_text(), (out / f"{case}.{rank}.err").read_text()


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory) -> Path:
    """The tiny pipeline with 6 heads, and in its folder a union ControlNet for it and a control picture."""
    model = save_tiny_flux(tmp_path_factory.mktemp("model6"), heads=6)
    save_tiny_controlnet(model / "controlnet", model, union=True)
    noise = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(2))
    Image.fromarray((noise * 255).byte().numpy()).save(model / "control.png")
    return model


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def common(model: Path) -> list[str]:
    return [
        "a castle", "--model", str(model), "--max-sequence-length", "16", "--steps", "2",
        "--first-steps", "2", "--backend", "dense", "--seed", "3", "--device", "cpu", "--json",
    ]  # fmt: skip


SEQUENCE_CASES = {  # r in {2, 4} x f in {1, 2}; a grid no tile divides; SDEdit stages
    "r2 f1, 13 x 9 grid": ["--window", "2", "--width", "208", "--height", "144", "--no-compare-full"],
    "r4 f2": ["--window", "4", "--down-factor", "2", "--res", "128", "--no-compare-full"],
    "r2 f2, SDEdit": ["--window", "2", "--down-factor", "2", "--width", "256", "--height", "128",
                      "--upscale-from", "128", "--keep-stages"],
    "r4 f1, SDEdit stages": ["--window", "4", "--stages", "128,192", "--no-compare-full"],
    "r2 f1, ControlNet, SDEdit": ["--window", "2", "--upscale-from", "128", "--res", "192", "--control-mode",
                                  "1", "--controlnet", "MODEL/controlnet", "--control", "MODEL/control.png"],
}  # fmt: skip


def case_args(model: Path, name: str) -> list[str]:
    """A case's arguments, its MODEL/ paths in the model's folder."""
    return [a.replace("MODEL/", f"{model}/") for a in SEQUENCE_CASES[name]]


@pytest.fixture(scope="module")
def one_process(tiny6, tmp_path_factory):
    """name -> the case run in this process, as a reference: (its JSON row, the latents of each decode);
    each run once per module."""
    import clear_gen.run.render as R

    done: dict[str, tuple[dict, list]] = {}

    def reference(name: str) -> tuple[dict, list]:
        if name not in done:
            out, decoded, real = tmp_path_factory.mktemp("reference"), [], R._decode
            try:
                _spy_decodes(decoded)
                code = _cli([*common(tiny6), *case_args(tiny6, name), "--out", f"{out}/"], str(out / "ref"))
            finally:
                R._decode = real
            assert code == 0, (out / "ref.err").read_text()
            done[name] = json.loads((out / "ref.out").read_text()), decoded
        return done[name]

    return reference


def check_same_as_one_process(one_process, names: list[str], out: Path, codes, size: int) -> None:
    for i, name in enumerate(names):
        assert all(c[i] == 0 for c in codes), read(out, i, 0)[1]
        row, latents = json.loads(read(out, i, 0)[0]), torch.load(out / f"{i}.0.pt")
        ref, ref_latents = one_process(name)
        assert len(latents) == len(ref_latents)  # rank 0 decoded every stage, as one process does
        for a, b in zip(latents, ref_latents, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32: reassociation at most
        assert np.abs(pixels(row["path"]) - pixels(ref["path"])).max() <= 1, name
        stages = row["timings"]["stages"]
        assert row["job"] == 0 and (row["timings"]["gpus"], row["timings"]["parallel"]) == (size, "sequence")
        assert [s["gpus"] for s in stages] == [size if s["attention"] != "full" else 1 for s in stages]
        for r in range(1, size):
            assert read(out, i, r) == ("", "")  # ranks 1.. print nothing
        assert len(list(Path(row["path"]).parent.glob("*.png"))) == 1 + len(row["stage_paths"])  # rank 0's


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def case(model: Path, name: str, out: Path) -> dict:
    return {"argv": [*common(model), *case_args(model, name), "--parallel", "sequence", "--out", f"{out}/"]}


@pytest.mark.slow
def test_sequence_mode_on_two_ranks_equals_one_process(tiny6, one_process, tmp_path):
    out = tmp_path / "ranks"
    names = list(SEQUENCE_CASES)
    cases = [case(tiny6, name, tmp_path / f"png{i}") for i, name in enumerate(names)]
    cases.append({"argv": [*common(tiny6), "--res", "100", "--out", f"{tmp_path}/bad/"]})  # a user error
    alone = [*common(tiny6), "--window", "2", "--res", "128", "--parallel", "sequence"]
    cases.append({"argv": alone, "fail_on_rank": 1})  # rank 1's node lacks the weights: all stop, rank 0 says
    codes = launch(2, cases, out)
    check_same_as_one_process(one_process, names, out, codes, 2)
    bad, broken = len(names), len(names) + 1
    expected = ((bad, "error: size 100x100 is not a multiple of 16"), (broken, "error: rank 1: no FLUX"))
    for i, message in expected:
        assert [c[i] for c in codes] == [1, 1]
        err = read(out, i, 0)[1].strip().splitlines()
        assert [line for line in err if line.startswith("error:")] == err[-1:] and err[-1].startswith(message)
        assert read(out, i, 1) == ("", "") and "Traceback" not in read(out, i, 0)[1]


@pytest.mark.slow
def test_sequence_mode_on_three_ranks(tiny6, one_process, tmp_path):
    tiny2 = save_tiny_flux(tmp_path / "model2", heads=2)
    out = tmp_path / "ranks"
    names = ["r2 f1, 13 x 9 grid", "r2 f2, SDEdit"]
    cases = [case(tiny6, name, tmp_path / f"png{i}") for i, name in enumerate(names)]
    cases.append({"argv": [*common(tiny2), "--window", "2", "--res", "128", "--parallel", "sequence"]})
    codes = launch(3, cases, out)
    check_same_as_one_process(one_process, names, out, codes, 3)
    assert [c[2] for c in codes] == [1, 1, 1]
    last = read(out, 2, 0)[1].strip().splitlines()[-1]
    assert last.startswith("error: sequence mode splits attention heads") and "2 heads cannot" in last
    assert read(out, 2, 1) == ("", "") and read(out, 2, 2) == ("", "")


def _long_run(env: dict, rank: int, model: str, out: str) -> None:
    os.environ.update(env)
    args = [*common(Path(model)), "--window", "2", "--res", "128", "--steps", "400", "--parallel", "sequence"]
    code = _cli([*args, "--no-compare-full", "--out", f"{out}/"], f"{out}/run.{rank}")
    os._exit(code)


@pytest.mark.slow
def test_a_rank_killed_mid_run_ends_the_others_with_an_error(tiny6, tmp_path):
    ctx, port = ranks_context(), free_port()
    envs = [torchrun_env(r, 2, port) for r in range(2)]
    ranks = [ctx.Process(target=_long_run, args=(envs[r], r, str(tiny6), str(tmp_path))) for r in range(2)]
    for p in ranks:
        p.start()
    deadline, err = time.monotonic() + DEADLINE_S, tmp_path / "run.0.err"
    while "step 1/" not in (err.read_text() if err.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)  # until rank 0 is denoising
    os.kill(ranks[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    hung = _wait(ranks, killed_at + 60)
    assert not hung, "rank 0 did not notice that rank 1 died"
    lines = err.read_text().strip().splitlines()
    assert ranks[0].exitcode == 1 and "step 1/" in err.read_text()
    assert lines[-1].startswith("error: rank 0: lost contact with the other ranks"), lines[-3:]
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_data_mode_under_torchrun_spreads_five_jobs(tiny6, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na cat\na dog\na bird\na fish\n")  # jobs 0 and 1 want the same file name
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), PL.TIMEOUT_ENV: "60"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "clear_gen"]
    args = ["--prompts-file", str(prompts), *common(tiny6)[1:], "--window", "2", "--res", "128"]
    args += ["--parallel", "data", "--no-compare-full", "--out", f"{out}/"]
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["job"] for r in rows] == [0, 1, 2, 3, 4]  # once each, in job order
    assert [r["prompt"] for r in rows] == ["a cat", "a cat", "a dog", "a bird", "a fish"]
    paths = {r["path"] for r in rows}
    assert len(paths) == 5 and paths == {str(p) for p in out.glob("*.png")}  # no name taken twice
    assert {r["timings"]["parallel"] for r in rows} == {"data"}
    assert "5 images on 2 GPUs (data mode)" in done.stderr
