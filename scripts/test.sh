#!/usr/bin/env bash
# One command for the whole test suite: install (if needed), then pytest. Arguments go to pytest,
# e.g. scripts/test.sh -m "not slow" for the quick part only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
