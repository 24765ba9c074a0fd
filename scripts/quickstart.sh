#!/usr/bin/env bash
# One command from a fresh checkout: install, then train the seed model on MNIST and print its
# test accuracy. MNIST comes from $KILN_DATA when set, else it is downloaded (checksums verified)
# into $KILN_CACHE (default ~/.cache/kiln).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kiln train examples/mnist_seed.yaml "$@"
