"""LayerNorm+MLP benchmark: y = x + fc2(GELU(fc1(LN(x)))), the second half of a ViT block.

Shapes: bf16, M = 256·197 = 50,432 rows (ViT batch 256 at 224 px), widths 768 (ViT-B) and 1024 (ViT-L), MLP ratio 4;
forward and forward+backward. Providers, side by side on the same inputs:

- ``eager``: ``x + F.linear(F.gelu(F.linear(F.layer_norm(x), W1, b1)), W2, b2)`` (nn.LayerNorm + Linear + GELU +
  Linear + add; the baseline);
- ``vitkern``: ``vitkern.functional.ln_mlp`` with default dispatch (the chosen backend goes into the row);
- ``torch.compile-max-autotune``: the eager function under ``torch.compile(mode="max-autotune")``, width 768 only
  (its compile takes minutes);
- ``cublas-gemms``: the two GEMMs alone, ``xn @ W1ᵀ`` and ``h @ W2ᵀ`` on precomputed inputs (and their 4 backward
  GEMMs in fwd+bwd): the ceiling. Its own baseline (it computes something else, so it is not checked).
- ``vitkern-cuda``: the CUDA C++ forward (csrc/ops/ln_mlp.cu: LayerNorm kernel + cuBLASLt GEMMs with epilogues;
  erf GELU: bias epilogue + GELU kernel), called through the backend's whole-op ``fused_forward``; fwd+bwd adds the
  op's own backward (Triton). Compared with ``vitkern`` (Triton) to decide the backend ranking
  (vitkern/ops/ln_mlp_cuda.py); skipped with the reason where vitkern._C cannot run.
- ``eager-tanh``, ``vitkern-cuda-tanh-epilogue``, ``vitkern-cuda-tanh-kernel``: the same with the tanh GELU (the only
  one cuBLASLt's GELU epilogue computes): cuBLASLt's GELU(+aux) epilogue vs the bias epilogue + a separate GELU
  kernel, to keep the faster as the CUDA backend's ``gelu_impl="auto"`` choice (issue 8).

FLOPs are the GEMMs' (fwd 4·M·D·H, fwd+bwd 12·M·D·H) for every provider, so TFLOP/s compare directly.
Targets (printed, not asserted), per width and direction: vitkern ≥ 1.2× eager, ≥ 1.05× compile max-autotune (768),
and ≥ 75% of the cuBLAS GEMMs' TFLOP/s measured in the same run (vitkern's time includes its LN pre-pass and
epilogues, so this bounds its GEMM efficiency from below).
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

NAME = "ln_mlp"
M = 256 * 197
WIDTHS = (768, 1024)
RATIO = 4
EPS = 1e-6  # timm's ViT LayerNorm eps
COMPILE_WIDTH = 768
TARGET_EAGER, TARGET_COMPILE, TARGET_GEMM_PCT = 1.2, 1.05, 75.0


def _vitkern() -> Any:
    import vitkern
    import vitkern.functional  # noqa: F401

    return vitkern


def make_inputs(case: Case, device: torch.device) -> dict[str, Tensor]:
    m, d = case.params["M"], case.params["D"]
    h = RATIO * d
    grad = case.direction == FWD_BWD
    kw: dict[str, Any] = dict(device=device, dtype=case.dtype)
    return {  # random, never zeros; weights scaled as after init so activations stay O(1)
        "x": torch.randn(m, d, **kw).requires_grad_(grad),
        "ln_w": (1 + 0.1 * torch.randn(d, **kw)).requires_grad_(grad),
        "ln_b": (0.1 * torch.randn(d, **kw)).requires_grad_(grad),
        "w1": (torch.randn(h, d, **kw) * d**-0.5).requires_grad_(grad),
        "b1": (0.1 * torch.randn(h, **kw)).requires_grad_(grad),
        "w2": (torch.randn(d, h, **kw) * h**-0.5).requires_grad_(grad),
        "b2": (0.1 * torch.randn(d, **kw)).requires_grad_(grad),
    }


def model(case: Case, provider: Provider) -> Work:
    m, d = case.params["M"], case.params["D"]
    gemm = 2.0 * m * d * RATIO * d  # one of the two GEMMs
    return Work(flops=(2 if case.direction == FWD else 6) * gemm)


def eager_mlp(x, ln_w, ln_b, w1, b1, w2, b2):
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], ln_w, ln_b, EPS), w1, b1)), w2, b2)


_ARGS = ("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2")


def _eager(case: Case, inp: Any):
    args = [inp[k] for k in _ARGS]
    return lambda: eager_mlp(*args)


def _compiled(case: Case, inp: Any):
    args, fn = [inp[k] for k in _ARGS], compile_fresh(eager_mlp, mode="max-autotune")
    return lambda: fn(*args)


def _vk(case: Case, inp: Any):
    x, ln_w, ln_b, w1, b1, w2, b2 = (inp[k] for k in _ARGS)
    ln_mlp = _vitkern().functional.ln_mlp
    return lambda: ln_mlp(x, ln_w, ln_b, w1, b1, w2, b2, None, EPS)


def _gemms(case: Case, inp: Any):
    """The two GEMMs on their own operands (LN output and GELU output precomputed once, off the clock)."""
    grad = case.direction == FWD_BWD
    with torch.no_grad():
        xn = F.layer_norm(inp["x"], inp["x"].shape[-1:], inp["ln_w"], inp["ln_b"], EPS)
        h = F.gelu(xn @ inp["w1"].t())
    xn, h = xn.requires_grad_(grad), h.requires_grad_(grad)
    w1 = inp["w1"].detach().clone().requires_grad_(grad)
    w2 = inp["w2"].detach().clone().requires_grad_(grad)
    return lambda: (xn @ w1.t(), h @ w2.t())


def _eager_tanh(case: Case, inp: Any):
    x, ln_w, ln_b, w1, b1, w2, b2 = (inp[k] for k in _ARGS)
    return lambda: x + F.linear(F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], ln_w, ln_b, EPS), w1, b1),
                                       approximate="tanh"), w2, b2)


def _cuda_backend() -> Any:
    return _vitkern().dispatch.backends("ln_mlp")["cuda"]


class _CudaLnMlp(torch.autograd.Function):
    """Forward: the CUDA backend's whole-op forward (called directly: the op routes to it only once
    vitkern/ops/ln_mlp.py declares BACKEND_FUSED_FORWARD, and forcing by use_backend would not reach the backward the
    harness runs later); backward: the op's own backward (vitkern::ln_mlp_bwd, default dispatch: Triton) from the
    CUDA forward's pre/h/mean/rstd, which is what autograd runs after a CUDA forward."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, approximate: str, gelu_impl: str):
        save = any(ctx.needs_input_grad[:7])
        y, pre, h, mean, rstd = _cuda_backend().fused_forward(x, ln_w, ln_b, w1, b1, w2, b2, None, EPS, approximate,
                                                              save, gelu_impl=gelu_impl)
        ctx.approximate = approximate
        ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2, b2, pre, h, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, ln_w, ln_b, w1, b1, w2, b2, pre, h, mean, rstd = ctx.saved_tensors
        grads = torch.ops.vitkern.ln_mlp_bwd(dy.contiguous(), x, ln_w, ln_b, w1, b1, w2, b2, None, pre, h, mean, rstd,
                                             EPS, ctx.approximate)
        return (*grads[:7], None, None)


