"""Comparing variants: one prompt, seed and recipe per variant; their PNGs, a side-by-side grid, similarity.

`run(prepare(GenerateOptions(...), ["none", "r8-down4"]))` is what `clear-gen compare` calls. The
reference is `none` (full attention) when it is listed, else the first variant; every image gets PSNR
and SSIM to it (scikit-image), and LPIPS when the `lpips` package and its AlexNet weights are already
on this machine (never downloaded). Each variant is one `pipeline.generate` call on its own parsed spec,
all of them through one `LoadedPipelines`, so the pipeline is loaded once: generate owns loading, the
CLEAR weights' placement and the text encoders' moves, and a second path through them only for compare
would drift from the first.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.flops import step_flops
from ..core.geometry import build_block_lists
from ..errors import ConfigError, OutputError
from ..files import output
from ..files.record import ImageRecord, record_from_image
from ..plan.footprint import RunPlan
from ..plan.memory import plan_run
from ..plan.parse import parse
from ..plan.spec import ClearChoice, GenerateOptions, OutputSpec, RunSpec
from ..weights.hub import resolve_base
from ..weights.loading import clear_weights_file
from ..weights.registry import Registry, load_registry
from ..weights.shapes import model_shapes
from .generate import Hooks, ImageResult, LoadedPipelines, generate

GRID_PANEL_SIDE = 2048  # grid panels are scaled down to this long side; the variants' PNGs keep full size
LPIPS_SIDE = 1024  # LPIPS runs on images scaled down to this long side
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet weights, the backbone of lpips' "alex"


@dataclass(frozen=True)
class CompareVariant:
    """One variant of a comparison: its name as given and the run it makes."""

    name: str  # as given: a registry name, "none" or a published checkpoint file
    spec: RunSpec  # its run, parsed
    tag: str  # its part of the PNG's file name

    @property
    def choice(self) -> ClearChoice:
        return self.spec.attention

    @property
    def short(self) -> str:
        """The name to show: a checkpoint's file name, else the name."""
        return Path(self.name).name if self.choice.weights is not None else self.name


@dataclass
class ComparePlan:
    opts: GenerateOptions  # one prompt, one seed, as asked (each variant's spec sets its attention)
    variants: list[CompareVariant]
    reference: int  # index into variants
    out_dir: Path

    @property
    def seed(self) -> int:
        return self.opts.seeds[0]


@dataclass
class Row:
    """One variant's image, its timing and its similarity to the reference."""

    variant: CompareVariant
    image: ImageResult
    reference: bool = False
    identical: bool = False
    psnr: float | None = None  # dB; None when identical (infinite)
    ssim: float | None = None
    lpips: float | None = None

    @property
    def seconds(self) -> float:
        """Denoising seconds, all stages."""
        return sum(t.seconds for t in self.image.timing.stages)

    @property
    def step_s(self) -> float | None:
        """Warm seconds per step of the last stage, the one the variants differ in; None with one step."""
        return self.image.timing.stages[-1].step_s

    @property
    def wall_s(self) -> float:
        """The image's whole wall time: loading, encoding, stages, decoding, saving."""
        return self.image.timing.total_s

    def step_text(self) -> str:
        return "n/a" if self.step_s is None else f"{self.step_s:.2f}"


@dataclass
class Comparison:
    plan: ComparePlan
    rows: list[Row]
    grid: Path
    lpips_note: str  # how LPIPS was computed, or why not

    def to_json(self) -> list[dict[str, Any]]:
        """One strict-JSON object per variant (no Infinity or NaN)."""
        return [_row_json(row, self.grid, self.plan.seed) for row in self.rows]


def _row_json(row: Row, grid: Path, seed: int) -> dict[str, Any]:
    return {
        "variant": row.variant.name,
        "attention": row.variant.choice.label,
        "reference": row.reference,
        "path": str(row.image.path.resolve()),
        "grid": str(grid.resolve()),
        "identical": row.identical,
        "psnr": _finite(row.psnr),
        "ssim": _finite(row.ssim),
        "lpips": _finite(row.lpips),
        "seconds": row.seconds,
        "step_s": row.step_s,
        "wall_s": row.wall_s,
        "seed": seed,
        "width": row.image.record.width,
        "height": row.image.record.height,
        "timings": row.image.timing.to_json(),
    }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------- planning (no model loaded)


