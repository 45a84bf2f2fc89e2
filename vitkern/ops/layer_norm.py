"""LayerNorm op family: backends, the ``vitkern::layer_norm_fwd/bwd`` custom ops and their autograd.

Contract shared by every backend (so the forward and backward may be served by different backends):
  forward(x [M, N], weight [N]?, bias [N]?, residual [M, N]?, eps)
      -> y [M, N] (x.dtype), sum [M, N] (x + residual; empty when no residual), mean [M], rstd [M]
         (stats fp32; fp64 for fp64 input, which only the reference backend takes)
  backward(dy, dsum?, xs (the normalised input: x or the sum), weight?, mean, rstd, need_dw, need_db)
      -> dx [M, N], dweight [N] (weight.dtype; empty if not needed), dbias [N] (empty if not needed)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern import dispatch, memory
from vitkern.backends import ReferenceBackend, TritonBackend

OP = "layer_norm"
TRITON_MAX_N = 8192  # one [BLOCK_M, next_pow2(N)] tile per program; wider rows need a multi-pass kernel


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def aten_keeps_contract(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether aten's LayerNorm kernels keep the contract: fp32/fp64 input with parameters of its dtype (they
    compute in the input's dtype, so 16-bit inputs would get 16-bit statistics). On CPU they run the backward
    ~30x faster than the explicit column sums below (M = 1576, N = 384, fp32)."""
    return x.dtype in (torch.float32, torch.float64) and all(p is None or p.dtype == x.dtype for p in params)


class LayerNormReference(ReferenceBackend):
    """Plain PyTorch in fp32 (fp64 for fp64 input): the CPU default and the fallback. aten's LayerNorm where it
    keeps the contract (:func:`aten_keeps_contract`), the explicit formulas otherwise."""

    def forward(self, x, weight, bias, residual, eps):
        acc = _stat_dtype(x)
        s = x + residual if residual is not None else x
        if aten_keeps_contract(s, weight, bias):
            y, mean, rstd = torch.native_layer_norm(s, (s.shape[1],), weight, bias, eps)
            return y, (s.contiguous() if residual is not None else x.new_empty(0)), mean.view(-1), rstd.view(-1)
        xf = s.to(acc)
        mean = xf.mean(-1)
        xc = xf - mean[:, None]
        rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
        y = xc * rstd[:, None]
        if weight is not None:
            y = y * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        # contiguous like the fake (x may be a strided view; the compiled graph trusts the fake's strides)
        return y.to(x.dtype).contiguous(), (s.contiguous() if residual is not None else x.new_empty(0)), mean, rstd

    def backward(self, dy, dsum, xs, weight, mean, rstd, need_dw, need_db):
        acc = mean.dtype
        if aten_keeps_contract(xs, dy, weight) and mean.dtype == rstd.dtype == xs.dtype:
            dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
                dy, xs, (xs.shape[1],), mean, rstd, weight, None, [True, need_dw and weight is not None, False])
            dx = dx + dsum if dsum is not None else dx
            return dx, dw, (dy.sum(0) if need_db else None)
        xhat = (xs.to(acc) - mean[:, None]) * rstd[:, None]
        dyf = dy.to(acc)
        wdy = dyf * weight.to(acc) if weight is not None else dyf
        c1 = (xhat * wdy).mean(-1, keepdim=True)
        c2 = wdy.mean(-1, keepdim=True)
        dx = (wdy - (xhat * c1 + c2)) * rstd[:, None]
        if dsum is not None:
            dx = dx + dsum.to(acc)
        dw = (dyf * xhat).sum(0) if need_dw else None
        db = dyf.sum(0) if need_db else None
        return dx.to(xs.dtype), dw, db


def input_reasons(problem: dispatch.Problem) -> list[str]:
    """The rules every kernel backend shares: unit column stride, weight/bias in x's dtype or fp32."""
    reasons = []
    if not problem.attr("unit_col_stride", True):
        reasons.append("x/residual columns are not contiguous (stride(1) != 1)")
    wdt = problem.attr("weight_dtype")
    if wdt is not None and wdt not in (problem.dtype, torch.float32):
        reasons.append(f"weight/bias dtype {wdt} is neither x's dtype nor float32")
    return reasons


