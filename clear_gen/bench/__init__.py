"""`clear-gen bench`: CLEAR versus full attention on random FLUX.1-dev-sized weights (no download):
`spec` (what is asked, parsed once), `suite` (plan, attention, check, step, env), `check` (CLEAR's kernel
against the dense reference; what runs the benchmarks), `image` (a whole image by generate's code path),
`vae` (exact VAE tiling on a device: gpu_bench.sh's vae-8k part), `report` (the JSON-lines report
gpu_bench.sh writes, with its summary, readable without torch). May import everything but `cli`.

`clear_gen.bench.run("attention", res=[2048], heads=2, head_dim=64, device="cpu")` returns the rows.
"""

from __future__ import annotations

from collections.abc import Callable


def run(
    what: str = "plan",
    res=None,
    *,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    **options,
) -> list[dict]:
    """Rows of one benchmark: `options` are spec.BenchOptions' (res, variant, window, heads, ...), parsed
    once; `progress` hears what runs, `on_row` sees each row as it lands."""
    from .spec import bench_options, parse_bench

    spec = parse_bench(bench_options(what, res=res, **options))
    if spec.asked.what == "image":
        from .image import run as run_image

        return run_image(spec, progress, on_row)
    from .suite import run as run_suite

    return run_suite(spec, progress, on_row)