def _vk_cuda(approximate: str, gelu_impl: str):
    def setup(case: Case, inp: Any):
        args = [inp[k] for k in _ARGS]
        return lambda: _CudaLnMlp.apply(*args, approximate, gelu_impl)

    return setup


def _cuda_describe(gelu_impl: str):
    def describe(case: Case, inp: Any) -> dict[str, Any]:
        return {"backend": f"cuda (gelu_impl={gelu_impl})"}

    return describe


def _describe(case: Case, inp: Any) -> dict[str, Any]:
    choice = _vitkern().explain("ln_mlp", *(inp[k] for k in _ARGS), None, EPS)
    return {"backend": str(choice.backend_name), "explain": str(choice)}


def _compile_width_only(case: Case) -> str | None:
    return None if case.params["D"] == COMPILE_WIDTH else f"max-autotune compile at D={COMPILE_WIDTH} only (compile time)"


PROVIDERS = [
    Provider("eager", _eager),
    Provider("vitkern", _vk, describe=_describe),
    Provider("cublas-gemms", _gemms, baseline="cublas-gemms"),
    Provider("vitkern-cuda", _vk_cuda("none", "auto"), describe=_cuda_describe("auto"),
             supports=vitkern_backend_unavailable("ln_mlp")),
    Provider("eager-tanh", _eager_tanh, baseline="eager-tanh"),
    Provider("vitkern-cuda-tanh-epilogue", _vk_cuda("tanh", "epilogue"), baseline="eager-tanh",
             describe=_cuda_describe("epilogue"), supports=vitkern_backend_unavailable("ln_mlp")),
    Provider("vitkern-cuda-tanh-kernel", _vk_cuda("tanh", "kernel"), baseline="eager-tanh",
             describe=_cuda_describe("kernel"), supports=vitkern_backend_unavailable("ln_mlp")),
    # last, and only at one width: its compile is the slow part of this bench
    Provider("torch.compile-max-autotune", _compiled, supports=_compile_width_only, smoke=False),
]


def cases(ctx: Context) -> list[Case]:
    if ctx.smoke:  # tiny shapes: exercises the code path on CPU in about a second
        return [Case({"M": 64, "D": 32}, dt, d) for dt in (torch.bfloat16, torch.float32) for d in (FWD, FWD_BWD)]
    # the compiled width's fwd+bwd (the longest max-autotune compile) last, so a short budget loses the least
    order = [(COMPILE_WIDTH, FWD), (1024, FWD), (1024, FWD_BWD), (COMPILE_WIDTH, FWD_BWD)]
    return [Case({"M": M, "D": d}, torch.bfloat16, direction) for d, direction in order]


def run(ctx: Context) -> list[Row]:
    return run_benchmark(ctx, Benchmark(NAME, cases(ctx), PROVIDERS, make_inputs, baseline="eager", model=model))


def targets(rows: list[Row]) -> list[str]:
    """One line per (width, direction): MET / NOT MET / not measured. Printed in the summary, never asserted."""
    if any(r.timer == CPU_TIMER for r in rows):
        return ["targets (vitkern ln_mlp bf16): not evaluated in CPU smoke mode"]
    out: list[str] = []
    for what, _direction, d, sel, vk in timed_cases(rows, "vitkern ln_mlp", WIDTHS, out):
        for name, goal in (("eager", TARGET_EAGER), ("torch.compile-max-autotune", TARGET_COMPILE)):
            line = speedup_target(what, goal, name, sel.get(name), vk)
            if line is None and (name == "eager" or d == COMPILE_WIDTH):
                other = sel.get(name)
                line = f"target {what} >= {goal}x {name}: n/a ({other.status if other else 'no row'})"
            out += [line] if line else []
        out.append(gemm_share_target(what, vk, sel.get("cublas-gemms"), TARGET_GEMM_PCT))
    return out + cuda_vs_triton_targets(rows)  # issue 8's bar for the CUDA C++ forward
