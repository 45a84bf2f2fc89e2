"""LayerNorm+MLP op family: y = x + γ_ls · fc2(GELU(fc1(LN(x)))) as ``vitkern::ln_mlp_fwd/bwd``.

Built on the GEMM primitives of ``vitkern.ops.ln_linear`` (same backends, same three primitives):
  forward: statistics pre-pass -> fc1 GEMM (LN prologue; bias + GELU epilogue, also storing the pre-activation when
           a backward will follow) -> fc2 GEMM (bias + layer scale + residual epilogue). The LN output and the
           un-activated fc2 output never reach memory.

Contract (backend-independent):
  forward(x [M, D], ln_weight [D]?, ln_bias [D]?, fc1_weight [H, D], fc1_bias [H]?, fc2_weight [D, H], fc2_bias [D]?,
          layer_scale [D]?, eps, approximate ("none" = exact erf GELU, "tanh"), save_for_backward)
      -> y [M, D], pre [M, H] (fc1 output before GELU), h [M, H] (after GELU), mean [M], rstd [M]
         (pre and h are empty when save_for_backward is False: inference writes only y)
  backward(dy, x, <the parameters>, pre, h, mean, rstd, eps, approximate)
      -> dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dlayer_scale (empty where absent)

Backward, and why the pre-activation is kept rather than recomputed: GELU'(pre) needs pre, and recomputing it is a
whole fc1 GEMM (2·M·D·H flops) against one extra M×H store in the forward; h is kept too because dW2 = dyᵀ @ h needs
it and re-deriving it from pre is another M×H pass.
  dpre  = ((dy · γ_ls) @ W2) · GELU'(pre)     Triton GEMM, GELU' in the epilogue (γ_ls folded into W2's rows;
                                               in fp16 on dy in the prologue, see layer_scaled_dy_gemm)
  dLN   = dpre @ W1                            Triton GEMM
  dx    = LN-backward(dLN) + dy                LayerNorm backward kernel (residual gradient added in the same pass)
  weight gradients with torch/cuBLAS (deterministic, no atomics; see vitkern.ops.ln_linear):
  dW1 = dpreᵀ @ LN(x) (LN recomputed), db1 = Σ dpre, and dW2, db2, dγ_ls from
  vitkern.ops.ln_linear.scaled_linear_grads (no need to keep or recompute the fc2 output).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern import dispatch
from vitkern.ops.ln_linear import BACKEND_FUSED_FORWARD, _empty, _unit_col_stride, col_sum, layer_scaled_dy_gemm, \
    ln_weight_grads, problem, register, scaled_linear_grads, stat_dtype

OP = "ln_mlp"
APPROXIMATIONS = ("none", "tanh")  # F.gelu's ``approximate``: "none" is the exact erf form (timm's default)

register(OP)


def _problem(direction, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale):
    return problem(OP, direction, x, {"fc1_weight": fc1_weight, "fc2_weight": fc2_weight},
                   {"ln_weight": ln_weight, "ln_bias": ln_bias, "fc1_bias": fc1_bias, "fc2_bias": fc2_bias,
                    "layer_scale": layer_scale})


@dispatch.custom_op("vitkern::ln_mlp_fwd", mutates_args=())
def ln_mlp_fwd(
    x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], fc1_weight: Tensor, fc1_bias: Optional[Tensor],
    fc2_weight: Tensor, fc2_bias: Optional[Tensor], layer_scale: Optional[Tensor], eps: float, approximate: str,
    save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale)
    backend = dispatch.select(_problem(dispatch.FORWARD, x, *params)).backend
    fused = getattr(backend, BACKEND_FUSED_FORWARD, None)
    if fused is not None:
        return fused(x, *params, eps, approximate, save_for_backward)
    mean, rstd = backend.stats(x, eps)
    h, pre = backend.linear(x, fc1_weight.t(), ln=(mean, rstd, ln_weight, ln_bias), bias=fc1_bias, gelu=approximate,
                            want_pre=save_for_backward)
    y, _ = backend.linear(h, fc2_weight.t(), bias=fc2_bias, residual=x, layer_scale=layer_scale)
    if not save_for_backward:
        return y, _empty(x), _empty(x), mean, rstd
    return y, pre, h, mean, rstd


@ln_mlp_fwd.register_fake
def _(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate,
      save_for_backward):
    m, hidden = x.shape[0], fc1_weight.shape[0]
    stats = x.new_empty((m,), dtype=stat_dtype(x))
    act = (lambda: x.new_empty((m, hidden), dtype=fc1_weight.dtype)) if save_for_backward else (lambda: x.new_empty(0))
    return x.new_empty(x.shape), act(), act(), stats, stats.new_empty(stats.shape)


@dispatch.custom_op("vitkern::ln_mlp_bwd", mutates_args=())
def ln_mlp_bwd(
    dy: Tensor, x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], fc1_weight: Tensor,
    fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor], layer_scale: Optional[Tensor],
    pre: Tensor, h: Tensor, mean: Tensor, rstd: Tensor, eps: float, approximate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if pre.numel() == 0 and x.numel() != 0:
        raise RuntimeError("vitkern.ln_mlp backward: the forward ran with save_for_backward=False")
    dy = _unit_col_stride(dy)  # autograd may hand us expanded (stride-0) gradients
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale)
    backend = dispatch.select(_problem(dispatch.BACKWARD, x, *params)).backend
    # dpre = ((dy·γ_ls) @ W2) · GELU'(pre): [M, D] @ [D, H] -> [M, H]
    dpre = layer_scaled_dy_gemm(backend, dy, fc2_weight, layer_scale, gelu=approximate, act_bwd=True, pre=pre)
    dxn, _ = backend.linear(dpre, fc1_weight)  # [M, D]
    dx, dlnw, dlnb, xn = ln_weight_grads(backend, dxn, dy, x, ln_weight, ln_bias, mean, rstd)
    dw1 = dpre.t() @ xn  # dpre and xn are both in the GEMM's dtype
    db1 = col_sum(dpre).to(fc1_bias.dtype) if fc1_bias is not None else _empty(x)
    dw2, db2, dls = scaled_linear_grads(dy, h, fc2_weight, fc2_bias, layer_scale)
    return dx, dlnw, dlnb, dw1, db1, dw2, db2, dls


@ln_mlp_bwd.register_fake
def _(dy, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, pre, h, mean, rstd, eps,
      approximate):
    def like(p):
        return p.new_empty(p.shape) if p is not None else x.new_empty(0)

    return (x.new_empty(x.shape), like(ln_weight), like(ln_bias), like(fc1_weight), like(fc1_bias), like(fc2_weight),
            like(fc2_bias), like(layer_scale))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate, _save = inputs
    _, pre, h, mean, rstd = output
    ctx.eps, ctx.approximate = eps, approximate
    ctx.save_for_backward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, pre, h, mean,
                          rstd)
    ctx.mark_non_differentiable(pre, h, mean, rstd)


def _backward(ctx, dy, *_unused):
    saved = ctx.saved_tensors
    grads = torch.ops.vitkern.ln_mlp_bwd(dy, *saved, ctx.eps, ctx.approximate)
    need = ctx.needs_input_grad
    return tuple(g if need[i] and g.numel() else None for i, g in enumerate(grads)) + (None, None, None)


dispatch.register_autograd(ln_mlp_fwd, _backward, setup_context=_setup_context)
