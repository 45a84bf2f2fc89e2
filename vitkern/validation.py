"""Argument checks shared by every public function: each error names the op, the argument and the expectation."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# weight (GEMM) dtypes that fp32 activations may meet: mixed precision, what autocast gives an fp32 model
MIXED_COMPUTE_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: Any,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    ndim: int | None = None,
    min_ndim: int | None = None,
    shape: Sequence[int] | None = None,
    like: torch.Tensor | None = None,
    same_dtype: bool = False,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor with the expected dtype, rank, shape and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of ({_dtype_names(dtypes)})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {like.device}; expected the same device")
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected the input's dtype {like.dtype}")
    return t


def check_positive(op: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{op}: {name} must be a positive number, got {value!r}")
    return float(value)


def dense_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """An [n] parameter (bias, LayerNorm weight, layer scale) as the kernels index it, ``ptr + offsets``: contiguous.
    No copy when it already is; strided or expanded (stride-0) views are copied. None passes through."""
    return t.contiguous() if t is not None else None


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """View ``t`` as [M, n] rows with unit column stride, copying only when no such view exists."""
    rows = t.reshape(-1, n)
    return rows if rows.stride(1) == 1 or n == 1 else rows.contiguous()
