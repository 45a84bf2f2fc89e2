"""scripts/gpu_suite.sh is the one command of a GPU session, which has minutes of device time and no second try:
check here, without a GPU, that its plan's step 1 parses, runs its tests and sanitizer tests beside them, packs
$OUT and prints the summary (every GPU test is skipped on CPU, so this checks the script, not the kernels)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the real suite: that is the suite's job")
def test_step_1_runs_tests_and_sanitizer_tests_and_fills_out(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SUITE_BUDGET_S="240", VITKERN_BUILD_CUDA="0")
    # step 1's own file list is long; a later --tests replaces it (arguments after --step N are appended)
    r = subprocess.run(["bash", "scripts/gpu_suite.sh", "--step", "1", "--jobs", "2", "--tests",
                        "tests/test_extension.py tests/test_layer_norm_cuda.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    summary = out[out.index("SUMMARY"):]
    assert "pytest -m gpu: rc=0" in summary and "compute-sanitizer: rc=0" in summary, summary
    assert "compute-sanitizer tests: rc=0" in out and "test_layer_norm_cuda.py" in out, out[-3000:]
    for name in ("env.txt", "pytest.log", "sanitizer.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    # the sanitizer tests were collected (and skipped for want of a GPU), not deselected into nothing
    assert "skipped" in (tmp_path / "sanitizer.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the real benchmarks: the suite's job")
def test_step_2_runs_the_op_benches_and_packs_their_results(tmp_path):
    """Step 2's plumbing on CPU (the benches run in smoke mode): the speed table off, every op bench run under the
    step's budget, the results folder found from run_all's output, packed into $OUT, the summary printed last."""
    import tarfile

    env = dict(os.environ, OUT=str(tmp_path), SUITE_BUDGET_S="120", VITKERN_BUILD_CUDA="0")
    r = subprocess.run(["bash", "scripts/gpu_suite.sh", "--step", "2"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "benchmarks: rc=0" in out[out.index("SUMMARY"):], out[-3000:]
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    for bench in ("layernorm", "attention", "window_attention", "ln_mlp", "linear_residual", "patch_embed"):
        assert f"{bench}.json" in names, names
    assert "summary.md" in names and (tmp_path / "summary.md").read_text().startswith("# vitkern benchmarks")
    assert "CPU SMOKE RUN" in (tmp_path / "summary.md").read_text()  # never mistaken for measurements


def test_unknown_step_is_refused():
    r = subprocess.run(["bash", "scripts/gpu_suite.sh", "--step", "9"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "expected 1, 2, 3 or 4" in r.stderr
