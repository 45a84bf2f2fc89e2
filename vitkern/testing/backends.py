"""Test helpers about backends: which backend each dispatch chose, that a forced backend really ran (count calls of a
CUDA forward and of the Triton backward after it), and running every autotune config of the Triton kernels."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from vitkern import dispatch


@contextlib.contextmanager
def record_choices() -> Iterator[set[tuple[str, str, str]]]:
    """Inside the block, collect (op, direction, backend name) of every dispatch decision, so a test can check that
    the backend it forced with ``strict=False`` really served each op (and was not silently passed over)."""
    chosen: set[tuple[str, str, str]] = set()
    real = dispatch.select

    def select(problem):
        choice = real(problem)
        chosen.add((problem.op, problem.direction, choice.backend_name))
        return choice

    dispatch.select = select
    try:
        yield chosen
    finally:
        dispatch.select = real


def ran_on(chosen: set[tuple[str, str, str]], backend: str, ops, directions=(dispatch.FORWARD, dispatch.BACKWARD)):
    """The (op, direction) pairs of ``ops`` x ``directions`` that never ran on ``backend`` (empty: all did)."""
    return [(op, d) for op in ops for d in directions if (op, d, backend) not in chosen]


@contextlib.contextmanager
def cuda_forward_triton_backward(op: str) -> Iterator[dict[str, int]]:
    """Prefer ``op``'s cuda backend (strict=False: its backward problems go to Triton by design) and count the calls
    of the CUDA ``forward`` and the Triton ``backward``, so a silent fallback fails the test (see :func:`check_ran`)."""
    calls = {"cuda_forward": 0, "triton_backward": 0}
    table = dispatch.backends(op)
    cuda_cls, triton_cls = type(table["cuda"]), type(table["triton"])
    fwd, bwd = cuda_cls.forward, triton_cls.backward

    def cuda_forward(self, *args, **kwargs):
        calls["cuda_forward"] += 1
        return fwd(self, *args, **kwargs)

    def triton_backward(self, *args, **kwargs):
        calls["triton_backward"] += 1
        return bwd(self, *args, **kwargs)

    cuda_cls.forward, triton_cls.backward = cuda_forward, triton_backward
    try:
        with dispatch.use_backend("cuda", op=op, strict=False):
            yield calls
    finally:
        cuda_cls.forward, triton_cls.backward = fwd, bwd


def check_ran(calls: dict[str, int], before: dict[str, int], backward: bool = True) -> None:
    assert calls["cuda_forward"] > before["cuda_forward"], ("the CUDA forward did not run", calls)
    if backward:
        assert calls["triton_backward"] > before["triton_backward"], ("the Triton backward did not run", calls)


def run_every_triton_config(run: Callable[[], object]) -> dict[str, list[int]]:
    """Call ``run()`` once per autotune config: in call i every autotuned Triton launch runs config i of its pruned
    list (modulo the list's length), until the longest list is covered. The autotuner (or VITKERN_AUTOTUNE=0) runs
    one config per shape; this checks the others. A config over the device's limits (OutOfResources, which the
    autotuner skips too) is reported, not failed, but at least one must run. Returns {"ran": [...], "skipped": [...]}."""
    from triton.runtime.errors import OutOfResources

    from vitkern.kernels.triton import tuning

    result: dict[str, list[int]] = {"ran": [], "skipped": []}
    index, most = 0, 1
    while index < most:
        with tuning.only_config(index) as seen:
            try:
                run()
                result["ran"].append(index)
            except OutOfResources:
                result["skipped"].append(index)
        most = max(most, seen["most"])
        index += 1
    assert result["ran"], f"every config ran out of resources: {result}"
    return result
