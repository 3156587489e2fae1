"""Distillation data: what the teacher made, cached as the training step reads it.

A data folder holds:
    manifest.json                  base, resolution, text length, dtype, source and the count asked for
    samples/000000.safetensors     `mean`, `std` (C, res/8, res/8): the VAE posterior of one image; its
                                   prompt's embeddings the training needs (the model family's
                                   SAMPLE_EMBEDDINGS; FLUX.1: `prompt_embeds` (T, 4096), T5 padded to T,
                                   and `pooled` (768), CLIP)
    validation/00.safetensors      held-out prompts' embeddings, all the family's encode_prompt makes (the
                                   pipeline renders from them), never trained on
Each file is written to a temporary name and renamed, so an interrupted `make_data` leaves only whole
samples, and running it again makes only the missing ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import models
from ..errors import ConfigError
from ..files.text import prompt_lines, read_text

MANIFEST_VERSION = 1
VALIDATION_PROMPTS = (  # held out by default: not in any training prompt list we ship
    "a red fox curled up asleep in fresh snow, soft morning light",
    "an old library with tall wooden shelves and a spiral staircase, warm lamps",
    "a bowl of ramen on a wooden table, steam rising, close-up photograph",
    "a lighthouse on a rocky coast during a storm, waves crashing, dramatic sky",
)


@dataclass
class DataOptions:
    """What `clear-gen distill make-data` makes. One of prompts_file or images."""

    out: Path
    model: str = "dev"  # the teacher: registry base, Hub repo id or local diffusers folder
    prompts_file: Path | None = None  # one prompt a line, # comments; the teacher draws each sample
    images: Path | None = None  # instead: a folder of images with same-stem .txt or .json prompts
    count: int | None = None  # samples; None: one per prompt line, or every image
    res: int = 1024  # square side in px
    steps: int = 20  # the teacher's denoising steps per image
    guidance: float = 3.5
    seed: int = 0  # sample i is drawn with seed + i
    max_sequence_length: int | None = None  # T5 tokens; None: 512 (dev), 256 (schnell)
    validation_prompts: Path | None = None  # None: VALIDATION_PROMPTS
    device: str = "auto"
    dtype: str | None = None  # bf16 on CUDA and MPS, fp32 elsewhere
    token: str | None = None


@dataclass(frozen=True)
class Manifest:
    base: str  # base_id of the teacher
    res: int
    text_len: int
    dtype: str
    source: str  # "teacher" or the images folder
    count: int
    version: int = MANIFEST_VERSION


@dataclass(frozen=True)
class Job:
    """One sample to make: its index, prompt, and the image it encodes (None: the teacher draws it)."""

    index: int
    prompt: str
    seed: int
    image: Path | None = None


@dataclass
class DataSummary:
    out: Path
    made: int  # samples made by this call
    kept: int  # samples already there, not made again
    count: int
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- identity and manifest


def base_id(model: str) -> str:
    """One name per base: a registry name as its Hub repo, a local folder as its absolute path."""
    from ..weights.hub import local_model
    from ..weights.registry import load_registry

    local = local_model(model)
    if local is not None:
        return str(local.resolve())
    bases = load_registry().bases
    return bases[model].repo if model in bases else model


def read_manifest(directory: Path) -> Manifest | None:
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Manifest(**data)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a clear-gen distillation manifest ({e}); use another folder") from e


def check_manifest(found: Manifest, directory: Path, base: str, res: int) -> None:
    """Refuse data of another base or resolution, naming what the folder holds."""
    if found.version != MANIFEST_VERSION:
        raise ConfigError(
            f"{directory} holds data of format {found.version}; make it again with this clear-gen"
        )
    if found.base != base or found.res != res:
        raise ConfigError(
            f"{directory} holds data of {found.base} at {found.res} px, not {base} at {res} px: "
            f"give --model and --res to match, or another folder"
        )


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ---------------------------------------------------------------- planning (nothing loaded)


def read_prompts(path: Path, flag: str) -> list[str]:
    """Non-empty lines that do not start with # (files.text: UTF-8, or UTF-16 with a BOM)."""
    return prompt_lines(path, f"{flag} {path}")


def _image_prompt(image: Path) -> str | None:
    """The prompt in image.txt, or the "prompt" (or "caption", "text") of image.json; None without one."""
    txt, meta = image.with_suffix(".txt"), image.with_suffix(".json")
    if txt.is_file():
        return read_text(txt, str(txt)).strip() or None
    if meta.is_file():
        try:
            data = json.loads(read_text(meta, str(meta)))
        except ValueError:
            return None
        if isinstance(data, dict):
            text = next((data[k] for k in ("prompt", "caption", "text") if isinstance(data.get(k), str)), "")
            return text.strip() or None
    return None


