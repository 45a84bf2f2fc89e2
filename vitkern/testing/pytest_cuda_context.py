"""pytest plugin: a test whose kernel faults ends its process, so the tests after it get a fresh CUDA context.

Registered by ``tests/conftest.py``. After a failed test, :func:`vitkern.testing.cuda_context.context_lost` asks
whether the process's CUDA context still works; if not, the failure gets a "CUDA context lost" section and:

- under pytest-xdist (the GPU suite) the worker ends once the test's reports are sent: the controller reports the
  test as crashed too, queues the worker's other tests again and starts a fresh worker (``--max-worker-restart``
  bounds how many; the GPU suite raises it);
- without xdist the session stops, saying why.

A test function that has lost the context ``MAX_LOSSES_PER_FUNCTION`` times fails its remaining cases at setup,
without running them: one broken kernel then costs a few worker restarts, not one per parametrised case.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from vitkern.testing.cuda_context import context_lost

MAX_LOSSES_PER_FUNCTION = 2
EXIT_CODE = 3  # how a worker that lost its context ends (xdist reports it as crashed and replaces it)
_LOST = pytest.StashKey[str]()


def _function_id(item: pytest.Item) -> str:
    return item.nodeid.split("[", 1)[0]  # the test function, without its parameters


def _loss_log() -> Path | None:
    """The file every xdist worker of this run appends its context losses to (None without xdist)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    return Path(tempfile.gettempdir()) / f"vitkern-cuda-lost-{run}.log" if run else None


_losses_here: list[str] = []  # without xdist: this process's losses (the session stops at the first)


def _losses_of(function_id: str) -> list[str]:
    log = _loss_log()
    lines = log.read_text().splitlines() if log is not None and log.exists() else _losses_here
    return [ln.split("\t", 1)[1] for ln in lines if ln.split("\t", 1)[0] == function_id]


def _record_loss(item: pytest.Item, error: str) -> None:
    line = f"{_function_id(item)}\t{item.nodeid}: {error}"
    log = _loss_log()
    if log is None:
        _losses_here.append(line)
        return
    with log.open("a") as fh:  # one short line per write: appends from several workers do not interleave
        fh.write(line + "\n")


@pytest.fixture(autouse=True)
def _sync_cuda_after_test():
    """A kernel's fault surfaces at the next synchronisation: wait for this test's GPU work inside the test, so a
    fault fails the test that launched the kernel, not the next one."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def pytest_runtest_setup(item: pytest.Item) -> None:
    earlier = _losses_of(_function_id(item))
    if len(earlier) >= MAX_LOSSES_PER_FUNCTION:
        pytest.fail(f"not run: {_function_id(item)} already lost the CUDA context {len(earlier)} times "
                    f"(first: {earlier[0]}); its other cases are not run so that each does not cost a worker",
                    pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and _LOST not in item.stash:
        lost = context_lost()
        if lost is not None:
            item.stash[_LOST] = lost
            report.sections.append(("vitkern: CUDA context lost", f"after this {report.when}: {lost}"))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield  # every report of this test has been sent by now
    lost = item.stash.get(_LOST, None)
    if lost is None:
        return result
    _record_loss(item, lost)
    message = f"vitkern: the CUDA context was lost in {item.nodeid} ({lost})"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"{message}; ending this worker so that the next tests get a fresh context\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
    item.session.shouldfail = f"{message}; the other tests of this process cannot use CUDA any more"
    return result
