"""The one record of a run: `RunTiming` (where one image's wall time went, stage by stage) and
`ImageRecord` (everything that made an image, its timings included), stored in every PNG as text chunks:
one per `ImageRecord` field (`clear-gen:prompt`, `clear-gen:seed`, ...), one `clear-gen:params` chunk
holding the whole record as JSON (the one read back), and a human-readable `parameters` chunk in the
"prompt\\nSteps: 20, Seed: 1, Size: WxH, ..." style other tools show.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import OutputError
from ..version import __version__


@dataclass
class StageTiming:
    """One stage of one image: its steps, the first step's warm-up, and full attention at the same size."""

    width: int
    height: int
    attention: str  # "full" or "CLEAR r=8 f=4"
    steps: int  # denoising steps that ran
    seconds: float  # the whole stage: latents, img2img's VAE encode, every step
    step_s: float | None  # median warm step (after the first); None: one step and no warm step timed
    first_step_s: float | None = None  # the first step, compilation and warm-up included (None: unknown)
    full_step_s: float | None = None  # full attention, same size and device, warm
    full_estimated: bool = False  # True: from the FLOP model, not measured
    full_composed: bool = False  # True: composed from timed attention ops (run.measure), not run
    density: float = 1.0  # fraction of (q, kv) pairs CLEAR computes exactly
    compare_s: float = 0.0  # seconds spent timing full attention (and a warm step of a 1-step stage)
    decode_s: float = 0.0  # VAE decode of the stage's latents into an image
    peak_allocated_gb: float | None = None  # GPU memory high-water mark (denoise and decode); None: CPU
    peak_reserved_gb: float | None = None  # the same, as reserved by torch's caching allocator
    block_evals: int = 0  # --cache: transformer blocks evaluated in the stage (0: no cache, not counted)
    blocks_skipped: int = 0  # --cache: block evaluations the cache skipped
    gpus: int = 1  # ranks whose GPUs shared each step (torchrun's sequence mode); full_step_s is one GPU's

    @property
    def warmup_s(self) -> float | None:
        """What the first step took beyond a warm one: compilation, autotuning, first allocations."""
        if self.step_s is None or self.first_step_s is None:
            return None
        return max(self.first_step_s - self.step_s, 0.0)

    @property
    def speedup(self) -> float | None:
        """Full attention's warm step over this stage's warm step; None for full attention or unknown."""
        if self.attention == "full" or not self.full_step_s or not self.step_s:
            return None
        return self.full_step_s / self.step_s

    def to_json(self) -> dict:
        return {**vars(self), "warmup_s": self.warmup_s, "speedup": self.speedup}

    @classmethod
    def from_json(cls, data: dict) -> StageTiming:
        """Inverse of to_json (derived values are recomputed); TypeError if a field is missing."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunTiming:
    """Where one image's wall time went; the table, the JSON line and the PNG metadata all show this.

    Loading and text encoding happen once per run: the run's first image carries them, later ones
    show 0. The PNG's own copy stops where its save begins: save_s None, total_s up to there.
    """

    load_s: float = 0.0  # pipeline and CLEAR weights
    encode_s: float = 0.0  # text encoders, every prompt of the run
    stages: list[StageTiming] = field(default_factory=list)
    save_s: float | None = None  # PNG writes: the image and its kept stages
    total_s: float | None = None  # wall time of this image, its share of loading and encoding included
    gpus: int = 1  # processes in the run (torchrun's world size)
    parallel: str = "none"  # none (one process), sequence (each image over every GPU) or data: parallel.py

    @property
    def decode_s(self) -> float:
        return sum(s.decode_s for s in self.stages)

    @property
    def compare_s(self) -> float:
        return sum(s.compare_s for s in self.stages)

    @property
    def other_s(self) -> float | None:
        """total_s less every part timed: Python, scheduling, the output-path checks."""
        if self.total_s is None:
            return None
        parts = self.load_s + self.encode_s + sum(s.seconds for s in self.stages)
        return self.total_s - parts - self.compare_s - self.decode_s - (self.save_s or 0.0)

    def to_json(self) -> dict:
        derived = {"decode_s": self.decode_s, "compare_s": self.compare_s, "other_s": self.other_s}
        return {**vars(self), **derived, "stages": [s.to_json() for s in self.stages]}

    @classmethod
    def from_json(cls, data: dict) -> RunTiming:
        """Inverse of to_json; TypeError or KeyError if data is not a RunTiming (e.g. an older record)."""
        names = {f.name for f in fields(cls)} - {"stages"}
        stages = [StageTiming.from_json(s) for s in data["stages"]]
        return cls(**{k: v for k, v in data.items() if k in names}, stages=stages)


PREFIX = "clear-gen:"


PARAMS_KEY = PREFIX + "params"


@dataclass(kw_only=True)
class ImageRecord:
    """Everything needed to reproduce (or describe) one generated image; stored in its PNG."""

    prompt: str
    seed: int
    model: str  # --model: a registry base name ("dev"), a Hub repo id or a local folder
    variant: str | None = None  # CLEAR checkpoint variant; None = no CLEAR
    window: int | None = None  # CLEAR radius r, in latent tokens
    down_factor: int | None = None  # CLEAR pooled-key factor f
    steps: int
    guidance: float
    width: int
    height: int
    stages: list[int] = field(default_factory=list)  # resolution of each stage, e.g. [1024, 4096]
    strength: float | None = None  # img2img strength of the later stages
    timings: dict[str, Any] = field(default_factory=dict)  # JSON-able; clear-gen writes a RunTiming
    version: str = __version__  # clear-gen version that made the image
    extra: dict[str, Any] = field(default_factory=dict)  # ntk_factor, max_sequence_length, negative, ...

    def __post_init__(self) -> None:
        self.stages = list(self.stages)  # a tuple would come back from JSON as a list and compare unequal

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRecord:
        """Unknown keys (from a newer clear-gen) go to `extra`; a missing required key is an OutputError."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        unknown = {k: v for k, v in data.items() if k not in names}
        extra = known.get("extra") or {}
        if not isinstance(extra, dict):
            raise OutputError(f"corrupt clear-gen metadata: extra is {type(extra).__name__}, not an object")
        known["extra"] = {**unknown, **extra}
        try:
            return cls(**known)
        except TypeError as e:
            raise OutputError(f"clear-gen metadata is incomplete ({e})") from None

    def to_text_chunks(self) -> dict[str, str]:
        """PNG text chunks: one per field (JSON unless str), `clear-gen:params`, and `parameters`."""
        data = self.to_dict()
        chunks = {PREFIX + k: v if isinstance(v, str) else _json(v) for k, v in data.items()}
        chunks[PARAMS_KEY] = _json(data)
        chunks["parameters"] = self.parameters_text()
        return chunks

    def parameters_text(self) -> str:
        """The "prompt\\nNegative prompt: ...\\nSteps: 20, Seed: 1, Size: WxH, ..." line other tools show."""
        items = {"Steps": self.steps, "Seed": self.seed, "Size": f"{self.width}x{self.height}"}
        items |= {"Model": self.model, "Guidance": self.guidance, "Stages": "+".join(map(str, self.stages))}
        items |= {"Strength": self.strength, "CLEAR variant": self.variant, "CLEAR window": self.window}
        items |= {"CLEAR down factor": self.down_factor}
        items["Version"] = f"clear-gen {self.version}"
        text = self.prompt
        if self.extra.get("negative"):
            text += f"\nNegative prompt: {self.extra['negative']}"
        return text + "\n" + ", ".join(f"{k}: {v}" for k, v in items.items() if v not in (None, ""))

    @classmethod
    def from_png(cls, path: str | Path) -> ImageRecord:
        """The record stored in a clear-gen PNG; OutputError if unreadable, not a PNG, or not ours."""
        text = _png_text(Path(path))
        if PARAMS_KEY in text:
            try:
                data = json.loads(text[PARAMS_KEY])
            except json.JSONDecodeError as e:
                raise OutputError(f"{path}: corrupt clear-gen metadata ({e})") from None
        else:  # per-field chunks only (e.g. an editor dropped one chunk): rebuild from them
            fields = {k.removeprefix(PREFIX): v for k, v in text.items() if k.startswith(PREFIX)}
            if not fields:
                raise OutputError(f"{path} was not made by clear-gen (no clear-gen metadata)")
            data = {k: _unjson(k, v) for k, v in fields.items()}
        if not isinstance(data, dict):
            raise OutputError(f"{path}: corrupt clear-gen metadata (not a JSON object)")
        try:
            return cls.from_dict(data)
        except OutputError as e:
            raise OutputError(f"{path}: {e}") from None


