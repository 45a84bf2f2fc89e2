"""The CUDA C++ backends of the LayerNorm+Linear, LayerNorm+MLP and Linear+residual op families
(csrc/ops/ln_mlp.cu: the LayerNorm kernel of csrc/ops/layer_norm.cuh, then cuBLASLt GEMMs with bias / GELU /
GELU+aux epilogues and the residual through beta·C; ops ``torch.ops.vitkern_C.ln_linear_fwd``, ``ln_mlp_fwd`` and
``linear_residual_fwd``, the last being LayerNorm+MLP's fc2 step on its own: no LayerNorm, hence no width limit).

Forward only, whole-op: each backend's ``fused_forward`` takes the op's forward arguments and returns exactly what
the op's forward returns (:mod:`vitkern.ops.ln_linear`: ``y, mean, rstd``; :mod:`vitkern.ops.ln_mlp`: ``y, pre, h,
mean, rstd`` with ``pre``/``h`` the fc1 output before/after GELU when saving for backward;
:mod:`vitkern.ops.linear_residual`: ``y``), so the backward — which these backends reject with a reason — runs on
the next backend in order (Triton on a GPU) from those tensors (linear_residual's backward needs only the inputs).

The op files orchestrate their Triton/reference backends through GEMM primitives (``stats``, ``linear``) that a
cuBLASLt pipeline does not map onto (cuBLASLt has no LayerNorm prologue; statistics and the normalised input come out
of one LayerNorm pass here), so they call a backend's ``fused_forward`` when it has one
(``vitkern.ops.ln_linear.BACKEND_FUSED_FORWARD``).

Ranked after Triton until GPU measurements are committed (see ``cuda_rank``). Needs the optional extension
``vitkern._C`` and a GPU it was compiled for; otherwise ``availability()`` says why.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitkern import dispatch, memory
from vitkern.backends.cuda_common import CudaBackend
from vitkern.ops import linear_residual as linear_residual_op
from vitkern.ops import ln_linear as ln_linear_op
from vitkern.ops import ln_mlp as ln_mlp_op
from vitkern.validation import dense_vector

__all__ = ["LinearResidualCuda", "LnLinearCuda", "LnMlpCuda"]

CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_MAX_D = 8192  # the LayerNorm kernel's widest row (csrc/ops/layer_norm.cuh kMaxWidth)
GELU_IMPLS = {"auto": 0, "epilogue": 1, "kernel": 2}  # csrc/ops/ln_mlp.cuh GeluImpl
LAYER_SCALE_IMPLS = {"auto": 0, "fold": 1, "kernel": 2}  # csrc/ops/ln_mlp.cuh ScaleImpl


def _rows(t: Tensor) -> Tensor:
    """[R, C] with unit column stride and non-overlapping rows (what the C++ op checks), copying only if needed."""
    return t if t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]) else t.contiguous()


class _GemmCudaBackend(CudaBackend):
    """The cuBLASLt ops' shared rule: every parameter in the input's dtype (the GEMMs and epilogues take one type)."""

    dtypes = CUDA_DTYPES  # ranked after Triton until measured: vitkern/backends/cuda_common.py

    def op_reasons(self, problem: dispatch.Problem) -> list[str]:
        return ln_linear_op.param_dtype_reasons(problem)


class _LnCudaBackend(_GemmCudaBackend):
    """The LayerNorm ops: also the LayerNorm kernel's limit on the input width."""

    def op_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = []
        _, d = problem.shape("x")
        if d > CUDA_MAX_D:
            reasons.append(f"input width {d} > {CUDA_MAX_D} (the LayerNorm kernel holds a row in registers)")
        return reasons + super().op_reasons(problem)


class LnLinearCuda(_LnCudaBackend):
    """LayerNorm kernel (fp32 statistics, LN(x) in x's dtype) + one cuBLASLt GEMM with the bias epilogue."""

    op_name = "ln_linear_fwd"

    def fused_forward(self, x, ln_weight, ln_bias, weight, bias, eps):
        """The op's forward: (y [M, N], mean [M], rstd [M])."""
        x, weight = _rows(x), _rows(weight)
        m, n = x.shape[0], weight.shape[0]
        y = memory.empty((m, n), x.dtype, x.device)
        mean = memory.empty((m,), torch.float32, x.device)
        rstd = memory.empty((m,), torch.float32, x.device)
        torch.ops.vitkern_C.ln_linear_fwd.out(x, dense_vector(ln_weight), dense_vector(ln_bias), weight, dense_vector(bias), float(eps),
                                              y=y, mean=mean, rstd=rstd)
        return y, mean, rstd


