"""`clear-gen bench`: CLEAR versus full attention on random FLUX.1-dev-sized weights (no download):
`suite` (plan, attention, step), `image` (a whole image by generate's code path), `report` (the JSON-lines
report gpu_bench.sh writes, readable without torch). May import everything but `cli`.

`clear_gen.bench.run("attention", res=[2048], ...)` returns the rows.
"""

from __future__ import annotations


def run(*args, **kwargs) -> list[dict]:
    """`clear-gen bench`'s measurements (suite.run): see its docstring."""
    from .suite import run as run_suite

    return run_suite(*args, **kwargs)
