"""clear-gen's version: pyproject.toml's, in one place every module can import (output.py records it)."""

__version__ = "0.1.0"
