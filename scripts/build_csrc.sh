#!/usr/bin/env bash
# CI compile check for the CUDA C++ extension vitkern._C (csrc/): build it for the SM targets in VITKERN_CUDA_ARCHS
# (default sm_90a), print how long it took, verify the .so really holds SASS for every target (cuobjdump)
# and that it loads into torch (undefined symbols / ABI mismatches show up here, no GPU needed). Exits non-zero on
# any failure.
#
# Usage: bash scripts/build_csrc.sh             # clean build in a temp dir (default, what CI runs)
#        bash scripts/build_csrc.sh --inplace   # incremental dev build; leaves vitkern/_C*.so for tests
#
# Default = temp dir (python setup.py build_ext --build-temp T/temp --build-lib T/lib): the repo tree stays untouched,
# nothing stale from an earlier build (objects, an old .so) can make a broken tree pass, and the printed time is the
# true cost of a from-scratch compile. The dir is deleted at exit (VITKERN_KEEP_BUILD=1 keeps it).
# --inplace = python setup.py build_ext --inplace: objects in build/ (ninja rebuilds only what changed), the .so at
# vitkern/_C.<abi>.so where `import vitkern._C` finds it. Both paths are .gitignored (build/, *.so).
#
# Needs: torch (CUDA build) importable, nvcc (CUDA_HOME, PATH or /usr/local/cuda), ninja. Missing toolkit headers
# (cusparse.h, ...) and libcudart.so are taken from torch's nvidia-* wheels automatically (vitkern/_build_config.py).
# Env: VITKERN_CUDA_ARCHS (e.g. "90a;80"), MAX_JOBS (default: nproc).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

MODE=temp
case "${1:-}" in
  "") ;;
  --inplace) MODE=inplace ;;
  -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
  *) echo "build_csrc.sh: unknown argument '$1' (use --inplace or nothing)" >&2; exit 2 ;;
esac

export VITKERN_BUILD_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if ! command -v nvcc >/dev/null 2>&1; then
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export PATH="$d/bin:$PATH"; break; fi
  done
fi

PY="${PYTHON:-python}"
# Requested archs and the CUDA toolkit, found by the same code setup.py uses (vitkern/_build_config.py). Exporting
# CUDA_HOME keeps torch from guessing it from a wrapper script (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local).
CFG="$("$PY" -c "
import importlib.util, shlex, sys
spec = importlib.util.spec_from_file_location('_bc', 'vitkern/_build_config.py')
m = importlib.util.module_from_spec(spec); sys.modules['_bc'] = m; spec.loader.exec_module(m)
print('ARCHS=' + shlex.quote(' '.join(m.parse_cuda_archs())))
print('CUDA_HOME=' + shlex.quote(m.find_cuda_home() or ''))
")"
eval "$CFG"
if [ -z "$CUDA_HOME" ]; then
  echo "build_csrc.sh: FAILED: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 2
fi
export CUDA_HOME
"$PY" - <<'PYEOF'
import os, sys
try:
    import torch
except Exception as e:
    sys.exit(f"build_csrc.sh: torch is not importable: {e}")
if torch.version.cuda is None:
    sys.exit(f"build_csrc.sh: torch {torch.__version__} is not a CUDA build")
from torch.utils.cpp_extension import is_ninja_available
if not is_ninja_available():
    sys.exit("build_csrc.sh: ninja not found (pip install ninja)")
print(f"build_csrc.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME {os.environ['CUDA_HOME']}")
PYEOF
echo "build_csrc.sh: targets: ${ARCHS}; MAX_JOBS=${MAX_JOBS}; mode: ${MODE}"

if [ "$MODE" = temp ]; then
  TMP="$(mktemp -d "${TMPDIR:-/tmp}/vitkern_build.XXXXXX")"
  if [ "${VITKERN_KEEP_BUILD:-0}" != 1 ]; then trap 'rm -rf "$TMP"' EXIT; fi
  BUILD_ARGS=(build_ext --build-temp "$TMP/temp" --build-lib "$TMP/lib")
  SEARCH_DIR="$TMP/lib"
else
  BUILD_ARGS=(build_ext --inplace)
  SEARCH_DIR="$ROOT/vitkern"
  # a per-version build from before the abi3 switch would shadow the new _C.abi3.so (import prefers it)
  rm -f "$ROOT"/vitkern/_C.cpython-*.so
fi

start=$(date +%s)
set +e
"$PY" setup.py "${BUILD_ARGS[@]}"
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
if [ $rc -ne 0 ]; then
  echo "build_csrc.sh: FAILED: setup.py build_ext exited $rc after ${elapsed}s" >&2
  exit $rc
fi
echo "build_csrc.sh: compile time: ${elapsed}s"

SO="$(find "$SEARCH_DIR" -maxdepth 2 -name '_C*.so' -newermt "@$start" -print -quit)"
[ -z "$SO" ] && SO="$(find "$SEARCH_DIR" -maxdepth 2 -name '_C*.so' -print -quit)"
if [ -z "$SO" ]; then
  echo "build_csrc.sh: FAILED: no _C*.so under $SEARCH_DIR" >&2
  exit 1
