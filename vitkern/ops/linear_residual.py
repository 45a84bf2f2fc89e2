"""Linear + layer scale + residual op family: y = residual + γ · (x @ Wᵀ + b) as ``vitkern::linear_residual_fwd/bwd``.

The attention half of a pre-norm block ends with ``x + ls1(attn.proj(o))``: unfused that is the proj GEMM, a layer
scale pass and a residual-add pass, each reading and writing an [M, D] activation. Here the bias, the layer scale and
the residual ride in the GEMM's epilogue (the same kernel family and epilogue as LayerNorm+MLP's fc2:
``vitkern.ops.ln_linear``'s ``linear`` primitive), so the branch output never reaches memory.

Contract (backend-independent; dtypes as in vitkern.ops.ln_linear: y in the residual's dtype):
  forward(x [M, K], weight [N, K], bias [N]?, residual [M, N], layer_scale [N]?) -> y [M, N]
  backward(dy, x, weight, bias?, layer_scale?) -> dx [M, K], dweight [N, K], dbias, dlayer_scale (empty where the
      parameter is absent); the residual's gradient is dy itself (no op, no copy).

Backward: dx = (dy·γ) @ W on the Triton GEMM (γ folded into W's rows, or in fp16 on dy in the GEMM's prologue:
``layer_scaled_dy_gemm``, as in LayerNorm+MLP's backward); dW, db and
dγ from :func:`vitkern.ops.ln_linear.scaled_linear_grads` (torch/cuBLAS, deterministic, the GEMM output is neither
kept nor recomputed).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern import dispatch
from vitkern.ops.ln_linear import BACKEND_FUSED_FORWARD, _unit_col_stride, layer_scaled_dy_gemm, problem, register, \
    scaled_linear_grads

OP = "linear_residual"

register(OP, layer_norm=False)


def _problem(direction: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
             layer_scale: Optional[Tensor]) -> dispatch.Problem:
    return problem(OP, direction, x, {"weight": weight}, {"bias": bias, "residual": residual, "layer_scale": layer_scale})


@dispatch.custom_op("vitkern::linear_residual_fwd", mutates_args=())
def linear_residual_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Tensor, layer_scale: Optional[Tensor]
) -> Tensor:
    backend = dispatch.select(_problem(dispatch.FORWARD, x, weight, bias, residual, layer_scale)).backend
    fused = getattr(backend, BACKEND_FUSED_FORWARD, None)
    if fused is not None:
        return fused(x, weight, bias, residual, layer_scale)
    y, _ = backend.linear(x, weight.t(), bias=bias, residual=residual, layer_scale=layer_scale)
    return y


@linear_residual_fwd.register_fake
def _(x, weight, bias, residual, layer_scale):
    return residual.new_empty((x.shape[0], weight.shape[0]))


@dispatch.custom_op("vitkern::linear_residual_bwd", mutates_args=())
def linear_residual_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], layer_scale: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dy = _unit_col_stride(dy)  # autograd may hand us expanded (stride-0) gradients
    backend = dispatch.select(_problem(dispatch.BACKWARD, x, weight, bias, None, layer_scale)).backend
    dx = layer_scaled_dy_gemm(backend, dy, weight, layer_scale)  # (dy·γ) @ W: [M, N] @ [N, K], in x's dtype
    dw, db, dls = scaled_linear_grads(dy, x, weight, bias, layer_scale)
    return dx, dw, db, dls


@linear_residual_bwd.register_fake
def _(dy, x, weight, bias, layer_scale):
    def like(p):
        return p.new_empty(p.shape) if p is not None else x.new_empty(0)

    return x.new_empty(x.shape), weight.new_empty(weight.shape), like(bias), like(layer_scale)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _residual, layer_scale = inputs
    ctx.save_for_backward(x, weight, bias, layer_scale)


def _backward(ctx, dy):
    x, weight, bias, layer_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[1] or need[2] or need[4]):  # only the residual needs a gradient
        return None, None, None, dy, None
    dx, dw, db, dls = torch.ops.vitkern.linear_residual_bwd(dy, x, weight, bias, layer_scale)
    grads = (dx, dw, db, dy, dls)  # empty dbias / dlayer_scale: the parameter is absent
    return tuple(g if need[i] and g.numel() else None for i, g in enumerate(grads))


dispatch.register_autograd(linear_residual_fwd, _backward, setup_context=_setup_context)