def plan_jobs(opts: DataOptions) -> tuple[list[Job], list[str]]:
    """Every sample of the folder, in order, and notes (images skipped for want of a prompt)."""
    if (opts.prompts_file is None) == (opts.images is None):
        raise ConfigError("give --prompts-file (the teacher draws each image) or --images DIR, one of them")
    if opts.count is not None and opts.count < 1:
        raise ConfigError(f"--count must be at least 1, got {opts.count}")
    if opts.steps < 1 or not opts.guidance >= 0:
        raise ConfigError(
            f"--steps must be at least 1 and --guidance 0 or more; got {opts.steps}, {opts.guidance}"
        )
    if opts.prompts_file is not None:
        prompts = read_prompts(opts.prompts_file, "--prompts-file")
        count = opts.count or len(prompts)
        return [Job(i, prompts[i % len(prompts)], opts.seed + i) for i in range(count)], []
    from ..files.source import IMAGE_SUFFIXES

    if not opts.images.is_dir():
        raise ConfigError(f"--images {opts.images}: not a folder")
    files = sorted(p for p in opts.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = [(p, _image_prompt(p)) for p in files]
    usable = [(p, text) for p, text in pairs if text]
    if not usable:
        raise ConfigError(f"--images {opts.images}: no image with a same-stem .txt or .json prompt")
    skipped = len(pairs) - len(usable)
    notes = [f"{skipped} images skipped: no same-stem .txt or .json prompt"] if skipped else []
    usable = usable[: opts.count] if opts.count else usable
    return [Job(i, text, opts.seed + i, path) for i, (path, text) in enumerate(usable)], notes


def sample_path(directory: Path, index: int) -> Path:
    return directory / "samples" / f"{index:06d}.safetensors"


# ---------------------------------------------------------------- making samples


def make_data(
    opts: DataOptions,
    progress: Callable[[int, int], None] = lambda done, total: None,
    note: Callable[[str], None] = lambda text: None,
) -> DataSummary:
    """Fill opts.out with the teacher's samples (module docstring); only the missing ones are made."""
    from ..core.device import resolve_device, resolve_dtype
    from ..core.sizes import check_size
    from ..plan.parse import text_length
    from ..plan.spec import GenerateOptions

    # 1. Check everything before loading the teacher.
    check_size(opts.res, opts.res, 16)
    jobs, notes = plan_jobs(opts)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    validation = (
        read_prompts(opts.validation_prompts, "--validation-prompts")
        if opts.validation_prompts
        else list(VALIDATION_PROMPTS)
    )
    out = Path(opts.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    text_len = text_length(
        GenerateOptions([], model=opts.model, max_sequence_length=opts.max_sequence_length)
    )
    if not 1 <= text_len <= 512:
        raise ConfigError(f"--max-sequence-length must be 1-512, got {text_len}")
    source = "teacher" if opts.images is None else str(opts.images.resolve())
    manifest = Manifest(
        base_id(opts.model), opts.res, text_len, str(dtype).removeprefix("torch."), source, len(jobs)
    )
    claim_folder(out, manifest)
    # 2. What is left to make; nothing loads when nothing is.
    todo = [job for job in jobs if not sample_path(out, job.index).is_file()]
    held_out = [
        i for i in range(len(validation)) if not (out / "validation" / f"{i:02d}.safetensors").is_file()
    ]
    for text in notes:
        note(text)
    summary = DataSummary(out, 0, len(jobs) - len(todo), len(jobs), notes)
    progress(summary.kept, len(jobs))
    if not todo and not held_out:
        return summary
    # 3. The teacher, then every missing sample.
    pipe = _load_teacher(opts, device, dtype)
    with torch.no_grad():
        for i in held_out:
            embeds = _encode(pipe, validation[i], device, text_len)
            save_tensors(out / "validation" / f"{i:02d}.safetensors", embeds, {"prompt": validation[i]})
        for job in todo:
            save_tensors(sample_path(out, job.index), _sample(pipe, job, opts, device, text_len), _meta(job))
            summary.made += 1
            progress(summary.kept + summary.made, len(jobs))
    return summary


def claim_folder(out: Path, manifest: Manifest) -> None:
    """Write the manifest, or check the one there: a folder holds the data of one base, size and source."""
    found = read_manifest(out)
    if found is not None:
        check_manifest(found, out, manifest.base, manifest.res)
        if (found.text_len, found.source) != (manifest.text_len, manifest.source):
            raise ConfigError(
                f"{out} holds data with {found.text_len} text tokens from {found.source}; use another --out"
            )
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "validation").mkdir(exist_ok=True)
        text = json.dumps(asdict(manifest), indent=1) + "\n"
        _write_atomic(out / "manifest.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out}: {e.strerror}") from e


def _load_teacher(opts: DataOptions, device: torch.device, dtype: torch.dtype):
    """The base as `clear-gen generate` loads it: stock attention, exact RoPE positions."""
    from ..weights.download import check_run_weights
    from ..weights.loading import load_pipeline
    from ..weights.shapes import model_family
    from ..weights.spec import WeightsSpec

    check_run_weights(opts.model, None)
    weights = WeightsSpec(opts.model, opts.token, family=model_family(opts.model))
    return load_pipeline(weights, "none", device, dtype)


def _encode(pipe, prompt: str, device: torch.device, text_len: int) -> dict[str, Tensor]:
    """One prompt's embeddings by name (the family's encode_prompt), without the batch dimension."""
    embeds = models.of(pipe.transformer).encode_prompt(pipe, prompt, device, text_len)
    return {k: v[0] for k, v in embeds.items()}


def _sample(pipe, job: Job, opts: DataOptions, device: torch.device, text_len: int) -> dict[str, Tensor]:
    """One sample: the teacher's image (or the given one) through the VAE encoder; its prompt's embeddings."""
    family = models.of(pipe.transformer)
    embeds = _encode(pipe, job.prompt, device, text_len)
    if job.image is None:
        image = pipe(
            **family.prompt_arguments({k: v[None] for k, v in embeds.items()}),
            height=opts.res,
            width=opts.res,
            num_inference_steps=opts.steps,
            guidance_scale=opts.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed),
        ).images[0]
    else:
        from ..files.source import load_source

        image = load_source(job.image).image
    mean, std = posterior(pipe, image, opts.res)
    return {"mean": mean, "std": std, **{k: embeds[k] for k in family.SAMPLE_EMBEDDINGS}}


