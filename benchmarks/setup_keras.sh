#!/usr/bin/env bash
# The Keras 3 (TensorFlow backend) side of benchmarks/bench_mnist_speed.py lives in its own venv:
# the product never depends on TensorFlow, and TensorFlow's own numpy/protobuf pins stay away from kiln's.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-keras
.venv-keras/bin/python -m pip install --quiet --upgrade pip
.venv-keras/bin/python -m pip install --quiet "tensorflow-cpu==2.21.0" "keras>=3.10"
