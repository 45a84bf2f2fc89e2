"""Run a CUDA workload under compute-sanitizer (the GPU tests of every CUDA C++ op family)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLEAN = {  # what each tool prints when it found nothing
    "memcheck": "ERROR SUMMARY: 0 errors",
    "racecheck": "RACECHECK SUMMARY: 0 hazards",
    "synccheck": "ERROR SUMMARY: 0 errors",
    "initcheck": "ERROR SUMMARY: 0 errors",
}
DONE = "sanitizer workload done"  # the workload's last line: it ran to the end
_PREAMBLE = """import torch
import vitkern
from vitkern._extension import extension_status, load_jit
st = extension_status()
if not st.available:  # the parent JIT-built it (VITKERN_BUILD_CUDA=1): reuse that build
    st = load_jit()
assert st.can_run, st.reason
ops = torch.ops.vitkern_C
"""


def workload(body: str) -> str:
    """A runnable workload: load the extension (``ops`` = torch.ops.vitkern_C), run ``body``, sync, print DONE."""
    return f"{_PREAMBLE}{body}\ntorch.cuda.synchronize()\nprint({DONE!r})\n"


def compute_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        cand = os.path.join(home, "bin", "compute-sanitizer") if home else None
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def run_under_sanitizer(tool: str, body: str, clean: Optional[str] = None, timeout: int = 600) -> None:
    """Run ``workload(body)`` under ``compute-sanitizer --tool tool``; fail the test on any finding, skip it when
    compute-sanitizer is not installed."""
    import pytest

    exe = compute_sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="0")
    r = subprocess.run([exe, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", workload(body)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert DONE in out, out[-4000:]
    assert (clean or CLEAN[tool]) in out, out[-4000:]
    assert r.returncode == 0, out[-4000:]
