#!/usr/bin/env bash
# Create .venv (if missing) and install kiln with its test tools. torch is pinned in pyproject.toml
# (2.13.0, CPU build where one is available) so pip never pulls a multi-GB CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv 2>/dev/null || true
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
