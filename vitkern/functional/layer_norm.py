"""``vitkern.functional.layer_norm``: F.layer_norm with an optional fused residual add."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from vitkern import dispatch
from vitkern.functional import _autocast
from vitkern.ops import layer_norm as ln_op
from vitkern.validation import FLOAT_DTYPES, as_rows, check_positive, check_tensor

__all__ = ["layer_norm"]

_NAME = "vitkern.layer_norm"
_PARAM_DTYPES = FLOAT_DTYPES


def _normalized_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any((not isinstance(d, int)) or d <= 0 for d in shape):
        raise ValueError(f"{_NAME}: normalized_shape must be a non-empty sequence of positive ints, got {normalized_shape!r}")
    return shape


def _autocast_fp32(x, weight, bias, residual):
    return _autocast.cast_inputs_fp32(x, weight, bias, residual, devices=_autocast.LAYER_NORM_FP32_DEVICES)


def _validate(x, normalized_shape, weight, bias, eps, residual) -> tuple[int, ...]:
    shape = _normalized_shape(normalized_shape)
    check_tensor(_NAME, "x", x, min_ndim=len(shape))
    if tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(
            f"{_NAME}: x has shape {tuple(x.shape)}, whose trailing dims must equal normalized_shape {shape}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(_NAME, name, p, dtypes=_PARAM_DTYPES, shape=shape, like=x)
    if residual is not None:
        check_tensor(_NAME, "residual", residual, shape=tuple(x.shape), like=x, same_dtype=True)
    check_positive(_NAME, "eps", eps)
    return shape


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the trailing ``normalized_shape`` dims, statistics in fp32.

    With ``residual`` it computes ``s = x + residual`` and returns ``(layer_norm(s), s)`` in one pass (the
    pre-norm block pattern). The output has x's dtype; weight/bias may be x's dtype or fp32 (mixed precision).
    Under CUDA autocast it computes and returns fp32, as torch's LayerNorm does there.
    """
    x, weight, bias, residual = _autocast_fp32(x, weight, bias, residual)
    shape = _validate(x, normalized_shape, weight, bias, eps, residual)
    n = math.prod(shape)
    x2 = as_rows(x, n)
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    r2 = as_rows(residual, n) if residual is not None else None
    y, s, _, _ = ln_op.layer_norm_fwd(x2, w, b, r2, float(eps))
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), s.view(x.shape)


layer_norm.__vitkern_op__ = ln_op.OP  # type: ignore[attr-defined]


def _describe(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None) -> dispatch.Problem:
    x, weight, bias, residual = _autocast_fp32(x, weight, bias, residual)
    shape = _validate(x, normalized_shape, weight, bias, eps, residual)
    n = math.prod(shape)
    rows = x.reshape(-1, n)
    return ln_op.problem(dispatch.FORWARD, rows, weight, rows if residual is not None else None)


dispatch.register_describer(ln_op.OP, _describe)
