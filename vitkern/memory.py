"""Output allocation for kernels, with optional poisoning so tests catch elements a kernel never wrote."""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Sequence

import torch

_poison: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "vitkern_poison_outputs", default=os.environ.get("VITKERN_POISON_OUTPUTS", "0") == "1"
)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Inside the block every kernel output buffer starts as NaN (floats) or the dtype's max (integers)."""
    token = _poison.set(enabled)
    try:
        yield
    finally:
        _poison.reset(token)


def poisoning() -> bool:
    return _poison.get()


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs: uninitialised normally, poisoned under :func:`poison_outputs`."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison.get():
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).max)
    return out