class LayerNormTriton(TritonBackend):
    """Several rows per program, fp32 statistics, deterministic weight/bias gradients."""

    def reject_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = self.device_reasons(problem)
        m, n = problem.shape("x")
        if n > TRITON_MAX_N:
            reasons.append(f"row width {n} > {TRITON_MAX_N} (single-tile kernel)")
        if m == 0:
            reasons.append("empty input (M = 0)")
        return reasons + input_reasons(problem)

    def forward(self, x, weight, bias, residual, eps):
        from vitkern.kernels.triton import layer_norm as k

        m, n = x.shape
        y = memory.empty((m, n), x.dtype, x.device)
        s = memory.empty((m, n), x.dtype, x.device) if residual is not None else x.new_empty(0)
        mean = memory.empty((m,), torch.float32, x.device)
        rstd = memory.empty((m,), torch.float32, x.device)
        k.layer_norm_fwd(x, weight, bias, residual, eps, y, s if residual is not None else None, mean, rstd)
        return y, s, mean, rstd

    def backward(self, dy, dsum, xs, weight, mean, rstd, need_dw, need_db):
        from vitkern.kernels.triton import layer_norm as k

        dx = memory.empty(xs.shape, xs.dtype, xs.device)
        dw, db = k.layer_norm_bwd(dy, dsum, xs, weight, mean, rstd, dx, need_dw, need_db)
        return dx, dw, db


dispatch.register_backend(OP, LayerNormReference())
dispatch.register_backend(OP, LayerNormTriton())


def problem(direction: str, x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor]) -> dispatch.Problem:
    return dispatch.tensor_problem(
        OP,
        direction,
        [("x", x), ("residual", residual)],
        attrs=[
            ("weight_dtype", weight.dtype if weight is not None else None),
            # the kernels index rows by stride and columns densely (the functional guarantees it; direct op callers may not)
            ("unit_col_stride", x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)),
        ],
    )


def _unit_col_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dispatch.custom_op("vitkern::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend = dispatch.select(problem(dispatch.FORWARD, x, weight, residual)).backend
    return backend.forward(x, weight, bias, residual, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    m, n = x.shape
    stats = x.new_empty((m,), dtype=_stat_dtype(x))
    s = x.new_empty((m, n)) if residual is not None else x.new_empty(0)
    return x.new_empty((m, n)), s, stats, torch.empty_like(stats)


@dispatch.custom_op("vitkern::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor,
    dsum: Optional[Tensor],
    xs: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dy = _unit_col_stride(dy)  # autograd may hand us expanded (stride-0) or transposed gradients
    dsum = _unit_col_stride(dsum) if dsum is not None else None
    backend = dispatch.select(problem(dispatch.BACKWARD, xs, weight, dsum)).backend
    dx, dw, db = backend.backward(dy, dsum, xs, weight, mean, rstd, need_dw, need_db)
    wdt = weight.dtype if weight is not None else xs.dtype
    dw = dw.to(wdt) if dw is not None else xs.new_empty(0)
    db = db.to(wdt) if db is not None else xs.new_empty(0)
    return dx, dw, db


@layer_norm_bwd.register_fake
def _(dy, dsum, xs, weight, mean, rstd, need_dw, need_db):
    n = xs.shape[1]
    wdt = weight.dtype if weight is not None else xs.dtype
    return (
        xs.new_empty(xs.shape),
        xs.new_empty((n,) if need_dw else (0,), dtype=wdt),
        xs.new_empty((n,) if need_db else (0,), dtype=wdt),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    y, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    if not ctx.has_residual:
        ctx.mark_non_differentiable(s)


def _backward(ctx, dy, dsum, _dmean, _drstd):
    xs, weight, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.vitkern.layer_norm_bwd(
        dy, dsum if ctx.has_residual else None, xs, weight, mean, rstd, need_dw, need_db  # dsum None: sum unused
    )
    return dx, (dw if need_dw else None), (db if need_db else None), (dx if ctx.has_residual else None), None


dispatch.register_autograd(layer_norm_fwd, _backward, setup_context=_setup_context)
