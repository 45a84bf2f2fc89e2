#!/usr/bin/env bash
# The main job on a fresh machine: set up, then
#   with a GPU:    the benchmark comparison (vitkern vs PyTorch eager / torch.compile), results in benchmarks/results/
#   without a GPU: the parity check of a small reference ViT through vitkern ops, in Triton INTERPRETER mode
#                  (correctness only; nothing here is a performance number)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_env.sh
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY -m vitkern info
  $PY -m benchmarks.run_all "$@"
else
  echo "No GPU: running the parity check in Triton interpreter mode (CPU). Timings are not measured here."
  $PY -m vitkern info
  $PY -m vitkern check "$@"
fi