class LnMlpCuda(_LnCudaBackend):
    """LayerNorm kernel + cuBLASLt fc1 (GELU epilogue for tanh GELU, else bias epilogue + GELU kernel) + cuBLASLt fc2
    (bias epilogue, residual through beta·C, layer scale folded into fc2's rows or applied by a small kernel)."""

    op_name = "ln_mlp_fwd"
    # How fc1's GELU and the layer scale are computed (csrc/ops/ln_mlp.cu): "auto" until the GPU session has
    # measured the variants (benchmarks/bench_ln_mlp.py: vitkern-cuda-tanh-epilogue vs vitkern-cuda-tanh-kernel).
    gelu_impl = "auto"
    layer_scale_impl = "auto"

    def fused_forward(self, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps,
                      approximate, save_for_backward, *, gelu_impl: str | None = None,
                      layer_scale_impl: str | None = None):
        """The op's forward: (y [M, D], pre [M, H], h [M, H] (empty unless saving), mean [M], rstd [M])."""
        x, fc1_weight, fc2_weight = _rows(x), _rows(fc1_weight), _rows(fc2_weight)
        m, d, hidden = x.shape[0], x.shape[1], fc1_weight.shape[0]
        y = memory.empty((m, d), x.dtype, x.device)
        pre = memory.empty((m, hidden), x.dtype, x.device) if save_for_backward else None
        h = memory.empty((m, hidden), x.dtype, x.device) if save_for_backward else None
        mean = memory.empty((m,), torch.float32, x.device)
        rstd = memory.empty((m,), torch.float32, x.device)
        torch.ops.vitkern_C.ln_mlp_fwd.out(
            x, dense_vector(ln_weight), dense_vector(ln_bias), fc1_weight, dense_vector(fc1_bias), fc2_weight, dense_vector(fc2_bias),
            dense_vector(layer_scale), float(eps), approximate, GELU_IMPLS[gelu_impl or self.gelu_impl],
            LAYER_SCALE_IMPLS[layer_scale_impl or self.layer_scale_impl], y=y, pre=pre, h=h, mean=mean, rstd=rstd,
        )
        empty = x.new_empty(0)
        return y, (pre if pre is not None else empty), (h if h is not None else empty), mean, rstd


class LinearResidualCuda(_GemmCudaBackend):
    """One cuBLASLt GEMM (bias epilogue, residual through beta·C), layer scale folded into the weight's rows or
    applied by a small kernel: LayerNorm+MLP's fc2 step (same C++ function) on the attention's proj. No LayerNorm,
    so no width limit."""

    op_name = "linear_residual_fwd"
    # How the layer scale is applied (csrc/ops/ln_mlp.cu): "auto" (fold when M >= in_features) until the GPU session
    # has measured "fold" vs "kernel".
    layer_scale_impl = "auto"

    def fused_forward(self, x, weight, bias, residual, layer_scale, *, layer_scale_impl: str | None = None):
        """The op's forward: y [M, N] = residual + layer_scale · (x @ weightᵀ + bias)."""
        x, weight, residual = _rows(x), _rows(weight), _rows(residual)
        y = memory.empty((x.shape[0], weight.shape[0]), x.dtype, x.device)
        torch.ops.vitkern_C.linear_residual_fwd.out(
            x, weight, dense_vector(bias), residual, dense_vector(layer_scale),
            LAYER_SCALE_IMPLS[layer_scale_impl or self.layer_scale_impl], y=y,
        )
        return y


dispatch.register_backend(ln_linear_op.OP, LnLinearCuda())
dispatch.register_backend(ln_mlp_op.OP, LnMlpCuda())
dispatch.register_backend(linear_residual_op.OP, LinearResidualCuda())
