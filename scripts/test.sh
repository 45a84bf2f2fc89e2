#!/usr/bin/env bash
# The test command (README.md; CI's .ci/run calls it): set up, then every test that can run here. Without a GPU
# the Triton kernels run in the Triton interpreter and GPU-marked tests are skipped with their reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_env.sh || exit 1
# benchmarks/cpu: the host-side pytest-benchmark suite, each function run once here (a smoke test, no timing)
$PY -m pytest tests benchmarks/cpu -q -p no:cacheprovider --benchmark-disable "$@"
rc=$?
if [ $rc -eq 5 ]; then  # pytest: no tests collected (e.g. a -k filter that matches nothing) is not a failure
  echo "[test] pytest collected no tests"
  rc=0
fi
exit $rc
