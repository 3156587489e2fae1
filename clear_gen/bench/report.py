"""A benchmark session kept as JSON lines, and its Markdown report: what scripts/gpu_bench.sh brings back.

Each line of the file is a benchmark row tagged with its `part`, or a part's status
(`{"part": "step-8k", "status": "killed: timeout after 180 s"}`). A row written again (a step row once
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
    if row.get("full_estimated"):
        full = f"~{full} (est.)"
    speedup = _fmt(row["speedup"], ".2f") + ("x" if row["speedup"] else "")
    if row.get("full_estimated"):
        speedup = f"~{speedup} (est.)"
    check = "-" if "check_ok" not in row else ("pass" if row["check_ok"] else "FAIL")
    if "check_ok" in row:
        err = row.get("check_max_err", row.get("check_rel_err"))
        check += f" {err:.1e} @{row['check_res']}"
    compile_s = _fmt(row["clear_compile_ms"] / 1e3 if row.get("clear_compile_ms") is not None else None)
    peak = _fmt(row["peak_mem_mb"], ".0f")
    split = "-"
    if row.get("image_rows_ms") is not None:
        split = f"{row['image_rows_ms']:.1f} + {row['text_rows_ms']:.1f}"
    clear = "refused" if row.get("refused") else _fmt(row["clear_ms"])
    return [full, clear, compile_s, speedup, peak, split, check]


PLAN_COLUMNS = (
    "res", "r", "f", "tokens", "needed dens.", "computed dens.", "computed/needed", "row-major",
    "mask build ms med/min", "linear PF", "full attn PF", "CLEAR attn PF exact/comp.", "bound",
)  # fmt: skip
TIMING_COLUMNS = (
    "res", "r", "f", "tokens", "backend", "computed dens.", "full ms", "CLEAR ms", "compile s", "speedup",
    "peak MB", "image + text rows ms", "check",
)  # fmt: skip
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
    "stage", "size", "attention", "steps", "s/step", "compile s", "decode s", "total s", "full s/step",
    "speedup", "peak GB", "skipped",
)  # fmt: skip


def _image_cells(row: dict) -> list[str]:
    """A stage of `--what image`, or the whole image (stage "all": its speedup is the image's)."""
    est = " (est.)" if row.get("full_estimated") else ""
    full = "-" if row.get("full_step_s") is None else f"{row['full_step_s']:.2f}{est}"
    speedup = "-" if not row.get("speedup") else f"{row['speedup']:.2f}x{est}"
    peak = "-" if row.get("peak_mem_mb") is None else f"{row['peak_mem_mb'] / 1024:.1f}"
    evals, skipped = row.get("block_evals", 0), row.get("blocks_skipped", 0)
    skip = f"{skipped}/{evals + skipped}" if evals + skipped else "-"
    return [
        str(row["stage"]), f"{row['width']}x{row['height']}", row["attention"], str(row["steps"]),
        _fmt(row["step_s"], ".2f"), _fmt(row["compile_s"]), _fmt(row["decode_s"]), _fmt(row["total_s"]),
        full, speedup, peak, skip,
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
        est = " (est.)" if total.get("full_estimated") else ""
        text += f"; the same stages with full attention: {total['full_image_s']:.1f} s{est}"
    return text + "."


def _cells(row: dict) -> list[str]:
    if row["what"] == "image":
        return _image_cells(row)
    if row["what"] == "comm":
        return _comm_cells(row)
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
    if what == "image":
        speed = f"compile {'on' if first['compile'] else 'off'}, cache {first['cache']}"
        return (f"{text}, {first['dtype']}, {first['heads']} heads x {first['head_dim']}, {first['layers']} "
                f"layers, VAE {first['vae_channels']} ch, tiny random text encoders; {speed}")  # fmt: skip
    if what != "plan":
        text += f", {first['dtype']}, {first['heads']} heads x {first['head_dim']}"
        text += f", {first['layers']} layers" if what == "step" else ""
        if first.get("parallel") == "sequence":  # under torchrun; its check is against one GPU's step
            text += f", sequence mode on {first['gpus']} GPU{'s' * (first['gpus'] > 1)} (check: vs one GPU)"
    return text


def _columns(rows: list[dict]) -> tuple[str, ...]:
    kinds = {"plan": PLAN_COLUMNS, "image": IMAGE_COLUMNS, "comm": COMM_COLUMNS}
    return kinds.get(rows[0]["what"], TIMING_COLUMNS)


def table(rows: list[dict]):
    """A rich Table of benchmark rows (all of one kind), titled with the device and settings."""
    from rich.table import Table

    out = Table(title=title(rows), caption=image_summary(rows) or None)
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
    summary = image_summary(rows)
    return "\n".join(lines) + "\n" + (f"\n{summary}\n" if summary else "")


# ---------------------------------------------------------------- a session as JSON lines


def _key(row: dict) -> tuple:
    return (row.get("part"), row["what"], row["res"], row["window"], row["down_factor"], row.get("stage"),
            row.get("gpus"), row.get("backend_asked"))  # fmt: skip


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
    """What a stock (full-attention) step's time depends on: not the CLEAR variant."""
    return (row["res"], row["tokens"], row.get("layers"), row.get("heads"), row.get("head_dim"),
            row.get("dtype"), row["device"])  # fmt: skip


def fill_full_from_other_rows(rows: list[dict]) -> None:
    """A CLEAR-only step row, or an image's CLEAR stage whose full attention was estimated, takes the
    full-attention step measured at the same size by another part (then the image's total follows)."""
    measured = {
        _stock_key(r): r
        for r in rows
        if r["what"] == "step" and r.get("full_ms") and not r.get("full_estimated")
    }
    for row in rows:
        other = measured.get(_stock_key(row)) if row["what"] in ("step", "image") else None
        if other is None:
            continue
        if row["what"] == "step" and row.get("clear_ms") and not row.get("full_ms"):
            row.update(full_ms=other["full_ms"], full_estimated=False, full_from=other.get("part"))
            row["speedup"] = row["full_ms"] / row["clear_ms"]
        elif row["what"] == "image" and row.get("full_estimated") and row["stage"] != "all" and row["step_s"]:
            row.update(full_step_s=other["full_ms"] / 1e3, full_estimated=False, full_from=other.get("part"))
            row["speedup"] = row["full_step_s"] / row["step_s"]
    for total in [r for r in rows if r["what"] == "image" and r.get("stage") == "all"]:
        _image_total_from_stages(total, [r for r in rows if r["what"] == "image" and r.get("part") ==
                                         total.get("part") and r["stage"] != "all"])  # fmt: skip


def _image_total_from_stages(total: dict, stages: list[dict]) -> None:
    """The whole image with full attention again, from its stage rows (some may have just been filled)."""
    if not stages or any(r.get("full_step_s") is None or r.get("step_s") is None for r in stages):
        return
    full = total["image_s"] + sum((r["full_step_s"] - r["step_s"]) * r["steps"] for r in stages)
    total.update(full_image_s=full, speedup=full / total["image_s"],
                 full_estimated=any(r.get("full_estimated") for r in stages))  # fmt: skip


def markdown(rows: list[dict], parts: dict[str, str], heading: str = "clear-gen benchmark") -> str:
    """Every part's status, then one table per part."""
    fill_full_from_other_rows(rows)
    lines = [f"# {heading}\n", "| part | status |", "|---|---|"]
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