def prepare(opts: GenerateOptions, variants: Sequence[str] | None = None) -> ComparePlan:
    """Check everything before anything runs: prompt, variants, each one's stages, the output directory,
    and the weights (fetched now when not cached: a missing one fails here, not after the first image).

    `variants` default to none and the registry's default variant. With no seed in `opts`, one is
    picked here, so that every variant shares it.
    """
    # 1. One prompt, one seed and the variants, each resolved and its stages planned.
    opts, parsed = _parse(opts, variants)
    reference = next((i for i, v in enumerate(parsed) if v.name == "none"), 0)
    plan = ComparePlan(opts, parsed, reference, _out_dir(opts))
    # 2. Every piece the variants need, from the cache or the Hub: a missing one fails before any runs.
    resolve_base(opts.model, opts.token)
    for v in parsed:
        clear_weights_file(v.choice.hub_variant, v.choice.weights, opts.token)
    return plan


def _parse(
    opts: GenerateOptions, variants: Sequence[str] | None
) -> tuple[GenerateOptions, list[CompareVariant]]:
    """One prompt and one seed (picked now when not given), and the variants resolved (a size a -down4
    variant refuses fails now)."""
    prompts = [p.strip() for p in opts.prompts]
    if len(prompts) != 1 or not prompts[0]:
        raise ConfigError("compare takes one non-empty PROMPT")
    if opts.seeds and len(opts.seeds) > 1:
        raise ConfigError("compare takes one --seed: every variant runs with it")
    seed = opts.seeds[0] if opts.seeds else random.randrange(2**32)
    opts = replace(opts, prompts=prompts, seeds=[seed], count=1, keep_stages=False)
    opts = replace(opts, window=None, down_factor=None, clear_weights=None)
    registry = load_registry()
    names = [n.strip() for n in variants] if variants else ["none", registry.default_variant]
    return opts, _variants(opts, names, registry)


def memory_plans(opts: GenerateOptions, variants: Sequence[str] | None = None) -> list[tuple[str, RunPlan]]:
    """`compare --dry-run`: each variant's memory and time plan (memory.plan_run); loads and fetches
    nothing."""
    opts, parsed = _parse(opts, variants)
    return [(v.name, plan_run(v.spec)) for v in parsed]


def _variants(opts: GenerateOptions, names: list[str], registry: Registry) -> list[CompareVariant]:
    """Each name resolved as --variant resolves it, and its stages planned; repeats and singles refused."""
    example = f"none,{registry.default_variant}"
    if not all(names):
        raise ConfigError(f"--variants has an empty name; give e.g. --variants {example}")
    if len(names) < 2:
        also = example if names[0] == "none" else f"none,{names[0]}"
        raise ConfigError(f"compare needs two variants or more; e.g. --variants {also}")
    published = {v.filename for v in registry.variants.values()}
    seen: dict[str, str] = {}
    parsed = []
    for name in names:
        path = Path(name).expanduser()
        if path.is_file() and path.name not in published:
            raise ConfigError(
                f"--variants {name}: not a published CLEAR file name ({', '.join(sorted(published))})"
            )
        if not path.is_file() and name.endswith(".safetensors"):
            raise ConfigError(f"--variants {name}: no such file")
        key = str(path.resolve()) if path.is_file() else name
        if key in seen:
            raise ConfigError(f"--variants lists {seen[key]} twice; each variant runs once")
        seen[key] = name
        spec = parse(replace(opts, variant=name))
        tag = output.slugify(path.stem if spec.attention.weights is not None else name)
        parsed.append(CompareVariant(name, spec, tag))
    return parsed