def _json(value: Any) -> str:
    # default=str: a stray non-JSON value in `extra` must not lose a finished 8K image; it is kept as text
    return json.dumps(value, ensure_ascii=False, default=str)


def _unjson(name: str, value: str) -> Any:
    """Inverse of to_text_chunks' per-field encoding: str fields are stored raw, the rest as JSON."""
    if name in ("prompt", "model", "version") or (name == "variant" and value != "null"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _png_text(path: Path) -> dict[str, str]:
    """All tEXt/iTXt/zTXt chunks of a PNG, as OutputError on anything unreadable."""
    try:
        with warnings.catch_warnings():  # only the header and text chunks are read: no bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format != "PNG":
                    raise OutputError(
                        f"{path} is a {im.format} image, not a PNG; clear-gen metadata is in its PNGs"
                    )
                # info has the text chunks before IDAT (where save_png puts them) without decoding pixels;
                # `im.text` also finds those after IDAT but decodes the whole image (1 s at 8192^2)
                text = {k: str(v) for k, v in im.info.items() if isinstance(v, str)}
                if not any(k.startswith(PREFIX) for k in text):
                    text = {k: str(v) for k, v in im.text.items()}  # type: ignore[attr-defined]
                return text
    except FileNotFoundError:
        raise OutputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OutputError(f"{path} is a directory; give a PNG file") from None
    except UnidentifiedImageError:
        raise OutputError(f"{path} is not an image (not a PNG)") from None
    except Image.DecompressionBombError:
        raise OutputError(f"{path} is larger than any image clear-gen makes; not a clear-gen PNG") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated/corrupt chunks, permission denied
        raise OutputError(f"cannot read {path}: {e}") from None


def record_from_image(path: str | Path) -> ImageRecord:
    """The record of a clear-gen PNG, for `generate --from IMAGE` and `info IMAGE`."""
    return ImageRecord.from_png(path)


def describe(record: ImageRecord) -> list[tuple[str, str]]:
    """(name, value) rows for a table, extras one row each; unset fields and the timings left out."""
    rows = [("prompt", record.prompt), ("seed", str(record.seed)), ("model", record.model)]
    rows += [("size", f"{record.width}x{record.height}")]
    rows += [("stages", " -> ".join(map(str, record.stages)))] if record.stages else []
    rows += [("steps", str(record.steps)), ("guidance", f"{record.guidance:g}")]
    optional = {
        "strength": record.strength,
        "variant": record.variant,
        "window": record.window,
        "down factor": record.down_factor,
    }
    rows += [(k, f"{v:g}" if isinstance(v, float) else str(v)) for k, v in optional.items() if v is not None]
    rows += [(k, v if isinstance(v, str) else _json(v)) for k, v in record.extra.items() if v is not None]
    rows.append(("clear-gen version", record.version))
    return rows