def posterior(pipe, image, res: int) -> tuple[Tensor, Tensor]:
    """The VAE posterior (mean, std), each (C, res/8, res/8), of a PIL image scaled and cropped to res."""
    x = pipe.image_processor.preprocess(image, height=res, width=res, resize_mode="crop")  # (1, 3, H, W)
    dist = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return dist.mean[0], dist.std[0]


def _meta(job: Job) -> dict[str, str]:
    meta = {"prompt": job.prompt, "seed": str(job.seed)}
    if job.image is not None:
        meta["image"] = job.image.name
    return meta


# ---------------------------------------------------------------- reading samples (training)


@dataclass
class Batch:
    mean: Tensor  # (B, C, h, w) VAE posterior
    std: Tensor
    embeds: dict[
        str, Tensor
    ]  # the prompts' embeddings by name (FLUX.1: prompt_embeds (B, T, D), pooled (B, P))


class Samples:
    """A data folder made for `base` at `res`, checked, read a batch at a time."""

    def __init__(self, directory: Path, base: str, res: int):
        self.directory = Path(directory).expanduser()
        manifest = read_manifest(self.directory)
        count = manifest.count if manifest else 0
        files = [p for i in range(count) if (p := sample_path(self.directory, i)).is_file()]
        if manifest is None or not files:
            raise ConfigError(
                f"--data {self.directory} has no samples: make them first with "
                f"`clear-gen distill make-data --model ... --prompts-file ... --out {self.directory}`"
            )
        check_manifest(manifest, self.directory, base, res)
        self.manifest, self.files = manifest, files
        self.validation_files = sorted((self.directory / "validation").glob("*.safetensors"))

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: list[int], device: torch.device, dtype: torch.dtype) -> Batch:
        from safetensors.torch import load_file

        loaded = [load_file(str(self.files[i])) for i in indices]
        stack = lambda key: torch.stack([s[key] for s in loaded]).to(device, dtype)  # noqa: E731
        names = [k for k in loaded[0] if k not in ("mean", "std")]
        return Batch(stack("mean"), stack("std"), {k: stack(k) for k in names})

    def validation(self, device: torch.device, dtype: torch.dtype) -> list[tuple[str, dict[str, Tensor]]]:
        """(prompt, its embeddings by name, each (1, ...)) of each held-out prompt."""
        from safetensors import safe_open

        out = []
        for path in self.validation_files:
            with safe_open(str(path), "pt") as f:
                prompt = f.metadata().get("prompt", path.stem)
                embeds = {k: f.get_tensor(k)[None].to(device, dtype) for k in f.keys()}  # noqa: SIM118
            out.append((prompt, embeds))
        return out