def _out_dir(opts: GenerateOptions) -> Path:
    """The output directory, created and checked writable now (not after the first image)."""
    directory = Path(opts.out or ".").expanduser()
    if directory.suffix.lower() == ".png" or directory.is_file():
        raise OutputError(
            f"--out {opts.out}: compare writes one PNG per variant and a grid; give a directory"
        )
    probe = ImageRecord(
        prompt=opts.prompts[0], seed=opts.seeds[0], model=opts.model, steps=1, guidance=0.0,
        width=opts.width, height=opts.height,
    )  # fmt: skip
    output.output_path(f"{directory}/", probe)
    return directory


@dataclass(frozen=True)
class FullCost:
    """The FLOP model's cost of a full-attention step against a CLEAR step, at the target size."""

    width: int
    height: int
    against: str  # the CLEAR variant compared with
    full_flops: float  # one step with full attention
    clear_flops: float  # one step with that CLEAR variant (the blocks its kernel computes)

    @property
    def ratio(self) -> float:
        return self.full_flops / self.clear_flops


def full_attention_cost(plan: ComparePlan) -> FullCost | None:
    """What the `none` variant costs per step against the first CLEAR one; None if either is absent."""
    clear = [v for v in plan.variants if v.choice.window is not None]
    if not clear or all(v.name != "none" for v in plan.variants):
        return None
    v, (w, h) = clear[0], (plan.opts.width, plan.opts.height)
    geo = v.choice.geometry(w, h, v.spec.text_len)
    shape = model_shapes(v.spec.weights.model).transformer.flux_shape  # the model's, not FLUX.1-dev's
    flops = step_flops(shape, geo, build_block_lists(geo).computed_pairs())
    linear = flops["linear"]
    return FullCost(w, h, v.short, linear + flops["attn_full"], linear + flops["attn_computed"])


# ---------------------------------------------------------------- running


def run(
    plan: ComparePlan,
    hooks: Hooks | None = None,
    on_variant: Callable[[int, CompareVariant], None] = lambda i, v: None,
) -> Comparison:
    """Generate each variant's image, score it against the reference and save the grid."""
    # 1. One image per variant: same prompt, seed and recipe.
    rows = []
    pipelines = LoadedPipelines()  # one load for every variant
    for i, v in enumerate(plan.variants):
        on_variant(i, v)
        rows.append(_generate(plan, v, hooks, pipelines))
    rows[plan.reference].reference = True
    # 2. Similarity to the reference.
    pixels = [_pixels(row.image.path) for row in rows]
    lpips, note = lpips_metric()
    for row, image in zip(rows, pixels, strict=True):
        row.identical, row.psnr, row.ssim = similarity(pixels[plan.reference], image)
        if lpips is not None:
            row.lpips = 0.0 if row.identical else lpips(pixels[plan.reference], image)
    # 3. The side-by-side grid.
    return Comparison(plan, rows, save_grid(plan, rows, pixels), note)


def _generate(plan: ComparePlan, v: CompareVariant, hooks: Hooks | None, pipelines: LoadedPipelines) -> Row:
    opts = plan.opts
    name = f"{output.slugify(opts.prompts[0])}-{plan.seed}-{opts.width}x{opts.height}-{v.tag}.png"
    spec = replace(v.spec, output=OutputSpec(str(plan.out_dir / name)))
    [image] = generate(spec, hooks, pipelines=pipelines)
    return Row(v, image)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))  # (H, W, 3) uint8


# ---------------------------------------------------------------- similarity


