#!/bin/sh
# Data wait per step on a GPU: tensor_batches(device="cuda") against a
# DataLoader with pin_memory=True (benchmarks/README.md, gpu_data_wait.py).
# Run from anywhere, with finegym_store importable (installed or built in
# place) and a CUDA build of torch: sh benchmarks/gpu_data_wait.sh [OUT.json]
set -eu
here=$(dirname "$0")
python=${PYTHON:-python}
# Both paths deliver identical features for the same instances (small, 1 epoch).
"$python" "$here/gpu_data_wait.py" --device cuda --instances 2048 --epochs 1 --check
# The measurement: 20484 x (12, 1024) float32, batch 128, 4 workers, 3 epochs.
"$python" "$here/gpu_data_wait.py" --device cuda --json "${1:-gpu_data_wait.json}"
