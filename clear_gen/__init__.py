"""clear-gen: FLUX.1 at 2K-8K with CLEAR local attention.

The public API below is imported on first use, so `import clear_gen` (and `clear-gen --help`) loads
neither torch nor diffusers. What lives where (each package's `__init__` says what it may import):
see the README's "Layout" section.
"""

from __future__ import annotations

import importlib

from .errors import ClearGenError
from .version import __version__

_PUBLIC = {  # name -> the module that defines it
    "apply_clear": ".attention",
    "remove_clear": ".attention",
    "clear_config": ".attention",
    "original_attention": ".attention",
    "generate": ".run.generate",
    "upscale": ".run.upscale",
    "edit": ".run.edit",
    "LoadedPipelines": ".run.generate",
    "Hooks": ".run.render",
    "GenerateOptions": ".plan.spec",
    "RunSpec": ".plan.spec",
    "parse": ".plan.parse",
    "plan_run": ".plan.memory",
    "UpscaleTarget": ".files.source",
}

__all__ = ["ClearGenError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'clear_gen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
