#!/usr/bin/env bash
# Installs what vitkern and its tests need into the current Python, pinned by constraints.txt (the GPU image's
# versions). Idempotent: a second run installs nothing. torch 2.11.0 from the registry is the CUDA 13 build; it runs
# on CPU too, and brings triton 3.6.0 and the nvidia headers csrc/ compiles against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${VITKERN_SKIP_INSTALL:-0}" = "1" ]; then
  echo "[setup] VITKERN_SKIP_INSTALL=1: using the Python environment as it is"
  exit 0
fi
start=$(date +%s)
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
# wheel: `pip install --no-build-isolation` needs bdist_wheel from the environment itself
$PY -m pip install -q -c constraints.txt \
  torch==2.11.0 triton==3.6.0 torchvision==0.26.0 timm transformers huggingface_hub numpy pytest pytest-xdist pytest-benchmark ninja wheel setuptools
# the package itself, editable, pure Python (the CUDA extension is built separately: scripts/build_csrc.sh)
VITKERN_BUILD_CUDA=0 $PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -c "import torch, triton, timm, numpy; print(f'[setup] torch {torch.__version__}, triton {triton.__version__}, timm {timm.__version__}, numpy {numpy.__version__}')"
echo "[setup] done in $(( $(date +%s) - start ))s"
