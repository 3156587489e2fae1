"""clear-gen: FLUX.1 at 2K-8K with CLEAR local attention."""

__version__ = "0.1.0"

from .attention import apply_clear, clear_config, remove_clear  # noqa: E402
from .errors import ClearGenError  # noqa: E402
from .pipeline import GenerateOptions, generate, upscale  # noqa: E402

__all__ = [
    "ClearGenError",
    "GenerateOptions",
    "__version__",
    "apply_clear",
    "clear_config",
    "generate",
    "remove_clear",
    "upscale",
]
