"""Linear + layer scale + residual benchmark: y = x + γ · (o @ Wᵀ + b), the end of a ViT block's attention half
(``x + ls1(attn.proj(o))``).

Shapes: bf16, M = 256·197 = 50,432 rows (ViT batch 256 at 224 px), widths 768 (ViT-B) and 1024 (ViT-L), square proj,
with a layer scale (DeiT-III / DINOv2; without one the eager baseline only loses the multiply); forward and
forward+backward. Providers, side by side on the same inputs:

- ``eager``: ``x + γ * F.linear(o, W, b)`` (what timm runs; the baseline);
- ``vitkern``: ``vitkern.functional.linear_residual`` with default dispatch (the chosen backend goes into the row);
- ``torch.compile``: the eager function under ``torch.compile`` (inductor fuses the multiply and add after cuBLAS);
- ``cublas-gemm``: the GEMM alone, ``o @ Wᵀ`` (and its 2 backward GEMMs in fwd+bwd): the ceiling. Its own baseline
  (it computes something else, so it is not checked);
- ``vitkern-cuda``: the CUDA C++ forward (cuBLASLt GEMM, bias epilogue, residual through beta·C, γ folded into W's
  rows or applied by a small kernel), called through the backend's ``fused_forward``; fwd+bwd adds the op's own
  backward (Triton). Compared with ``vitkern`` (Triton) to decide the backend ranking; skipped with the reason
  where vitkern._C cannot run.

FLOPs are the GEMM's (fwd 2·M·K·N, fwd+bwd 6·M·K·N) for every provider; bytes are the fused forward's minimum (read
o, x, W; write y). Eager moves M·K + 6·M·N elements (GEMM output written, scaled in a second pass, added in a third),
the fused op M·K + 2·M·N: 3/7 of eager's bytes at K = N. Targets (printed, not asserted): vitkern ≥ 1.3× eager
forward and ≥ 75% of the cuBLAS GEMM's TFLOP/s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.bench.harness import (
    CPU_TIMER, FWD, FWD_BWD, Benchmark, Case, Context, Provider, Row, Work, compile_fresh, cuda_vs_triton_targets,
    gemm_share_target, run_benchmark, speedup_target, timed_cases, vitkern_backend_unavailable,
)

NAME = "linear_residual"
OP = "linear_residual"
M = 256 * 197
WIDTHS = (768, 1024)
TARGET_EAGER, TARGET_GEMM_PCT = 1.3, 75.0
_ARGS = ("o", "w", "b", "x", "ls")


def _vitkern() -> Any:
    import vitkern
    import vitkern.functional  # noqa: F401

    return vitkern


def make_inputs(case: Case, device: torch.device) -> dict[str, Tensor]:
    m, d = case.params["M"], case.params["D"]
    grad = case.direction == FWD_BWD
    kw: dict[str, Any] = dict(device=device, dtype=case.dtype)
    return {  # random, never zeros; W scaled as after init so the output stays O(1)
        "o": torch.randn(m, d, **kw).requires_grad_(grad),
        "w": (torch.randn(d, d, **kw) * d**-0.5).requires_grad_(grad),
        "b": (0.1 * torch.randn(d, **kw)).requires_grad_(grad),
        "x": torch.randn(m, d, **kw).requires_grad_(grad),
        "ls": (0.1 + 0.01 * torch.randn(d, **kw)).requires_grad_(grad),
    }


def model(case: Case, provider: Provider) -> Work:
    m, d = case.params["M"], case.params["D"]
    gemm = 2.0 * m * d * d
    itemsize = torch.empty(0, dtype=case.dtype).element_size()
    fwd_bytes = (3 * m * d + d * d) * itemsize  # read o, x, W; write y
    return Work(flops=(1 if case.direction == FWD else 3) * gemm, bytes=fwd_bytes if case.direction == FWD else None)


def eager_proj_residual(o, w, b, x, ls):
    return x + ls * F.linear(o, w, b)


def _eager(case: Case, inp: Any):
    args = [inp[k] for k in _ARGS]
    return lambda: eager_proj_residual(*args)


def _compiled(case: Case, inp: Any):
    args, fn = [inp[k] for k in _ARGS], compile_fresh(eager_proj_residual)
    return lambda: fn(*args)


def _vk(case: Case, inp: Any):
    o, w, b, x, ls = (inp[k] for k in _ARGS)
    linear_residual = _vitkern().functional.linear_residual
    return lambda: linear_residual(o, w, b, x, ls)


def _gemm(case: Case, inp: Any):
    grad = case.direction == FWD_BWD
    o = inp["o"].detach().clone().requires_grad_(grad)
    w = inp["w"].detach().clone().requires_grad_(grad)
    return lambda: o @ w.t()


class _CudaLinearResidual(torch.autograd.Function):
    """Forward: the CUDA backend's ``fused_forward`` (called directly, as bench_ln_mlp does: use_backend would not
    reach the backward the harness runs later); backward: the op's own (vitkern::linear_residual_bwd, default
    dispatch: Triton), which is what autograd runs after a CUDA forward."""

    @staticmethod
    def forward(ctx, o, w, b, x, ls):
        ctx.save_for_backward(o, w, b, ls)
        return _vitkern().dispatch.backends(OP)["cuda"].fused_forward(o, w, b, x, ls)

    @staticmethod
    def backward(ctx, dy):
        o, w, b, ls = ctx.saved_tensors
        do, dw, db, dls = torch.ops.vitkern.linear_residual_bwd(dy.contiguous(), o, w, b, ls)
        return do, dw, db, dy, dls


def _vk_cuda(case: Case, inp: Any):
    args = [inp[k] for k in _ARGS]
    return lambda: _CudaLinearResidual.apply(*args)


def _describe(case: Case, inp: Any) -> dict[str, Any]:
    choice = _vitkern().explain(OP, *(inp[k] for k in _ARGS))
    return {"backend": str(choice.backend_name), "explain": str(choice)}


PROVIDERS = [
    Provider("eager", _eager),
    Provider("vitkern", _vk, describe=_describe),
    Provider("cublas-gemm", _gemm, baseline="cublas-gemm"),
    Provider("vitkern-cuda", _vk_cuda, describe=lambda case, inp: {"backend": "cuda"},
             supports=vitkern_backend_unavailable(OP)),
    Provider("torch.compile", _compiled, smoke=False),
]


def cases(ctx: Context) -> list[Case]:
    if ctx.smoke:  # tiny shapes: exercises the code path on CPU in about a second
        return [Case({"M": 64, "D": 32}, dt, d) for dt in (torch.bfloat16, torch.float32) for d in (FWD, FWD_BWD)]
    return [Case({"M": M, "D": d}, torch.bfloat16, direction) for direction in (FWD, FWD_BWD) for d in WIDTHS]


def run(ctx: Context) -> list[Row]:
    return run_benchmark(ctx, Benchmark(NAME, cases(ctx), PROVIDERS, make_inputs, baseline="eager", model=model))


def targets(rows: list[Row]) -> list[str]:
    """One line per (width, direction): MET / NOT MET / not measured. Printed in the summary, never asserted."""
    if any(r.timer == CPU_TIMER for r in rows):
        return ["targets (vitkern linear_residual bf16): not evaluated in CPU smoke mode"]
    out: list[str] = []
    for what, direction, _d, sel, vk in timed_cases(rows, "vitkern linear_residual", WIDTHS, out):
        if direction == FWD:
            out.append(speedup_target(what, TARGET_EAGER, "eager", sel.get("eager"), vk)
                       or f"target {what} >= {TARGET_EAGER}x eager: n/a")
        out.append(gemm_share_target(what, vk, sel.get("cublas-gemm"), TARGET_GEMM_PCT))
    return out + cuda_vs_triton_targets(rows)
