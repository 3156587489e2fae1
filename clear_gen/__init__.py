"""clear-gen: FLUX.1 at 2K-8K with CLEAR local attention."""

from .attention import apply_clear, clear_config, remove_clear
from .errors import ClearGenError

__version__ = "0.1.0"
__all__ = ["ClearGenError", "__version__", "apply_clear", "clear_config", "remove_clear"]
