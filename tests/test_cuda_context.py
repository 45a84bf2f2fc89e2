"""The CUDA-context plugin (vitkern.testing.pytest_cuda_context) on CPU: a fake probe plays the lost context.

A kernel that faults leaves its process's CUDA context unusable; the plugin must attribute the fault to the test
that caused it, give the tests after it a fresh process (xdist) or stop with the reason (no xdist), and stop
running the cases of a function that keeps faulting. The GPU suite relies on this the first time never-run CUDA
code runs.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CONFTEST = """
from vitkern.testing import pytest_cuda_context


def pytest_configure(config):
    config.pluginmanager.register(pytest_cuda_context, "vitkern-cuda-context")
"""

TESTS = """
import pytest

from vitkern.testing import pytest_cuda_context

FAULTED = []  # this process ran a faulting "kernel": its context is gone


def fake_probe():
    return "AcceleratorError: CUDA error: an illegal memory access was encountered" if FAULTED else None


pytest_cuda_context.context_lost = fake_probe


def test_plain_failure():
    assert 1 == 2  # fails without touching the context: the process goes on


@pytest.mark.parametrize("i", range(4))
def test_faulty_kernel(i):
    FAULTED.append(i)
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("i", range(5))
def test_after(i):
    assert not FAULTED, "ran in a process whose CUDA context was lost"
"""


def _run_pytest(tmp_path, tests: str, name: str, *args: str) -> str:
    """pytest in a subprocess on one test file (``name``) with the plugin registered; its output."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / name).write_text(tests)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--rootdir",
                        str(tmp_path), str(tmp_path), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return f"rc={r.returncode}\n{r.stdout}{r.stderr}"


def test_lost_context_ends_the_worker_and_the_rest_run_in_a_fresh_one(tmp_path):
    pytest.importorskip("xdist", reason="pytest-xdist is in constraints.txt (the GPU image has it)")
    out = _run_pytest(tmp_path, TESTS, "test_fake_gpu.py", "-n", "1", "-p", "xdist")
    assert out.startswith("rc=1\n"), out
    # the tests after a fault ran in fresh workers and passed; the plain failure cost no worker
    assert "5 passed" in out, out
    assert out.count("node down: Not properly terminated") == 2, out
    # each fault is attributed to the test that caused it
    assert "vitkern: CUDA context lost" in out, out
    for i in (0, 1):
        assert f"FAILED test_fake_gpu.py::test_faulty_kernel[{i}]" in out, out
    # after two crashes the function's other cases do not run
    for i in (2, 3):
        assert f"ERROR test_fake_gpu.py::test_faulty_kernel[{i}] - Failed: not run" in out, out
    assert "not run: 2 cases of test_fake_gpu.py::test_faulty_kernel ended their worker" in out, out
    assert "FAILED test_fake_gpu.py::test_plain_failure" in out, out


CRASHES = """
import os

import pytest


@pytest.mark.parametrize("i", range(4))
def test_crashing(i):
    os._exit(1)  # what pytest-timeout's thread method does to a hung test, or a segfault


@pytest.mark.parametrize("i", range(3))
def test_after(i):
    pass
"""


def test_every_kind_of_worker_crash_counts_towards_the_cap(tmp_path):
    """A hung kernel (ended by pytest-timeout's thread method) or a segfault ends the worker without our hooks
    running: the controller counts those crashes too, so a function that keeps crashing stops costing workers."""
    pytest.importorskip("xdist", reason="pytest-xdist is in constraints.txt (the GPU image has it)")
    logs = lambda: set(Path(tempfile.gettempdir()).glob("vitkern-pytest-crashes-*.log"))  # noqa: E731
    before = logs()
    out = _run_pytest(tmp_path, CRASHES, "test_crashes.py", "-n", "1", "-p", "xdist")
    assert logs() <= before, "the controller leaves its crash log behind"
    assert out.count("node down: Not properly terminated") == 2, out
    assert "not run: 2 cases of test_crashes.py::test_crashing ended their worker" in out, out
    assert "3 passed" in out and "2 errors" in out, out


def test_lost_context_without_xdist_stops_the_session_saying_why(tmp_path):
    out = _run_pytest(tmp_path, TESTS, "test_fake_gpu.py", "-p", "no:xdist")
    assert out.startswith("rc=1\n"), out
    assert "the CUDA context was lost in test_fake_gpu.py::test_faulty_kernel[0]" in out, out
    assert "test_after" not in out and "passed" not in out, out  # nothing ran on the dead context
    assert "2 failed" in out, out  # the plain failure and the fault


def test_no_cuda_means_no_loss():
    from vitkern.testing.cuda_context import context_lost

    # without a GPU (CI), or before this process touched CUDA, there is no context to lose
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process uses CUDA: the probe is exercised by the GPU suite")
    assert context_lost() is None


REAL_FAULT = """
import pytest
import torch


def test_device_assert():  # an out-of-range index: a device-side assert, which poisons the context
    torch.zeros(2, device="cuda")[torch.tensor([5], device="cuda")].sum().item()


@pytest.mark.parametrize("i", range(2))
def test_after(i):
    assert torch.ones(4, device="cuda").sum().item() == 4  # a fresh worker's context works
"""


@pytest.mark.gpu
def test_real_fault_is_detected_and_the_next_tests_get_a_fresh_worker(tmp_path):
    pytest.importorskip("xdist", reason="the GPU suite's workers are pytest-xdist's")
    out = _run_pytest(tmp_path, REAL_FAULT, "test_real_fault.py", "-n", "1", "-p", "xdist")
    assert "vitkern: CUDA context lost" in out and "node down: Not properly terminated" in out, out
    assert "2 passed" in out, out
