"""Tests that a forced backend really ran: count calls of a CUDA forward and of the Triton backward after it."""

from __future__ import annotations

import contextlib
from typing import Iterator

from vitkern import dispatch


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
