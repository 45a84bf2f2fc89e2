"""Runs tests/test_sm90_compile.py and tests/test_parallel_compile.py in a fresh Python process.

The interpreter parity tests in this pytest process patch triton.language while they run, and real compilation for
sm_90 must not see those patches; a subprocess is the clean separation. Its output is shown when it fails.
"""

import os
import subprocess
import sys
from pathlib import Path

from vitkern.testing.sm90_compile import FRESH_PROCESS_ENV


def test_every_triton_kernel_compiles_for_sm90_in_a_fresh_process():
    targets = [str(Path(__file__).with_name(name)) for name in ("test_sm90_compile.py", "test_parallel_compile.py")]
    env = dict(os.environ, **{FRESH_PROCESS_ENV: "1"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    tail = (result.stdout[-6000:] + "\n" + result.stderr[-3000:]).strip()
    assert result.returncode == 0, f"sm_90 compile checks failed (rc={result.returncode}):\n{tail}"
    assert " passed" in result.stdout, tail