def similarity(reference: np.ndarray, image: np.ndarray) -> tuple[bool, float | None, float]:
    """(identical, PSNR in dB or None when identical, SSIM) of two (H, W, 3) uint8 images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    assert reference.shape == image.shape, (reference.shape, image.shape)
    if np.array_equal(reference, image):
        return True, None, 1.0  # PSNR is infinite, SSIM exactly 1
    a, b = reference.astype(np.float32), image.astype(np.float32)  # float32: half float64's memory at 8K
    psnr = peak_signal_noise_ratio(a, b, data_range=255.0)
    ssim = structural_similarity(a, b, data_range=255.0, channel_axis=-1)
    return False, float(psnr), float(ssim)


def lpips_metric() -> tuple[Callable[[np.ndarray, np.ndarray], float] | None, str]:
    """LPIPS (AlexNet) if the `lpips` package and its backbone weights are on this machine, and a note."""
    import importlib.util

    import torch

    if importlib.util.find_spec("lpips") is None:
        return None, "LPIPS skipped: the lpips package is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if not weights.is_file():
        return None, f"LPIPS skipped: no local AlexNet weights ({weights}); clear-gen never downloads them"
    import lpips

    model = lpips.LPIPS(net="alex", verbose=False).eval()  # finds the weights in the cache

    def score(reference: np.ndarray, image: np.ndarray) -> float:
        a, b = (_lpips_tensor(x) for x in (reference, image))
        with torch.no_grad():
            return float(model(a, b).item())

    return score, f"LPIPS: AlexNet, on images scaled to a long side of at most {LPIPS_SIDE} px"


def _lpips_tensor(pixels: np.ndarray):
    import torch

    image = Image.fromarray(pixels)
    scale = min(1.0, LPIPS_SIDE / max(image.size))
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]  # (H, W, 3) -> (1, 3, H, W)
    return x.float() / 127.5 - 1.0  # lpips takes [-1, 1]


# ---------------------------------------------------------------- the grid


def panel_lines(row: Row) -> list[str]:
    """The label strip of one panel: variant, timing, similarity."""
    if row.reference:
        score = "reference"
    elif row.identical:
        score = "identical to the reference"
    else:
        score = f"PSNR {row.psnr:.1f} dB, SSIM {row.ssim:.3f}"
    return [row.variant.short, f"{row.step_text()} s/step, {row.seconds:.1f} s", score]


def grid_image(images: Sequence[Image.Image], labels: Sequence[Sequence[str]]) -> Image.Image:
    """The images side by side, scaled to at most GRID_PANEL_SIDE, each above a strip of label lines."""
    first = images[0]
    scale = min(1.0, GRID_PANEL_SIDE / max(first.size))
    pw, ph = max(1, round(first.width * scale)), max(1, round(first.height * scale))
    size = max(10, pw // 24)
    font = ImageFont.load_default(size=size)
    gap, pad, line = max(2, pw // 128), size // 2, round(size * 1.3)
    strip = 2 * pad + line * max(len(lines) for lines in labels)
    grid = Image.new("RGB", (len(images) * pw + (len(images) - 1) * gap, ph + strip), (16, 16, 16))
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, labels, strict=True)):
        x = i * (pw + gap)
        grid.paste(image.convert("RGB").resize((pw, ph), Image.LANCZOS), (x, 0))
        for j, text in enumerate(lines):
            draw.text((x + pad, ph + pad + j * line), _fit(draw, text, font, pw - 2 * pad), font=font)
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut and ended with '...' if it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_grid(plan: ComparePlan, rows: list[Row], pixels: list[np.ndarray]) -> Path:
    """The grid PNG beside the variants' PNGs; its record is the reference's, listing every variant."""
    grid = grid_image([Image.fromarray(p) for p in pixels], [panel_lines(row) for row in rows])
    reference = record_from_image(rows[plan.reference].image.path)
    compared = {
        "variants": [row.variant.name for row in rows],
        "reference": rows[plan.reference].variant.name,
        "panels": [str(row.image.path.resolve()) for row in rows],
        "psnr": [_finite(row.psnr) for row in rows],
        "ssim": [row.ssim for row in rows],
    }
    record = dataclasses.replace(
        reference,
        variant=",".join(row.variant.choice.label for row in rows),  # --from on the grid asks for one
        window=None,
        down_factor=None,
        timings={},
        extra={**reference.extra, "compare": compared},
    )
    opts = plan.opts
    name = f"{output.slugify(opts.prompts[0])}-{plan.seed}-{opts.width}x{opts.height}-compare.png"
    return output.save_png(grid, output.output_path(plan.out_dir / name, record), record)
