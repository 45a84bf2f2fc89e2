"""The CUDA C++ backend of the LayerNorm op family (kernels: csrc/ops/layer_norm.cu, ops torch.ops.vitkern_C.*).

Implements the backend-independent contract of :mod:`vitkern.ops.layer_norm` (forward and backward may be served by
different backends). Needs the optional extension ``vitkern._C`` (``bash scripts/build_csrc.sh --inplace`` or
``vitkern._extension.load_jit()``) and a GPU it was compiled for; otherwise :meth:`LayerNormCuda.availability` says
why, and ``vitkern.explain`` shows it.
"""

from __future__ import annotations

import torch

from vitkern import dispatch, memory
from vitkern.backends.cuda_common import CudaBackend
from vitkern.ops.layer_norm import OP, input_reasons
from vitkern.validation import dense_vector

__all__ = ["LayerNormCuda"]

CUDA_MAX_N = 8192  # widest row the kernels are instantiated for (csrc/ops/layer_norm.cuh kMaxWidth)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_params(weight, bias):
    """weight/bias as the kernels take them: unit stride, one dtype. If weight and bias differ (one in x's dtype, one
    fp32), upcast the narrower one to fp32: exact, so the result is what the mixed pair means."""
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        weight, bias = weight.float(), bias.float()
    return dense_vector(weight), dense_vector(bias)


class LayerNormCuda(CudaBackend):
    """Hand-written CUDA: 16-byte vector loads, one warp per row (several rows per CTA) up to N = 1280, rows held in
    registers, fp32 two-pass statistics, deterministic weight/bias gradients from per-CTA fp32 partials."""

    dtypes = CUDA_DTYPES  # ranked after Triton until measured: vitkern/backends/cuda_common.py
    op_name = "layer_norm_fwd"
    forward_only = False  # forward and backward kernels

    def op_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = []
        m, n = problem.shape("x")
        if n > CUDA_MAX_N:
            reasons.append(f"row width {n} > {CUDA_MAX_N} (rows are held in registers)")
        return reasons + input_reasons(problem)

    def forward(self, x, weight, bias, residual, eps):
        weight, bias = _kernel_params(weight, bias)
        m, n = x.shape
        y = memory.empty((m, n), x.dtype, x.device)
        s = memory.empty((m, n), x.dtype, x.device) if residual is not None else None
        mean = memory.empty((m,), torch.float32, x.device)
        rstd = memory.empty((m,), torch.float32, x.device)
        torch.ops.vitkern_C.layer_norm_fwd.out(x, weight, bias, residual, float(eps), y=y, sum=s, mean=mean, rstd=rstd)
        return y, (s if s is not None else x.new_empty(0)), mean, rstd

    def backward(self, dy, dsum, xs, weight, mean, rstd, need_dw, need_db):
        dx = memory.empty(xs.shape, xs.dtype, xs.device)
        # stats from another backend's forward: fp32 [M] per the contract; contiguous() is a no-op for ours
        weight = dense_vector(weight)
        dw, db = torch.ops.vitkern_C.layer_norm_bwd.out(
            dy, dsum, xs, weight, mean.float().contiguous(), rstd.float().contiguous(), need_dw, need_db, dx=dx
        )
        return dx, (dw if need_dw else None), (db if need_db else None)


dispatch.register_backend(OP, LayerNormCuda())
