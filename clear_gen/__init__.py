"""clear-gen: FLUX.1 at 2K-8K with CLEAR local attention."""

from .attention import apply_clear, clear_config, remove_clear
from .errors import ClearGenError
from .pipeline import GenerateOptions, generate, upscale
from .version import __version__

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
