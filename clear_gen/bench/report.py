"""A benchmark session kept as JSON lines, and its Markdown report: what scripts/gpu_bench.sh brings back.

Each line of the file is a benchmark row tagged with its `part`, or a part's status
(`{"part": "step-8k", "status": "killed: cap of 75 s reached"}`). A row written again (a step row once
CLEAR is measured, then with full attention) replaces the earlier one. The report is rewritten after
every line, so a run cut short still leaves its tables and says which parts did not run.

Also the tables of `clear-gen bench` (rich and Markdown). Standard library only, so that a shell script
can rewrite the report without importing torch: `python3 clear_gen/bench/report.py ROWS.jsonl OUT.md`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _timing_cells(row: dict) -> list[str]:
    full = _fmt(row["full_ms"]) if row["full_ms"] is not None else "skipped"
    speedup = _fmt(row["speedup"], ".2f") + ("x" if row["speedup"] else "")
    if row.get("full_estimated"):
        full, speedup = f"~{full} (est.)", f"~{speedup} (est.)"
    elif row.get("full_composed"):
        full, speedup = f"{full} (composed)", f"{speedup} (composed)"
    check = "-" if "check_ok" not in row else ("pass" if row["check_ok"] else "FAIL")
    if "check_ok" in row:
        err = row.get("check_max_err", row.get("check_rel_err"))
        check += f" {err:.1e} @{row['check_res']}"
        if row.get("check_split_max_err") is not None:
            check += f" (split {row['check_split_max_err']:.1e})"
    compile_s = _fmt(row["clear_compile_ms"] / 1e3 if row.get("clear_compile_ms") is not None else None)
    peak = _fmt(row["peak_mem_mb"], ".0f")
    split = "-"
    if row.get("image_rows_ms") is not None:
        split = f"{row['image_rows_ms']:.1f} + {row['text_rows_ms']:.1f}"
        split += f" (split {row['split_ms']:.1f})" if row.get("split_ms") is not None else ""
    clear = "refused" if row.get("refused") else "failed" if row.get("failed") else _fmt(row["clear_ms"])
    if row.get("plain_ms") is not None:  # --compile / --quantize: the plain step, same process
        clear += f" (plain {row['plain_ms']:.1f})"
    return [full, clear, compile_s, speedup, peak, split, check]


PLAN_COLUMNS = (
    "res", "r", "f", "tokens", "needed dens.", "computed dens.", "computed/needed", "row-major",
    "mask build ms med/min", "linear PF", "full attn PF", "CLEAR attn PF exact/comp.", "bound",
)  # fmt: skip
TIMING_COLUMNS = (
    "res", "r", "f", "tokens", "backend", "computed dens.", "full ms", "CLEAR ms", "compile s", "speedup",
    "peak MB", "image + text rows ms", "check",
)  # fmt: skip
CHECK_COLUMNS = ("res", "r", "f", "tokens", "query rows", "max err", "tol", "check")
ENV_COLUMNS = ("device", "capability", "free / total GB", "torch", "CUDA", "triton", "diffusers", "torchao",
               "transformers", "huggingface-hub", "flash-attn-4", "Python")  # fmt: skip


def _check_cells(row: dict) -> list[str]:
    """CLEAR's kernel against the dense reference at one size (bench --what check)."""
    head = [str(row["res"]), str(row["window"]), str(row["down_factor"]), str(row["tokens"])]
    verdict = "pass" if row["check_ok"] else "FAIL"
    return [*head, str(row["check_rows"]), f"{row['check_max_err']:.1e}", f"{row['check_tol']:.0e}", verdict]


def _env_cells(row: dict) -> list[str]:
    memory = "-" if row.get("total_gb") is None else f"{row['free_gb']:.1f} / {row['total_gb']:.1f}"
    names = ("torch", "cuda", "triton", "diffusers", "torchao", "transformers", "huggingface-hub",
             "flash-attn-4", "python")  # fmt: skip
    return [row["device"], row.get("capability") or "-", memory, *(row.get(n) or "-" for n in names)]


def _how(row: dict) -> str:
    """How a full-attention figure was found, when it was not run: ' (est.)' (FLOP model), ' (composed)'
    (from timed attention ops), else ''."""
    return " (est.)" if row.get("full_estimated") else " (composed)" if row.get("full_composed") else ""


