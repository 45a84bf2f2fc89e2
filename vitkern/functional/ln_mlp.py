"""``vitkern.functional.ln_linear`` and ``vitkern.functional.ln_mlp``: LayerNorm fused into the next GEMM(s).

    ln_linear(x, ln_weight, ln_bias, weight, bias)   = F.linear(F.layer_norm(x), weight, bias)          (norm1 + qkv)
    ln_mlp(x, ln_weight, ln_bias, fc1_w, fc1_b, fc2_w, fc2_b, layer_scale)
        = x + layer_scale · F.linear(F.gelu(F.linear(F.layer_norm(x), fc1_w, fc1_b)), fc2_w, fc2_b)  (norm2 + mlp)
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitkern import dispatch
from vitkern.functional._autocast import cast_gemm_inputs
from vitkern.ops import ln_linear as ln_linear_op
from vitkern.ops import ln_mlp as ln_mlp_op
from vitkern.validation import as_rows, check_positive, check_tensor

__all__ = ["ln_linear", "ln_mlp"]


def _check_x(name: str, x: Tensor) -> int:
    check_tensor(name, "x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}; its last dim (the features) must be non-zero")
    return x.shape[-1]


def _check_param(name: str, arg: str, p: Tensor | None, shape: tuple[int, ...], x: Tensor, required: bool = False):
    if p is None:
        if required:
            raise TypeError(f"{name}: {arg} must be a torch.Tensor of shape {shape}, got None")
        return
    check_tensor(name, arg, p, shape=shape, like=x)


def check_gemm_dtypes(name: str, problem: dispatch.Problem) -> None:
    """The GEMM family's dtype rule (vitkern.ops.ln_linear) on an op's problem: TypeError naming the first argument
    that breaks it."""
    errors = ln_linear_op.mixed_dtype_reasons(problem)
    if errors:
        raise TypeError(f"{name}: {errors[0]}")


def _check_ln(name: str, x: Tensor, ln_weight, ln_bias, eps) -> int:
    d = _check_x(name, x)
    widths = {p.shape[0] for p in (ln_weight, ln_bias) if isinstance(p, Tensor) and p.dim() == 1}
    if len(widths) == 1 and d not in widths:  # the parameters agree with each other: the input is the odd one out
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}; its last dim must be the LayerNorm's width "
                         f"{widths.pop()} (the size of ln_weight / ln_bias)")
    _check_param(name, "ln_weight", ln_weight, (d,), x)
    _check_param(name, "ln_bias", ln_bias, (d,), x)
    check_positive(name, "eps", eps)
    return d


# ------------------------------------------------------------------------------------------------------- ln_linear
_LIN = "vitkern.ln_linear"


def _validate_linear(x, ln_weight, ln_bias, weight, bias, eps) -> int:
    d = _check_ln(_LIN, x, ln_weight, ln_bias, eps)
    check_tensor(_LIN, "weight", weight, ndim=2, like=x)
    if weight.shape[1] != d:
        raise ValueError(f"{_LIN}: weight has shape {tuple(weight.shape)}; expected [out_features, {d}] (x's last dim)")
    _check_param(_LIN, "bias", bias, (weight.shape[0],), x)
    check_gemm_dtypes(_LIN, ln_linear_op._problem(dispatch.FORWARD, x, ln_weight, ln_bias, weight, bias))
    return d


def ln_linear(
    x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), weight, bias)`` in one GEMM.

    LayerNorm statistics are fp32; the normalised tile is rounded to the weight's dtype before the matmul (what the
    unfused LayerNorm output holds, or autocast's cast of it); the GEMM accumulates in fp32 and returns the weight's
    dtype. Dtypes: the weight's is the GEMM's; x in it, or fp32 with an fp16/bf16 weight (mixed precision, what
    autocast gives); ln_weight, ln_bias, bias in x's dtype, the weight's or fp32.
    """
    x, (weight,), (ln_weight, ln_bias, bias) = cast_gemm_inputs(x, (weight,), (ln_weight, ln_bias, bias))
    d = _validate_linear(x, ln_weight, ln_bias, weight, bias, eps)
    rows = as_rows(x, d)
    y, _, _ = ln_linear_op.ln_linear_fwd(rows, ln_weight, ln_bias, weight, bias, float(eps))
    return y.view(*x.shape[:-1], weight.shape[0])


