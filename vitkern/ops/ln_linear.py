"""LayerNorm+Linear op family (the attention side: ``norm1`` + ``attn.qkv``) and the GEMM primitives it shares with
LayerNorm+MLP (``vitkern.ops.ln_mlp``).

Every backend provides three primitives with one meaning (so the forward/backward orchestration below is written
once and the two backends differ only in who computes them):

  stats(x [M, K], eps) -> mean [M], rstd [M]                         (fp32; fp64 for fp64 input)
  linear(a [M, K], b [K, N], ln=(mean, rstd, γ?, β?)?, bias [N]?, gelu=None|"none"|"tanh", want_pre, pre [M, N]?,
         act_bwd, residual [M, N]?, layer_scale [N]?) -> (out [M, N], pre [M, N] or None)
      out = residual + layer_scale · act(LN(a) @ b + bias); act_bwd: out = (a @ b) · GELU'(pre)
      b's dtype is the GEMM's: a (or LN(a), computed in fp32) is rounded to it; out is in the residual's dtype when
      there is one, else in b's; pre in b's.
  normalize(x, mean, rstd, γ?, β?, dtype) -> LN(x) from the saved statistics, rounded to ``dtype`` (x's by default):
      exactly the operand the GEMM prologue used
  ln: the LayerNorm op's backend (its backward gives dx, dγ, dβ)

Dtypes (every op of the family; what autocast hands them, see vitkern/functional/_autocast.py): the GEMM weights share
one dtype, the compute dtype. x is in it, or in fp32 with fp16/bf16 weights ("mixed": LayerNorm in fp32, its output
rounded to the compute dtype in the GEMM prologue, as autocast's fp32 LayerNorm followed by a bf16 Linear). Vectors
(LayerNorm γ/β, biases, layer scale) and the residual are each in x's dtype, the compute dtype or fp32: kernels read
them in fp32. Outputs: a GEMM output is in the compute dtype, a residual sum in the residual's dtype (so an fp32
residual stream stays fp32). Every gradient is in its input's dtype.

Contract of ``vitkern::ln_linear_fwd/bwd`` (backend-independent):
  forward(x [M, K], ln_weight [K]?, ln_bias [K]?, weight [N, K], bias [N]?, eps) -> y [M, N], mean [M], rstd [M]
  backward(dy, x, ln_weight?, ln_bias?, weight, bias?, mean, rstd, eps)
      -> dx [M, K], dln_weight, dln_bias, dweight [N, K], dbias (empty where the parameter is absent)

Backward: x̂ is recomputed from the saved mean/rstd. dx = LN-backward(dy @ W) runs on the Triton GEMM and the
LayerNorm backward kernel; the weight gradients dW = dyᵀ @ LN(x) and db = Σ dy are plain torch matmuls/sums (cuBLAS
on the GPU: a K-reduction over M rows is what cuBLAS is best at, fusing nothing into it would save a pass, and it is
deterministic; LN(x) is recomputed for it from the saved statistics). No float atomics anywhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern import dispatch, memory
from vitkern.backends import ReferenceBackend, TritonBackend
from vitkern.ops.layer_norm import LayerNormReference, LayerNormTriton
from vitkern.validation import MIXED_COMPUTE_DTYPES

OP = "ln_linear"
BACKEND_FUSED_FORWARD = "fused_forward"  # whole-op backends (CUDA: LN kernel + cuBLASLt) implement this method
TRITON_MAX_K = 8192  # the statistics pre-pass holds one [BLOCK_M, next_pow2(K)] tile per program


def stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


def _unit_col_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


class LnLinearReference(ReferenceBackend):
    """Plain PyTorch with eager rounding (each op's output in the input dtype), statistics in fp32/fp64."""

    ln = LayerNormReference()

    def stats(self, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        # the LayerNorm reference's statistics (aten's fused kernel where it keeps the contract: fp32/fp64); its
        # normalised output is dropped
        _, _, mean, rstd = self.ln.forward(x, None, None, None, eps)
        return mean, rstd

    def normalize(self, x, mean, rstd, w, b, dtype=None):
        acc = mean.dtype
        xn = (x.to(acc) - mean[:, None]).mul_(rstd[:, None])
        if w is not None and b is not None:
            xn = torch.addcmul(b.to(acc), xn, w.to(acc))
        elif w is not None:
            xn = xn.mul_(w.to(acc))
        elif b is not None:
            xn = xn.add_(b.to(acc))
        return xn.to(dtype or x.dtype)

    def linear(self, a, b, *, ln=None, a_scale=None, bias=None, gelu=None, want_pre=False, pre=None, act_bwd=False,
               residual=None, layer_scale=None):
        if ln is not None:
            a = self.normalize(a, *ln, dtype=b.dtype)
        elif a_scale is not None:  # A's columns scaled in fp32, rounded once (as the Triton prologue)
            a = (a.to(stat_dtype(a)) * a_scale.to(stat_dtype(a))).to(b.dtype)
        else:
            a = a.to(b.dtype)
        # F.linear's addmm: the bias in the GEMM's dtype (autocast casts it so), added before the one rounding
        z = torch.addmm(bias.to(b.dtype), a, b) if bias is not None else a @ b
        if act_bwd:
            return torch.ops.aten.gelu_backward(z, pre, approximate=gelu), None
        pre_out = z if want_pre else None
        if gelu is not None:
            z = F.gelu(z, approximate=gelu)
        if residual is not None:  # the branch joins the residual stream in the residual's dtype (fp32 under autocast)
            z = z.to(residual.dtype)
            z = residual + (z * layer_scale.to(z.dtype) if layer_scale is not None else z)
        return z, pre_out


def param_dtype_reasons(problem: dispatch.Problem) -> list[str]:
    """The single-dtype rule (the cuBLASLt backends: one operand and epilogue type): every parameter, the residual
    included, in the input's dtype."""
    params = problem.attr("weight_dtypes", ()) + problem.attr("other_dtypes", ())
    bad = sorted({str(d) for _, d in params if d != problem.dtype})
    return [f"parameter dtypes {bad} differ from the input's {problem.dtype} (mixed precision runs on Triton or the "
            "reference)"] if bad else []


def gemm_dtype_errors(x: torch.dtype, weights: Sequence[tuple[str, torch.dtype]],
                      others: Sequence[tuple[str, torch.dtype]]) -> list[str]:
    """The family's dtype rule (module docstring), as messages naming the offending arguments; [] when it holds.
    ``weights``: the GEMM weights, ``others``: the vectors and the residual, each as (name, dtype)."""
    compute = {d for _, d in weights}
    if len(compute) > 1:
        return ["the GEMM weights must share one dtype, got " + ", ".join(f"{n} {d}" for n, d in weights)]
    c = compute.pop() if compute else x
    if x != c and not (x == torch.float32 and c in MIXED_COMPUTE_DTYPES):
        return [f"x has dtype {x}; expected the weights' dtype {c} (or float32 with float16/bfloat16 weights: "
                "mixed precision, as under autocast)"]
    allowed = (x, c, torch.float32)
    return [f"{n} has dtype {d}; expected x's dtype {x}, the weights' {c} or torch.float32" for n, d in others
            if d not in allowed]


def mixed_dtype_reasons(problem: dispatch.Problem) -> list[str]:
    """The Triton kernels' and the reference's dtype rule: :func:`gemm_dtype_errors`."""
    return gemm_dtype_errors(problem.dtype, problem.attr("weight_dtypes", ()), problem.attr("other_dtypes", ()))


class LnLinearTriton(TritonBackend):
    """Statistics pre-pass + one fused GEMM kernel family (LN prologue; bias/GELU/residual/layer-scale epilogue)."""

    ln = LayerNormTriton()

    def __init__(self, layer_norm: bool = True) -> None:
        self.layer_norm = layer_norm  # the op runs the statistics pre-pass (False: a plain GEMM with epilogues)

    def reject_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = self.device_reasons(problem)
        m, k = problem.shape("x")
        if self.layer_norm and k > TRITON_MAX_K:
            reasons.append(f"input width {k} > {TRITON_MAX_K} (single-tile statistics pre-pass)")
        if m == 0:
            reasons.append("empty input (M = 0)")
        return reasons + mixed_dtype_reasons(problem)

    def stats(self, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        from vitkern.kernels.triton import ln_linear as k

        mean = memory.empty((x.shape[0],), torch.float32, x.device)
        rstd = memory.empty((x.shape[0],), torch.float32, x.device)
        k.ln_stats(x, eps, mean, rstd)
        return mean, rstd

    def normalize(self, x, mean, rstd, w, b, dtype=None):
        from vitkern.kernels.triton import ln_linear as k

        y = memory.empty(x.shape, dtype or x.dtype, x.device)
        k.ln_apply(x, mean, rstd, w, b, y)
        return y

    def linear(self, a, b, *, ln=None, a_scale=None, bias=None, gelu=None, want_pre=False, pre=None, act_bwd=False,
               residual=None, layer_scale=None):
        from vitkern.kernels.triton import ln_linear as k

        m, n = a.shape[0], b.shape[1]
        out = memory.empty((m, n), residual.dtype if residual is not None else b.dtype, a.device)
        if want_pre:
            pre = memory.empty((m, n), b.dtype, a.device)
        act = k.GELU_CODES[gelu] if gelu is not None else k.ACT_NONE
        k.fused_linear(a, b, out, ln=ln, a_scale=a_scale, bias=bias, act=act, pre=pre, act_bwd=act_bwd,
                       residual=residual, layer_scale=layer_scale)
        return out, (pre if want_pre else None)


def register(op: str, layer_norm: bool = True) -> None:
    """The reference and Triton backends of a GEMM-family op (``layer_norm``: whether it normalises its input)."""
    dispatch.register_backend(op, LnLinearReference())
    dispatch.register_backend(op, LnLinearTriton(layer_norm))


register(OP)


def problem(op: str, direction: str, x: Tensor, weights: dict[str, Tensor], others: dict[str, Optional[Tensor]]
            ) -> dispatch.Problem:
    """``weights``: the GEMM weights (one compute dtype); ``others``: the vectors and the residual (None: absent)."""
    w = tuple((n, t.dtype) for n, t in weights.items())
    o = tuple((n, t.dtype) for n, t in others.items() if t is not None)
    return dispatch.tensor_problem(op, direction, [("x", x)], attrs=[("weight_dtypes", w), ("other_dtypes", o)])


# ---------------------------------------------------------------------------------------------------- shared steps
def ln_weight_grads(backend, dxn: Tensor, dsum: Optional[Tensor], x: Tensor, ln_w, ln_b, mean, rstd):
    """LayerNorm backward for dL/d(LN(x)) = dxn (+ dsum flowing straight into x); returns dx, dγ, dβ, and LN(x)
    recomputed, in the GEMM's dtype (dxn's), for the weight gradient of the GEMM that consumed it."""
    dx, dlnw, dlnb = backend.ln.backward(dxn, dsum, x, ln_w, mean, rstd, ln_w is not None, ln_b is not None)
    xn = backend.normalize(x, mean, rstd, ln_w, ln_b, dxn.dtype)
    dlnw = dlnw.to(ln_w.dtype) if ln_w is not None else _empty(x)
    dlnb = dlnb.to(ln_b.dtype) if ln_b is not None else _empty(x)
    return dx, dlnw, dlnb, xn


def col_sum(t: Tensor) -> Tensor:
    return t.sum(0, dtype=stat_dtype(t))


def _mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 (fp64 for fp64) result: cuBLAS's fp32 output for 16-bit operands on CUDA."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else a.float() @ b.float()
    return a @ b


def layer_scaled_dy_gemm(backend, dy: Tensor, weight: Tensor, layer_scale: Optional[Tensor], **epilogue) -> Tensor:
    """The input gradient (dy·γ) @ W [M, K] of y = residual + γ · (a @ Wᵀ + b) (dy [M, N], W [N, K]) on
    ``backend.linear``, with ``epilogue`` (e.g. GELU' for fc2 of the MLP).

    γ is folded into W's rows (N·K elements, independent of M), except in fp16: there γ·W underflows for the small
    γ a layer scale starts from (1e-5, 1e-6: DeiT III, CaiT; W ~ 0.02 puts γ·W below fp16's smallest subnormal),
    while dy·γ, what the unfused graph computes, keeps the loss scale GradScaler puts into dy. So fp16 scales dy's
    columns (in fp32, rounded once) in the GEMM's prologue (the Triton kernel's SCALE_A: no pass over dy)."""
    if layer_scale is None:
        return backend.linear(dy, weight, **epilogue)[0]
    if weight.dtype == torch.float16:
        return backend.linear(dy, weight, a_scale=layer_scale, **epilogue)[0]
    # fp32 γ under autocast would promote the product: back to the GEMM's dtype
    return backend.linear(dy, (weight * layer_scale[:, None]).to(weight.dtype), **epilogue)[0]


def scaled_linear_grads(dy: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], layer_scale: Optional[Tensor]):
    """Parameter gradients of y = residual + γ · (a @ Wᵀ + b) (fc2 of the MLP, the attention's proj):
    dW = γ·(dyᵀ @ a), db = γ·Σ dy, dγ = Σ_m dy ∘ (a @ Wᵀ + b) = rowsum(W ∘ G) + b ∘ Σ dy with G = dyᵀ @ a, so the
    GEMM output is neither kept nor recomputed. Returns dW, db, dγ (empty where the parameter is absent).
    dy may be wider than a (an fp32 residual stream over a bf16 GEMM): the GEMMs take it rounded to a's dtype, the
    sums take it as it is."""
    dy_sum = col_sum(dy)
    dy_gemm = dy.to(a.dtype)
    if layer_scale is None:
        db = dy_sum.to(bias.dtype) if bias is not None else _empty(a)
        return dy_gemm.t() @ a, db, _empty(a)
    acc = stat_dtype(a)
    g = _mm_acc(dy_gemm.t(), a).to(acc)  # [N, K] = dW before the layer scale, kept in fp32: dγ and dW both derive from it
    lsf = layer_scale.to(acc)
    dw = (g * lsf[:, None]).to(weight.dtype)
    db = (dy_sum * lsf).to(bias.dtype) if bias is not None else _empty(a)
    dls = (weight.to(acc) * g).sum(1)
    if bias is not None:
        dls = dls + bias.to(acc) * dy_sum
    return dw, db, dls.to(layer_scale.dtype)


# ---------------------------------------------------------------------------------------------------- custom ops
def _problem(direction, x, ln_weight, ln_bias, weight, bias) -> dispatch.Problem:
    return problem(OP, direction, x, {"weight": weight}, {"ln_weight": ln_weight, "ln_bias": ln_bias, "bias": bias})


@dispatch.custom_op("vitkern::ln_linear_fwd", mutates_args=())
def ln_linear_fwd(
    x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    backend = dispatch.select(_problem(dispatch.FORWARD, x, ln_weight, ln_bias, weight, bias)).backend
    fused = getattr(backend, BACKEND_FUSED_FORWARD, None)
    if fused is not None:
        return fused(x, ln_weight, ln_bias, weight, bias, eps)
    mean, rstd = backend.stats(x, eps)
    y, _ = backend.linear(x, weight.t(), ln=(mean, rstd, ln_weight, ln_bias), bias=bias)
    return y, mean, rstd


@ln_linear_fwd.register_fake
def _(x, ln_weight, ln_bias, weight, bias, eps):
    stats = x.new_empty((x.shape[0],), dtype=stat_dtype(x))
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype), stats, stats.new_empty(stats.shape)


@dispatch.custom_op("vitkern::ln_linear_bwd", mutates_args=())
def ln_linear_bwd(
    dy: Tensor, x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    mean: Tensor, rstd: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dy = _unit_col_stride(dy)  # autograd may hand us expanded (stride-0) gradients
    backend = dispatch.select(_problem(dispatch.BACKWARD, x, ln_weight, ln_bias, weight, bias)).backend
    dxn, _ = backend.linear(dy, weight)  # dL/dLN(x) = dy @ W
    dx, dlnw, dlnb, xn = ln_weight_grads(backend, dxn, None, x, ln_weight, ln_bias, mean, rstd)
    dw = dy.t() @ xn  # dy: the gradient of y, in the weight's dtype
    db = col_sum(dy).to(bias.dtype) if bias is not None else _empty(x)
    return dx, dlnw, dlnb, dw, db


@ln_linear_bwd.register_fake
def _(dy, x, ln_weight, ln_bias, weight, bias, mean, rstd, eps):
    def like(p):
        return p.new_empty(p.shape) if p is not None else x.new_empty(0)

    return x.new_empty(x.shape), like(ln_weight), like(ln_bias), like(weight), like(bias)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.eps = eps
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    grads = torch.ops.vitkern.ln_linear_bwd(dy, *ctx.saved_tensors, ctx.eps)
    need = ctx.needs_input_grad
    return tuple(g if need[i] and g.numel() else None for i, g in enumerate(grads)) + (None,)


dispatch.register_autograd(ln_linear_fwd, _backward, setup_context=_setup_context)