COMM_COLUMNS = (
    "res", "r", "f", "GPUs", "tokens/GPU", "PF/GPU", "compute s", "a2a GB", "NVLink s", "PCIe s",
    "400 Gb/s s", "halo GB", "halo 400 Gb/s s",
)  # fmt: skip
LINK_KEYS = ("a2a_s NVLink", "a2a_s PCIe", "a2a_s 400 Gb/s")


def _comm_cells(row: dict) -> list[str]:
    """One GPU count at one size: compute and sequence mode's traffic per GPU and step (n/a: the heads do not
    split over that many GPUs), then the halo layout's."""
    na = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    return [
        str(row["res"]), str(row["window"]), str(row["down_factor"]), str(row["gpus"]),
        str(-(-row["tokens"] // row["gpus"])), f"{row['pflop_per_gpu']:.3f}", f"{row['compute_s']:.3f}",
        na(row["a2a_gb"], ".2f"), *(na(row[k], ".3f") for k in LINK_KEYS),
        f"{row['halo_gb']:.2f}", f"{row['halo_s 400 Gb/s']:.3f}",
    ]  # fmt: skip


IMAGE_COLUMNS = (
    "stage", "size", "attention", "steps", "s/step", "compile s", "decode s", "VAE tiles", "total s",
    "full s/step", "speedup", "peak GB", "skipped",
)  # fmt: skip


def _image_cells(row: dict) -> list[str]:
    """A stage of `--what image`, or the whole image (stage "all": its speedup is the image's)."""
    est = _how(row)
    full = "-" if row.get("full_step_s") is None else f"{row['full_step_s']:.2f}{est}"
    speedup = "-" if not row.get("speedup") else f"{row['speedup']:.2f}x{est}"
    peak = "-" if row.get("peak_mem_mb") is None else f"{row['peak_mem_mb'] / 1024:.1f}"
    evals, skipped = row.get("block_evals", 0), row.get("blocks_skipped", 0)
    skip = f"{skipped}/{evals + skipped}" if evals + skipped else "-"
    return [
        str(row["stage"]), f"{row['width']}x{row['height']}", row["attention"], str(row["steps"]),
        _fmt(row["step_s"], ".2f"), _fmt(row["compile_s"]), _fmt(row["decode_s"]),
        row.get("vae_tiling") or "-", _fmt(row["total_s"]),
        full, speedup, peak, skip,
    ]  # fmt: skip


VAE_COLUMNS = (
    "op", "px", "tiling", "tile px", "s", "peak GB", "plan GB", "peak / plan", "vs untiled", "vs float32",
)  # fmt: skip


def _vae_cells(row: dict) -> list[str]:
    """One VAE call of the vae-8k part (bench/vae.py): its time and peak beside the plan's model, exact
    tiles' error against the untiled call and each one's against the untiled float32 call (mean / max;
    decode: levels of 255; encode: latent units)."""
    unit = "levels" if row["op"] == "decode" else "latent"
    error, ref = (
        "-" if row.get(f"{k}max") is None else f"{row[f'{k}mean']:.2g} / {row[f'{k}max']:.2g} {unit}"
        for k in ("err_", "ref_err_")
    )
    seconds = f"failed: {row['error']}" if row.get("error") else _fmt(row.get("seconds"), ".2f")
    peak, model = row.get("peak_gb"), row["model_gb"]
    ratio = "-" if peak is None or not model else f"{peak / model:.2f}"
    return [
        row["op"], str(row["res"]), row["tiling"], str(row["tile"]), seconds, _fmt(peak), _fmt(model),
        ratio, error, ref,
    ]  # fmt: skip


def image_summary(rows: list[dict]) -> str:
    """Where the whole image's time went, from its `all` row; '' without one."""
    total = next((r for r in rows if r["what"] == "image" and r.get("stage") == "all"), None)
    if total is None:
        return ""
    parts = ", ".join(
        f"{name} {total[key]:.1f}" for name, key in [
            ("building random weights", "build_s"), ("load", "load_s"), ("encode", "encode_s"),
            ("stages", "seconds"), ("decode", "decode_s"), ("timing full attention", "compare_s"),
            ("save", "save_s"), ("other", "other_s")] if total.get(key) is not None
    )  # fmt: skip
    text = f"The whole image: {total['total_s']:.1f} s ({parts}). "
    text += f"With the weights in place and full attention not timed: {total['image_s']:.1f} s"
    if total.get("full_image_s"):
        text += f"; the same stages with full attention: {total['full_image_s']:.1f} s{_how(total)}"
    if total.get("recipe_image_s") is not None and total.get("recipe_steps") != total.get("steps_per_stage"):
        text += (f". With the recipe's {total['recipe_steps']} steps a stage, extrapolated at the measured "
                 f"s/step: {total['recipe_image_s']:.1f} s")  # fmt: skip
    return text + "."


def _cells(row: dict) -> list[str]:
    special = {"image": _image_cells, "comm": _comm_cells, "check": _check_cells, "env": _env_cells,
               "vae": _vae_cells}  # fmt: skip
    if row["what"] in special:
        return special[row["what"]](row)
    head = [str(row["res"]), str(row["window"]), str(row["down_factor"]), str(row["tokens"])]
    if row["what"] != "plan":
        backend = row.get("backend") or "-"
        return [*head, backend, f"{row['computed_density']:.2%}", *_timing_cells(row)]
    return [
        *head, f"{row['exact_density']:.2%}", f"{row['computed_density']:.2%}",
        f"{row['computed_over_needed']:.2f}x", f"{row['rowmajor_over_needed']:.2f}x",
        f"{row['mask_build_ms']:.0f} / {row['mask_build_min_ms']:.0f}",
        f"{row['linear_pflop']:.3f}", f"{row['attn_full_pflop']:.3f}",
        f"{row['attn_exact_pflop']:.3f} / {row['attn_computed_pflop']:.3f}", f"{row['speedup_bound']:.1f}x",
    ]  # fmt: skip


def title(rows: list[dict]) -> str:
    """'clear-gen bench --what step on NVIDIA H100 ..., bfloat16, 24 heads x 128, 57 layers'."""
    what, first = rows[0]["what"], rows[0]
    if what == "comm":
        return (
            f"sequence mode (head-parallel) per GPU and step: {first['heads']} heads, {first['layers']} "
            f"layers, bf16; compute s at {first['assumed_tflops']:.0f} TFLOP/s; halo: band layout, on paper"
        )
    text = f"clear-gen bench --what {what} on {first['device']}, torch {first.get('torch', '?')}"
    if what == "env":
        return "what ran: versions, card, GPU memory"
    if what == "vae":
        return (f"exact VAE tiling on {first['device']}, torch {first.get('torch', '?')}: a random VAE of "
                f"FLUX.1's layout, {first['channels']} channels, {first['dtype']}; peak: allocated above the "
                "weights and input; plan: the memory model's activations")  # fmt: skip
    if what == "check":
        return (f"{text}: CLEAR (flex) against the dense reference in float32, one block's attention "
                f"({first['heads']} heads x {first['head_dim']}, {first['dtype']})")  # fmt: skip
    if what == "image":
        speed = f"compile {'on' if first['compile'] else 'off'}, cache {first['cache']}"
        return (f"{text}, {first['dtype']}, {first['heads']} heads x {first['head_dim']}, {first['layers']} "
                f"layers, VAE {first['vae_channels']} ch, tiny random text encoders; {speed}")  # fmt: skip
    if what != "plan":
        text += f", {first['dtype']}, {first['heads']} heads x {first['head_dim']}"
        text += f", {first['layers']} layers" if what == "step" else ""
        speed = [f"--quantize {first['quantize']}"] if first.get("quantize", "none") != "none" else []
        speed += ["--compile"] if first.get("compile") else []
        text += f", {' '.join(speed)} (plain: the same step before)" if speed else ""
        if first.get("parallel") == "sequence":  # under torchrun; its check is against one GPU's step
            text += f", sequence mode on {first['gpus']} GPU{'s' * (first['gpus'] > 1)} (check: vs one GPU)"
    return text


def _columns(rows: list[dict]) -> tuple[str, ...]:
    kinds = {"plan": PLAN_COLUMNS, "image": IMAGE_COLUMNS, "comm": COMM_COLUMNS, "check": CHECK_COLUMNS,
             "env": ENV_COLUMNS, "vae": VAE_COLUMNS}  # fmt: skip
    return kinds.get(rows[0]["what"], TIMING_COLUMNS)


def table(rows: list[dict]):
    """A rich Table of benchmark rows (all of one kind), titled with the device and settings."""
    from rich.table import Table

    caption = "\n".join(filter(None, [image_summary(rows), *_why_not(rows)]))
    out = Table(title=title(rows), caption=caption or None)
    for col in _columns(rows):
        out.add_column(col, justify="right")
    for row in rows:
        out.add_row(*_cells(row))
    return out


def table_markdown(rows: list[dict]) -> str:
    """The same table in Markdown, for BENCHMARKS.md."""
    cols = _columns(rows)
    lines = [f"{title(rows)}\n", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    summary = "\n".join(filter(None, [image_summary(rows), *_why_not(rows)]))  # under the table
    return "\n".join(lines) + "\n" + (f"\n{summary}\n" if summary else "")


def _why_not(rows: list[dict]) -> list[str]:
    """One line per backend that did not run a size: '- flex-fa4 at 8192 px: refused: ...'."""
    return [
        f"- {row.get('backend')} at {row['res']} px: {how}: {row[how]}"
        for row in rows
        for how in ("refused", "failed")
        if row.get(how)
    ]


# ---------------------------------------------------------------- a session as JSON lines


def _key(row: dict) -> tuple:
    return (row.get("part"), row["what"], row.get("res"), row.get("window"), row.get("down_factor"),
            row.get("stage"), row.get("gpus"), row.get("backend_asked"), row.get("op"),
            row.get("tiling"))  # fmt: skip


def read(path: Path) -> tuple[list[dict], dict[str, str]]:
    """(rows, status per part) from a JSON-lines file; later lines win. Torn last lines are ignored."""
    rows: dict[tuple, dict] = {}
    parts: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "status" in item:
            parts[item["part"]] = item["status"]
        else:
            rows[_key(item)] = item
    return list(rows.values()), parts


def append(path: Path, item: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(item) + "\n")


def _stock_key(row: dict) -> tuple:
    """What a stock (full-attention) step's time depends on: not the CLEAR variant, but the quantization
    and compilation (an fp8dq or compiled row compared with a bf16 eager stock step would count their gains
    as CLEAR's)."""
    shape = (row.get("layers"), row.get("heads"), row.get("head_dim"), row.get("dtype"))
    speed = (row.get("quantize") or "none", bool(row.get("compile")))
    return (row["res"], row["tokens"], *shape, row["device"], *speed)


def fill_full_from_other_rows(rows: list[dict]) -> None:
    """A CLEAR-only step row, or an image's CLEAR stage whose full attention was estimated, takes the
    full-attention step measured at the same size by another part (then the image's total follows)."""
    measured = {  # run, not estimated nor composed
        _stock_key(r): r for r in rows if r["what"] == "step" and r.get("full_ms") and not _not_run(r)
    }
    for row in rows:
        other = measured.get(_stock_key(row)) if row["what"] in ("step", "image") else None
        if other is None:
            continue
        if row["what"] == "step" and row.get("clear_ms") and not row.get("full_ms"):
            row.update(full_ms=other["full_ms"], full_estimated=False, full_from=other.get("part"))
            row["speedup"] = row["full_ms"] / row["clear_ms"]
        elif row["what"] == "image" and _not_run(row) and row["stage"] != "all" and row["step_s"]:
            row.update(full_step_s=other["full_ms"] / 1e3, full_estimated=False, full_composed=False,
                       full_from=other.get("part"))  # fmt: skip
            row["speedup"] = row["full_step_s"] / row["step_s"]
    for total in [r for r in rows if r["what"] == "image" and r.get("stage") == "all"]:
        _image_total_from_stages(total, [r for r in rows if r["what"] == "image" and r.get("part") ==
                                         total.get("part") and r["stage"] != "all"])  # fmt: skip


def _not_run(row: dict) -> bool:
    return bool(row.get("full_estimated") or row.get("full_composed"))


def _image_total_from_stages(total: dict, stages: list[dict]) -> None:
    """The whole image with full attention again, from its stage rows (some may have just been filled)."""
    if not stages or any(r.get("full_step_s") is None or r.get("step_s") is None for r in stages):
        return
    full = total["image_s"] + sum((r["full_step_s"] - r["step_s"]) * r["steps"] for r in stages)
    total.update(full_image_s=full, speedup=full / total["image_s"],
                 full_estimated=any(r.get("full_estimated") for r in stages),
                 full_composed=any(r.get("full_composed") for r in stages))  # fmt: skip


# ---------------------------------------------------------------- the summary on top

SUMMARY_LINES = 10  # the report opens with at most this many lines, then a blank one


def summary(rows: list[dict], parts: dict[str, str], heading: str) -> list[str]:
    """The report's first lines: a failed correctness check first (when one failed), the heading, then the
    card, the software, correctness, the largest step's speedups (r = 8 and r8-down4), the whole image,
    peak GPU memory and the parts' states. A figure not measured says so."""
    checks = [r for r in rows if r["what"] == "check"]  # else the attention part's own check
    checks = checks or [r for r in rows if r["what"] == "attention" and "check_ok" in r][:1]
    failed = [r for r in checks if not r["check_ok"]]
    lines = [f"**CHECK FAILED**: CLEAR differs from the dense reference: {_checks(failed)}"] if failed else []
    if not failed and parts.get("check", "").startswith(("failed", "killed")):  # the script's check part
        lines = [f"**CHECK DID NOT FINISH**: {parts['check']}"]
    env = next((r for r in rows if r["what"] == "env"), None)
    lines += [f"# {heading}", _card(env, rows), _software(env, rows)]
    verdict = "not measured" if not checks else "FAIL" if failed else "pass"
    dtype = f", {checks[0]['dtype']}" if checks and checks[0].get("dtype") else ""
    lines.append(f"- correctness (CLEAR's kernel{dtype} vs the dense reference in float32): {verdict}"
                 + (f", max |err| {_checks(checks)}" if checks else _status(parts, "check")))  # fmt: skip
    lines += _step_lines(rows, parts)
    lines += _image_lines(rows, parts)
    lines.append("- parts: " + (", ".join(f"{n} {st.split(':')[0]}" for n, st in parts.items()) or "none"))
    assert len(lines) <= SUMMARY_LINES, lines
    return lines


def _status(parts: dict[str, str], *names: str) -> str:
    found = [f"{n}: {parts[n]}" for n in names if n in parts]
    return f" ({'; '.join(found)})" if found else ""


def _checks(rows: list[dict]) -> str:
    """'1.9e-03 @1024 px r=8 f=4 (all rows), 2.3e-03 @4096 px r=8 f=4 (1024 rows)'."""
    return ", ".join(f"{r['check_max_err']:.1e} @{r['check_res']} px r={r['window']} f={r['down_factor']}"
                     + (f" ({r['check_rows']} rows)" if "check_rows" in r else "") for r in rows)  # fmt: skip


def _card(env: dict | None, rows: list[dict]) -> str:
    if env is None:
        return f"- card: {rows[0]['device'] if rows else 'unknown'}"
    memory = f", {env['total_gb']:.1f} GB ({env['free_gb']:.1f} GB free)" if env.get("total_gb") else ""
    capability = f", compute capability {env['capability']}" if env.get("capability") else ""
    return f"- card: {env['device']}{memory}{capability}"


def _software(env: dict | None, rows: list[dict]) -> str:
    if env is None:
        return f"- software: torch {rows[0].get('torch', '?') if rows else '?'}"
    names = ("triton", "diffusers", "torchao", "transformers", "huggingface-hub", "flash-attn-4")
    others = ", ".join(f"{n} {env[n]}" for n in names if env.get(n))
    torch = f"torch {env['torch']} (CUDA {env.get('cuda') or '-'})"
    return f"- software: {torch}, {others}, Python {env['python']}"


def _plain(row: dict) -> bool:
    return (row.get("quantize") or "none") == "none" and not row.get("compile")


def _step_lines(rows: list[dict], parts: dict[str, str]) -> list[str]:
    """One line each for CLEAR r = 8 and r8-down4 at the largest step size of the full model."""
    steps = [r for r in rows if r["what"] == "step" and _plain(r) and r.get("clear_ms")]
    if steps:
        top = max((r["res"], r["layers"]) for r in steps)
        steps = [r for r in steps if (r["res"], r["layers"]) == top]
    lines = []
    for f, name in ((1, "r=8"), (4, "r=8 f=4")):
        row = next((r for r in steps if (r["window"], r["down_factor"]) == (8, f)), None)
        if row is None:
            lines.append(f"- step, CLEAR {name}: not measured{_status(parts, 'step-8k', 'step-8k-r8')}")
            continue
        text = f"- {row['res']} px step, {row['layers']} blocks, CLEAR {name}: {row['clear_ms'] / 1e3:.3g} s"
        if row.get("full_ms"):
            text += f"; full attention {row['full_ms'] / 1e3:.3g} s{_how(row)}: {row['speedup']:.2f}x"
        lines.append(text + _peak(row.get("peak_mem_mb")))
    return lines


def _peak(mb: float | None) -> str:
    return "" if mb is None else f"; peak {mb / 1024:.1f} GB"


def _image_lines(rows: list[dict], parts: dict[str, str]) -> list[str]:
    """The whole image (its `all` row; the last stage's row when the part was cut before the end)."""
    images = [r for r in rows if r["what"] == "image" and _plain(r)]
    part = images[0].get("part") if images else None
    images = [r for r in images if r.get("part") == part]
    stages = [r for r in images if r["stage"] != "all"]
    if not stages:
        return [f"- whole image: not measured{_status(parts, 'image-8k')}"]
    last, total = stages[-1], next((r for r in images if r["stage"] == "all"), None)
    steps = f"{last['steps']} step{'s' * (last['steps'] > 1)} at {last['res']} px"
    stage = f"{last['res']} px s/step {_fmt(last['step_s'], '.2f')}, decode {_fmt(last['decode_s'])} s"
    peak_text = _peak((total or last)["peak_mem_mb"])
    if total is None:
        return [f"- {last['width']}x{last['height']} image: cut before the end{_status(parts, part)}; "
                f"{steps}: {stage}{peak_text}"]  # fmt: skip
    size = f"{total['width']}x{total['height']}"
    text = f"- {size} image ({total['attention']}, {steps}): {total['image_s']:.1f} s"
    text += f" (weights in place); {stage}, save {_fmt(total.get('save_s'))} s{peak_text}"
    recipe = total.get("recipe_image_s")
    if recipe is None or total.get("recipe_steps") == total.get("steps_per_stage"):
        return [text]
    return [text, f"- the same image at the recipe's {total['recipe_steps']} steps a stage: {recipe:.0f} s "
                  "(extrapolated at the measured s/step, not run)"]  # fmt: skip


# ---------------------------------------------------------------- the whole report


def markdown(rows: list[dict], parts: dict[str, str], heading: str = "clear-gen benchmark") -> str:
    """The summary (at most SUMMARY_LINES lines), every part's status, then one table per part."""
    fill_full_from_other_rows(rows)
    try:
        head = summary(rows, parts, heading)
    except Exception as e:  # a GPU session's report keeps its tables whatever the summary meets
        head = [f"# {heading}", f"- summary failed ({type(e).__name__}: {e}); the tables follow"]
    lines = [*head, "", "## parts\n", "| part | status |", "|---|---|"]
    lines += [f"| {name} | {status} |" for name, status in parts.items()]
    for name in dict.fromkeys([r.get("part") for r in rows]):
        part_rows = [r for r in rows if r.get("part") == name]
        for what in dict.fromkeys(r["what"] for r in part_rows):
            lines += [
                "",
                f"## {name or what}",
                "",
                table_markdown([r for r in part_rows if r["what"] == what]),
            ]
    notes = [r for r in rows if r.get("full_from")]
    if notes:
        lines.append("Full attention for a CLEAR-only row: measured at the same size in part "
                     + ", ".join(sorted({r['full_from'] for r in notes})) + ".")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(jsonl: Path, md: Path, heading: str = "clear-gen benchmark") -> None:
    """Rewrite the Markdown report from the JSON-lines file (atomically: a reader never sees half)."""
    rows, parts = read(jsonl)
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown(rows, parts, heading))
    tmp.replace(md)


if __name__ == "__main__":  # python3 clear_gen/bench/report.py ROWS.jsonl OUT.md [TITLE]
    write(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
