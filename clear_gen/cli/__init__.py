"""The `clear-gen` command line: thin commands that parse, call one library function and print (`app`),
the options the generating commands share (`options`), progress and every table (`display`), and
`clear-gen distill` (`distill`). Imports the library lazily: `clear-gen --help` loads no torch."""

from .app import app, main

__all__ = ["app", "main"]
