"""Triton kernels. Each module launches its kernels from plain-PyTorch wrappers that state the layouts they take."""

from __future__ import annotations

from typing import Optional

import torch


def dense_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An [n] parameter (bias, LayerNorm weight, layer scale) as the kernels index it, ``ptr + offsets``: contiguous.
    No copy when it already is; strided or expanded (stride-0) views are copied. None passes through."""
    return t.contiguous() if t is not None else None
