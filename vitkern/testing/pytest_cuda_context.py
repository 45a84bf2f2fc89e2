"""pytest plugin: a test whose kernel faults ends its process, so the tests after it get a fresh CUDA context.

Registered by ``tests/conftest.py``. After a failed test, :func:`vitkern.testing.cuda_context.context_lost` asks
whether the process's CUDA context still works; if not, the failure gets a "CUDA context lost" section and:

- under pytest-xdist (the GPU suite) the worker ends once the test's reports are sent: the controller reports the
  test as crashed too, queues the worker's other tests again and starts a fresh worker (``--max-worker-restart``
  bounds how many; the GPU suite raises it);
- without xdist the session stops, saying why.

Under xdist the controller counts every worker crash per test function: a lost context, a per-test timeout
(pytest-timeout's thread method ends the worker; the GPU suite uses it because a hung kernel never returns to
Python), a segfault. A function whose cases crashed ``MAX_CRASHES_PER_FUNCTION`` times fails its remaining cases at
setup, without running them: one broken kernel then costs a few worker restarts, not one per parametrised case.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from vitkern.testing.cuda_context import context_lost

MAX_CRASHES_PER_FUNCTION = 2
EXIT_CODE = 3  # how a worker that lost its context ends (xdist reports it as crashed and replaces it)
_LOST = pytest.StashKey[str]()


def _function_id(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]  # the test function, without its parameters


def _crash_log(testrunuid: str | None) -> Path | None:
    """The file the xdist controller appends this run's worker crashes to, and the workers read."""
    return Path(tempfile.gettempdir()) / f"vitkern-pytest-crashes-{testrunuid}.log" if testrunuid else None


_logs_written: set[Path] = set()  # by this controller; removed when its session ends


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched) -> None:
    """xdist controller: a worker died while running ``crashitem``."""
    log = _crash_log(getattr(getattr(report, "node", None), "workerinput", {}).get("testrunuid"))
    if log is not None:
        with log.open("a") as fh:  # the controller is one process: its appends do not interleave
            fh.write(f"{_function_id(crashitem)}\t{crashitem}\n")
        _logs_written.add(log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for log in _logs_written:  # empty in workers
        log.unlink(missing_ok=True)
    _logs_written.clear()


def _crashes_of(function_id: str) -> list[str]:
    log = _crash_log(os.environ.get("PYTEST_XDIST_TESTRUNUID"))  # set in xdist workers only
    if log is None or not log.exists():
        return []
    rows = [line.split("\t", 1) for line in log.read_text().splitlines()]
    return [row[1] for row in rows if len(row) == 2 and row[0] == function_id]


@pytest.fixture(autouse=True)
def _sync_cuda_after_test():
    """A kernel's fault surfaces at the next synchronisation: wait for this test's GPU work inside the test, so a
    fault fails the test that launched the kernel, not the next one."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def pytest_runtest_setup(item: pytest.Item) -> None:
    crashed = _crashes_of(_function_id(item.nodeid))
    if len(crashed) >= MAX_CRASHES_PER_FUNCTION:
        pytest.fail(f"not run: {len(crashed)} cases of {_function_id(item.nodeid)} ended their worker (lost CUDA "
                    f"context, timeout or crash; first: {crashed[0]}), so its other cases are not run",
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
    message = f"vitkern: the CUDA context was lost in {item.nodeid} ({lost})"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"{message}; ending this worker so that the next tests get a fresh context\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
    item.session.shouldfail = f"{message}; the other tests of this process cannot use CUDA any more"
    return result
