"""Which weights a run loads, as frozen values the run spec holds (plan.spec.RunSpec.weights): the base, a
GGUF transformer, quantization, LoRAs and a ControlNet. Parsed once (plan.parse) by this package's parsers
(lora.parse_loras, control.parse_control, quantize.check_names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA: a local file, or a file in a Hub repo, and the scale its low-rank term is multiplied by."""

    source: str  # an absolute local path, or a Hub repo id
    file: str | None  # the file in the repo; None for a local file
    scale: float = 1.0

    @property
    def spec(self) -> str:
        """As `--lora` takes it and the PNG records it: PATH:SCALE or owner/repo/file:SCALE."""
        where = self.source if self.file is None else f"{self.source}/{self.file}"
        return f"{where}:{self.scale:g}"

    @property
    def name(self) -> str:
        return Path(self.file or self.source).stem


@dataclass(frozen=True)
class ControlSpec:
    """What a run's ControlNet is: its weights, the control picture, the mode and the scale."""

    net: Any  # registry.ControlNet: a registry entry, or an ad-hoc one for a Hub repo or a local folder
    folder: Path | None  # a local diffusers folder; None: from the Hub (net.repo)
    image: Path | None  # the control picture; None: upscale's own picture
    mode: int | None  # a union model's mode id
    mode_name: str | None  # the mode as given (a registry name, or the id as text)
    scale: float
    picture: Any = field(default=None, compare=False)  # source.Source: the picture, read once (or None)

    @property
    def source(self) -> str:
        """As `--controlnet` takes it and the PNG records it: a registry name, a repo id, a folder."""
        return str(self.folder) if self.folder is not None else self.net.name


@dataclass(frozen=True)
class WeightsSpec:
    """Which weights a run loads and how they are stored: the base, a GGUF transformer, quantization,
    LoRAs and a ControlNet."""

    model: str  # registry base name, Hub repo id or local folder
    token: str | None = None
    quantize: str = "none"  # the transformer's quantization mode (quantize.MODES)
    quantize_text: str = "none"  # T5's
    transformer: str | None = None  # a GGUF transformer: a file or owner/repo/file.gguf
    loras: tuple[LoraSpec, ...] = ()
    controlnet: ControlSpec | None = None
    family: str = "flux1"  # the model's adapter (models.FAMILIES): the registry base's, else FLUX.1

    @property
    def gguf(self) -> bool:
        return self.transformer is not None and str(self.transformer).lower().endswith(".gguf")