fi
echo "build_csrc.sh: built $SO ($(du -h "$SO" | cut -f1))"

# cuobjdump: the toolkit's, else one from an nvidia-* wheel (nvidia-cuda-cuobjdump), else the copy triton ships
# (a minimal CUDA 13 image has no cuobjdump of its own).
CUOBJDUMP="$(command -v cuobjdump || true)"
[ -z "$CUOBJDUMP" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP="$("$PY" - <<'PYEOF' 2>/dev/null || true
import glob, importlib.util, os
cands = []
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    cands += sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump")), reverse=True)
spec = importlib.util.find_spec("triton")
if spec and spec.origin:
    cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
print(next((c for c in cands if os.access(c, os.X_OK)), ""))
PYEOF
)"
fi
if [ -z "$CUOBJDUMP" ]; then
  echo "build_csrc.sh: FAILED: no cuobjdump (toolkit, nvidia-cuda-cuobjdump wheel or triton) to verify SASS targets" >&2
  exit 1
fi
CUOBJ_VER="$("$CUOBJDUMP" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)"
NVCC_VER="$("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)"
echo "build_csrc.sh: $CUOBJDUMP --list-elf (cuobjdump ${CUOBJ_VER}, nvcc ${NVCC_VER}):"
"$CUOBJDUMP" --list-elf "$SO" | sed 's/^/    /'
if [ "$(printf '%s\n%s\n' "$CUOBJ_VER" "$NVCC_VER" | sort -V | head -n1)" != "$NVCC_VER" ]; then
  echo "    (this cuobjdump is older than nvcc and may print sm_90a cubins as sm_90; the headers below are exact)"
fi
# Verify the targets from each cubin's fatbin header ("arch = sm_90a"), not from --list-elf names: a cuobjdump older
# than the nvcc (e.g. triton's 12.8 one reading CUDA 13 objects) lists sm_90a cubins as "sm_90".
HEADERS="$("$CUOBJDUMP" --dump-resource-usage "$SO" | grep -o 'arch = sm_[0-9a-z]*' | sort | uniq -c)"
echo "build_csrc.sh: cubins per target (fatbin headers):"
echo "$HEADERS" | sed 's/^/    /'
for a in $ARCHS; do
  if ! grep -q "arch = sm_${a}\$" <<<"$HEADERS"; then
    echo "build_csrc.sh: FAILED: no sm_${a} cubin in $SO" >&2
    exit 1
  fi
done
echo "build_csrc.sh: SASS present for: $(for a in $ARCHS; do printf 'sm_%s ' "$a"; done)"

# The sm_90a attention kernels (csrc/ops/attention_wgmma.cuh) compile to a trap wherever the wgmma feature macro is
# off: check their sm_90a SASS really has the warpgroup MMAs, D/16 (Q Kᵀ) + 4 (P V) HGMMA per kernel (other targets'
# copies are traps). Each cubin's "arch = sm_XX" header names its target exactly (see above).
if [[ " $ARCHS " == *" 90a "* ]]; then
  if ! "$CUOBJDUMP" -sass "$SO" 2>/dev/null | awk '
      /^arch = sm_/ { if (f != "") check(); f = ""; arch = $3 }
      /Function :/ { if (f != "") check(); f = (arch == "sm_90a" && $3 ~ /attention_fwd_wgmma_kernel/) ? $3 : ""; n = 0 }
      f != "" && /HGMMA/ { n++ }
      function check() {
        match(f, /Li[0-9]+E/); d = substr(f, RSTART + 2, RLENGTH - 3); want = d / 16 + 4
        if (n != want) { printf "    %s: %d HGMMA, expected %d\n", f, n, want; bad = 1 }
        kernels++
      }
      END { if (f != "") check(); printf "build_csrc.sh: wgmma attention kernels with their HGMMA count: %d\n", kernels
            exit (bad || kernels == 0) }'; then
    echo "build_csrc.sh: FAILED: the sm_90a wgmma attention kernels lack their HGMMA instructions (above)" >&2
    exit 1
  fi
fi

# Load it the way vitkern does (torch first, then the library) and print build_info: catches undefined symbols.
"$PY" - "$SO" <<'PYEOF'
import json, sys, torch
torch.ops.load_library(sys.argv[1])
info = json.loads(torch.ops.vitkern_C.build_info())
print("build_csrc.sh: loads OK; build_info:", json.dumps(info))
PYEOF
# One binary for every CPython >= 3.10 (setup.py's py_limited_api): the abi3 name, and no link to libtorch_python or
# libpython, whose symbols are per Python version (the GPU machine's Python is not CI's: a prebuilt .so travels).
if [[ "$SO" != *.abi3.so ]]; then
  echo "build_csrc.sh: FAILED: $SO is not an abi3 build (setup.py's py_limited_api)" >&2
  exit 1
fi
if readelf -d "$SO" | grep -E 'NEEDED.*(libtorch_python|libpython)'; then
  echo "build_csrc.sh: FAILED: $SO links a Python-version-specific library (above)" >&2
  exit 1
fi
echo "build_csrc.sh: abi3: one binary for CPython >= 3.10 with this torch/CUDA"
echo "build_csrc.sh: OK"
