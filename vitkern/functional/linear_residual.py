"""``vitkern.functional.linear_residual``: a Linear whose bias, layer scale and residual add run in the GEMM epilogue.

    linear_residual(x, weight, bias, residual, layer_scale) = residual + layer_scale · F.linear(x, weight, bias)
                                                              (a block's attention output: x + ls1(attn.proj(o)))
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitkern import dispatch
from vitkern.functional._autocast import cast_gemm_inputs
from vitkern.functional.ln_mlp import check_gemm_dtypes
from vitkern.ops import linear_residual as linear_residual_op
from vitkern.validation import as_rows, check_tensor

__all__ = ["linear_residual"]

_NAME = "vitkern.linear_residual"


def _validate(x, weight, bias, residual, layer_scale) -> tuple[int, int]:
    check_tensor(_NAME, "x", x, min_ndim=1)
    k = x.shape[-1]
    if k == 0:
        raise ValueError(f"{_NAME}: x has shape {tuple(x.shape)}; its last dim (in_features) must be non-zero")
    check_tensor(_NAME, "weight", weight, ndim=2, like=x)
    if weight.shape[1] != k:
        raise ValueError(f"{_NAME}: weight has shape {tuple(weight.shape)}; expected [out_features, {k}] "
                         f"(x's last dim is {k})")
    n = weight.shape[0]
    if bias is not None:
        check_tensor(_NAME, "bias", bias, shape=(n,), like=x)
    check_tensor(_NAME, "residual", residual, shape=(*x.shape[:-1], n), like=x)
    if layer_scale is not None:
        check_tensor(_NAME, "layer_scale", layer_scale, shape=(n,), like=x)
    check_gemm_dtypes(_NAME, linear_residual_op._problem(dispatch.FORWARD, x, weight, bias, residual, layer_scale))
    return k, n


def linear_residual(
    x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, layer_scale: Tensor | None = None
) -> Tensor:
    """``residual + layer_scale · F.linear(x, weight, bias)`` in one GEMM (bias, layer scale and residual in its
    epilogue, accumulated in fp32 and rounded once).

    x [..., K], weight [N, K], bias [N], residual [..., N] (x's leading dims), layer_scale [N]. Dtypes: the
    weight's is the GEMM's (x in it, or fp32 with an fp16/bf16 weight); bias, residual and layer_scale in x's
    dtype, the weight's or fp32. Returns [..., N] in the residual's dtype: under autocast x and the weight run in
    the autocast dtype and an fp32 residual stream stays fp32, as in the unfused ``x + ls(proj(o))``.
    """
    (residual, (x, weight), (bias, layer_scale)) = cast_gemm_inputs(residual, (x, weight), (bias, layer_scale))
    k, n = _validate(x, weight, bias, residual, layer_scale)
    y = linear_residual_op.linear_residual_fwd(as_rows(x, k), weight, bias, as_rows(residual, n), layer_scale)
    return y.view(residual.shape)


linear_residual.__vitkern_op__ = linear_residual_op.OP  # type: ignore[attr-defined]


def _describe(x, weight, bias, residual, layer_scale=None) -> dispatch.Problem:
    k, _ = _validate(x, weight, bias, residual, layer_scale)
    return linear_residual_op._problem(dispatch.FORWARD, x.reshape(-1, k), weight, bias, residual, layer_scale)


dispatch.register_describer(linear_residual_op.OP, _describe)
