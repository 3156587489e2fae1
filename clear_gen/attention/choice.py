"""Which attention a run's CLEAR stages use, and where its weights come from: a value of the run spec
(plan.spec.RunSpec.attention), made once by plan.parse from --variant or --window/--down-factor/
--clear-weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.sizes import TOKEN_PX


@dataclass(frozen=True)
class ClearChoice:
    """Which attention the CLEAR stages use, and where its weights come from."""

    label: str  # variant name, "custom" or "none"
    window: int | None  # None: stock attention
    down_factor: int = 1
    weights: Path | None = None
    note: str | None = None  # why this choice, when the user did not make it
    chosen: bool = True  # False: the registry's default variant (full attention at or below 1024 px)

    @property
    def hub_variant(self) -> str | None:
        """The registry variant whose checkpoint comes from the Hugging Face cache; None: no checkpoint or
        a local file."""
        return None if self.weights is not None or self.label in ("custom", "none") else self.label

    def geometry(self, width: int, height: int, text_len: int, down_factor: int | None = None):
        """CLEAR's geometry.Geometry for a width x height px image (16 px a token) and this window; with
        `down_factor`, that one instead of the choice's (a ControlNet's training-free CLEAR: 1)."""
        from ..core.geometry import image_geometry

        f = self.down_factor if down_factor is None else down_factor
        return image_geometry(text_len, height // TOKEN_PX, width // TOKEN_PX, self.window, f)

    @property
    def attention_label(self) -> str:
        """'CLEAR r=8 f=4' (or 'full'): how tables and plans name it."""
        if self.window is None:
            return "full"
        return f"CLEAR r={self.window}" + (f" f={self.down_factor}" if self.down_factor > 1 else "")
