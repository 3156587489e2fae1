#!/usr/bin/env bash
# The README's test command: makes .venv with the CPU build of torch, installs clear-gen[test], runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: on this machine class 2.13.0 is a local CPU build; unpinned pulls CUDA (GBs).
.venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
.venv/bin/pip install -q -e ".[test]"
.venv/bin/python -m pytest -q "$@"
