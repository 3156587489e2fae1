"""`python -m clear_gen ...` is `clear-gen ...` (also under torchrun)."""

from .cli import main

main()