ln_linear.__vitkern_op__ = ln_linear_op.OP  # type: ignore[attr-defined]


def _describe_linear(x, ln_weight, ln_bias, weight, bias=None, eps=1e-5) -> dispatch.Problem:
    d = _validate_linear(x, ln_weight, ln_bias, weight, bias, eps)
    return ln_linear_op._problem(dispatch.FORWARD, x.reshape(-1, d), ln_weight, ln_bias, weight, bias)


dispatch.register_describer(ln_linear_op.OP, _describe_linear)


# ------------------------------------------------------------------------------------------------------- ln_mlp
_MLP = "vitkern.ln_mlp"


def _validate_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate):
    d = _check_ln(_MLP, x, ln_weight, ln_bias, eps)
    check_tensor(_MLP, "fc1_weight", fc1_weight, ndim=2, like=x)
    if fc1_weight.shape[1] != d:
        raise ValueError(f"{_MLP}: fc1_weight has shape {tuple(fc1_weight.shape)}; expected [hidden, {d}] (x's last dim)")
    hidden = fc1_weight.shape[0]
    _check_param(_MLP, "fc1_bias", fc1_bias, (hidden,), x)
    _check_param(_MLP, "fc2_weight", fc2_weight, (d, hidden), x, required=True)
    _check_param(_MLP, "fc2_bias", fc2_bias, (d,), x)
    _check_param(_MLP, "layer_scale", layer_scale, (d,), x)
    if approximate not in ln_mlp_op.APPROXIMATIONS:
        raise ValueError(f"{_MLP}: approximate must be one of {ln_mlp_op.APPROXIMATIONS} (F.gelu's), got {approximate!r}")
    check_gemm_dtypes(_MLP, ln_mlp_op._problem(dispatch.FORWARD, x, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                                fc2_weight, fc2_bias, layer_scale))
    return d


def ln_mlp(
    x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, fc1_weight: Tensor, fc1_bias: Tensor | None,
    fc2_weight: Tensor, fc2_bias: Tensor | None, layer_scale: Tensor | None = None, eps: float = 1e-5,
    approximate: str = "none",
) -> Tensor:
    """The pre-norm MLP residual branch with the residual: ``x + layer_scale · fc2(GELU(fc1(LN(x))))``.

    ``approximate`` is F.gelu's ("none": exact erf, timm's default; "tanh"). Dtypes as in :func:`ln_linear`, with
    both weights in one dtype; the result is in x's dtype (the residual stream: fp32 stays fp32 over bf16 weights).
    The pre-activation and the GELU output are kept for the backward only when autograd needs them.
    """
    x, (fc1_weight, fc2_weight), (ln_weight, ln_bias, fc1_bias, fc2_bias, layer_scale) = cast_gemm_inputs(
        x, (fc1_weight, fc2_weight), (ln_weight, ln_bias, fc1_bias, fc2_bias, layer_scale))
    d = _validate_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate)
    rows = as_rows(x, d)
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x,) + params)
    y = ln_mlp_op.ln_mlp_fwd(rows, *params, float(eps), approximate, save)[0]
    return y.view(x.shape)


ln_mlp.__vitkern_op__ = ln_mlp_op.OP  # type: ignore[attr-defined]


def _describe_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale=None, eps=1e-5,
                  approximate="none") -> dispatch.Problem:
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale)
    d = _validate_mlp(x, *params, eps, approximate)
    return ln_mlp_op._problem(dispatch.FORWARD, x.reshape(-1, d), *params)


dispatch.register_describer(ln_mlp_op.OP, _describe_mlp)
