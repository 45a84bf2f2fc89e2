"""Linear + layer scale + residual (a block's ``x + ls1(attn.proj(o))``): parity against timm's own modules (an
nn.Linear proj and timm's LayerScale) run in float64 with the same weights, forward and the gradients of the input,
the residual and every parameter.

Tolerance: vitkern.testing's rule, err <= 2 x (the timm modules' error in the same dtype) + atol(dtype) x scale,
both measured against the timm modules in float64 on the same inputs (see vitkern/testing/numerics.py). timm rounds
the proj output, the scaled output and the sum to the dtype; the fused epilogue rounds once, so its error is below
PyTorch's and the rule holds with room.
"""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import nn

import vitkern
from vitkern.functional.linear_residual import linear_residual
from vitkern.testing import (
    Tolerance, check_compile_and_cuda_graph, check_forward_backward, poison_outputs, randn, run_every_triton_config,
    run_in_gpu_geometry, seed_for,
)

OP = "linear_residual"
FP32, FP16 = torch.float32, torch.float16


class TimmProjResidual(nn.Module):
    """timm's attention-side residual: x + ls1(attn.proj(o)) (proj_drop and drop_path 0)."""

    def __init__(self, k, n, bias=True, layer_scale=True):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias)
        self.ls1 = LayerScale(n, init_values=0.1) if layer_scale else nn.Identity()

    def forward(self, o, x):
        return x + self.ls1(self.proj(o))


def run_parity(rows, k, n, dtype, device, bias=True, layer_scale=True, grads=True, backend="triton", autocast=None,
               gamma=None, loss_scale=1.0, grad_tol=None):
    """``autocast``: run both under ``torch.autocast(device, autocast)`` (the fp64 reference run is left alone).
    ``gamma``: the layer scale's magnitude (default: random, O(0.5)); ``loss_scale``: the outputs are multiplied by it
    in fp32, so the gradient reaching the op is scaled as GradScaler scales it."""
    seed = seed_for(OP, rows, k, n, dtype, bias, layer_scale, grads, backend, autocast, gamma, loss_scale)
    theirs = TimmProjResidual(k, n, bias, layer_scale).to(device)
    inputs = {"o": randn((rows, k), dtype=dtype, device=device, seed=seed),
              "x": randn((rows, n), dtype=dtype, device=device, seed=seed + 1),
              "proj.weight": randn((n, k), dtype=dtype, device=device, seed=seed + 2, scale=k ** -0.5)}
    if bias:
        inputs["proj.bias"] = randn((n,), dtype=dtype, device=device, seed=seed + 3, scale=0.5)
    if layer_scale:
        inputs["ls1.gamma"] = (randn((n,), dtype=dtype, device=device, seed=seed + 4, scale=0.5) if gamma is None else
                               randn((n,), dtype=dtype, device=device, seed=seed + 4, mean=gamma, scale=0.1 * gamma))

    def amp():
        return torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None)

    def kernel(o, x, **p):
        with amp():
            return linear_residual(o, p["proj.weight"], p.get("proj.bias"), x, p.get("ls1.gamma")).float() * loss_scale

    def reference(o, x, **p):
        with amp():
            return torch.func.functional_call(theirs, p, (o, x)).float() * loss_scale

    with vitkern.use_backend(backend, op=OP):
        names = list(inputs) if grads is True else list(grads or [])  # or the names of the gradients to check
        return check_forward_backward(kernel, reference, inputs, names, seed=seed, grad_tol=grad_tol)


# ------------------------------------------------------------------------------------------------ CPU interpreter
CASES = [  # rows, in_features, out_features, dtype, bias, layer scale, gradients
    (1, 192, 192, FP32, True, True, True),
    (5, 192, 192, FP16, True, False, True),
    (5, 200, 200, FP32, False, True, True),  # not a multiple of 16: partial N and K tiles
    (50, 96, 160, FP16, True, True, True),  # K != N (a rectangular proj)
    (394, 192, 192, FP16, True, True, True),  # ViT-Ti at 2 x 197 tokens
    (5, 384, 384, FP32, True, True, True),
    (5, 768, 768, FP16, True, False, False),  # ViT-B width, forward only (interpreter GEMMs are slow)
    (50, 96, 160, torch.bfloat16, True, True, True),  # bf16 (vitkern.testing.interpreter_bf16 makes it exact)
]


@pytest.mark.interpreter
@pytest.mark.parametrize("rows, k, n, dtype, bias, layer_scale, grads", CASES,
                         ids=[f"{r}x{k}-{n}-{str(t)[6:]}-{'b' if b else 'nob'}-{'ls' if s else 'nols'}"
                              f"-{'grad' if g else 'fwd'}" for r, k, n, t, b, s, g in CASES])
def test_interpreter_vs_timm(rows, k, n, dtype, bias, layer_scale, grads):
    run_parity(rows, k, n, dtype, "cpu", bias, layer_scale, grads)


@pytest.mark.parametrize("backend, rows, bias, layer_scale, amp", [
    pytest.param("triton", 5, True, True, FP16, marks=pytest.mark.interpreter),
    pytest.param("triton", 50, False, True, torch.bfloat16, marks=pytest.mark.interpreter),
    ("reference", 197, True, True, FP16)])
def test_autocast_keeps_the_fp32_residual_stream_as_timm_does(backend, rows, bias, layer_scale, amp):
    """fp32 residual under fp16 / bf16 autocast: the GEMM in 16 bits, the sum returned in fp32 as timm's
    x + ls1(proj(o)) promotes it; forward and every gradient."""
    run_parity(rows, 96, 160, FP32, "cpu", bias, layer_scale, backend=backend, autocast=amp)
    o, x, w = torch.randn(3, 96), torch.randn(3, 160), torch.randn(160, 96)
    with torch.autocast("cpu", dtype=amp), vitkern.use_backend(backend, op=OP):
        assert linear_residual(o, w, None, x).dtype == FP32
        assert linear_residual(o, w, None, x.to(amp)).dtype == amp  # a 16-bit stream stays 16-bit


@pytest.mark.interpreter
def test_interpreter_batched_and_strided_inputs():
    """[B, N, C] inputs, o a column-sliced view and x a transposed (non-contiguous) view: gradients reach the leaves."""
    k, n, seed = 64, 48, seed_for(OP, "strided")
    inputs = {"o": randn((2, 7, 2 * k), dtype=FP32, device="cpu", seed=seed),
              "x": randn((2, n, 7), dtype=FP32, device="cpu", seed=seed + 1),
              "w": randn((n, k), dtype=FP32, device="cpu", seed=seed + 2, scale=k ** -0.5),
              "b": randn((n,), dtype=FP32, device="cpu", seed=seed + 3),
              "ls": randn((n,), dtype=FP32, device="cpu", seed=seed + 4)}

    def kernel(o, x, w, b, ls):
        return linear_residual(o[..., 1::2], w, b, x.transpose(1, 2), ls)

    def reference(o, x, w, b, ls):
        return x.transpose(1, 2) + ls * F.linear(o[..., 1::2], w, b)

    with vitkern.use_backend("triton", op=OP):
        check_forward_backward(kernel, reference, inputs, list(inputs), seed=seed)


@pytest.mark.interpreter
def test_interpreter_residual_only_gradient_and_no_activations_kept():
    """Only the residual needs a gradient (frozen proj, e.g. fine-tuning other layers): it is dy itself, no GEMM."""
    seed = seed_for(OP, "residual-only")
    o = randn((9, 32), dtype=FP32, device="cpu", seed=seed)
    w, b = randn((32, 32), dtype=FP32, device="cpu", seed=seed + 1), randn((32,), dtype=FP32, device="cpu", seed=seed + 2)
    x = randn((9, 32), dtype=FP32, device="cpu", seed=seed + 3).requires_grad_()
    dy = randn((9, 32), dtype=FP32, device="cpu", seed=seed + 4)
    with vitkern.use_backend("triton", op=OP), poison_outputs():
        y = linear_residual(o, w, b, x)
        (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy, atol=0, rtol=0)
    torch.testing.assert_close(y, x + F.linear(o, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
def test_interpreter_gradients_are_deterministic():
    m = TimmProjResidual(64, 64)
    seed = seed_for(OP, "det")
    o = randn((37, 64), dtype=FP32, device="cpu", seed=seed).requires_grad_()
    x = randn((37, 64), dtype=FP32, device="cpu", seed=seed + 1).requires_grad_()
    with vitkern.use_backend("triton", op=OP):
        runs = [torch.autograd.grad(linear_residual(o, m.proj.weight, m.proj.bias, x, m.ls1.gamma).square().sum(),
                                    [o, x, *m.parameters()]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_reference_backend_vs_timm(dtype):
    run_parity(197, 192, 192, dtype, "cpu", backend="reference")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("gamma", [1e-6, 1e-5])
def test_fp16_small_layer_scale_keeps_the_input_gradient(backend, gamma):
    """fp16 with a layer scale at its init size (DeiT III / CaiT: 1e-6, 1e-5) and a loss-scaled gradient: folding γ
    into W's rows underflowed in fp16 (γ·W ~ 1e-8, below the smallest subnormal) and lost most of do at γ = 1e-6;
    scaling dy instead, as timm's unfused graph does, keeps its error. do is O(1e-2): the bound is 2 x torch's own
    fp16 error + 1e-4 (fp16's default atol of 4e-3 would swamp it). Only do: at this loss scale dγ overflows fp16
    in timm's graph too (GradScaler would skip the step), and the weight gradients never held γ·W."""
    run_parity(50, 192, 192, FP16, "cpu", gamma=gamma, loss_scale=4096.0, backend=backend, grads=["o"],
               grad_tol=Tolerance(k=2.0, atol=1e-4))


# ----------------------------------------------------------------------------------------------- GPU
VIT_WIDTHS = [384, 768, 1024, 1280]  # ViT-S/B/L/H
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 394, 64 * 197, 16 * 577])
@pytest.mark.parametrize("dim", VIT_WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
def test_triton_gpu_vs_timm(dtype, dim, rows):
    run_parity(rows, dim, dim, dtype, "cuda", bias=dim != 1280, layer_scale=rows % 2 == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [394, 64 * 197])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_gpu_autocast_vs_timm(amp, rows):
    """fp32 residual under CUDA autocast: 16-bit GEMM, fp32 sum; against timm's modules under the same autocast."""
    run_parity(rows, 768, 768, FP32, "cuda", backend="triton", autocast=amp)


@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiles every autotune config: over the suite's 120 s per test on a cold cache
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])  # tiling differs per config, not per dtype
def test_triton_gpu_every_config(dtype):
    """Every GEMM tile config of the residual-epilogue GEMM and of the backward's dx GEMM, at M = 2·197."""
    run_every_triton_config(lambda: run_parity(2 * 197, 384, 384, dtype, "cuda"))


@pytest.mark.interpreter
def test_interpreter_gpu_geometry_every_config():
    """Every GEMM tile config of the residual-epilogue GEMM and the backward's dx GEMM, in the interpreter with the
    GPU path's tiles (vitkern.testing.gpu_geometry): parity, bounds and races of what test_triton_gpu_every_config
    runs, before a GPU does. M=150, N=320: partial last tiles at 64, 128 and 256."""
    run_in_gpu_geometry(lambda: run_parity(150, 192, 320, torch.float32, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
def test_triton_gpu_large_batch(dtype):
    run_parity(256 * 197, 768, 768, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_gpu_fuzz():
    g = torch.Generator().manual_seed(2468)
    for _ in range(30):
        rows = int(torch.randint(1, 6000, (1,), generator=g))
        k, n = (int(torch.randint(8, 1600, (1,), generator=g)) for _ in range(2))
        dtype = GPU_DTYPES[int(torch.randint(0, 3, (1,), generator=g))]
        bias, ls = (bool(torch.randint(0, 2, (1,), generator=g)) for _ in range(2))
        run_parity(rows, k, n, dtype, "cuda", bias, ls)


@pytest.mark.gpu
def test_gpu_dispatch_compile_and_cuda_graph():
    class ProjResidual(TimmProjResidual):
        def forward(self, x):  # the block's shape: x + ls1(proj(o)) with o and the residual both [M, 768]
            return linear_residual(x, self.proj.weight, self.proj.bias, x, self.ls1.gamma)

    m = ProjResidual(768, 768).to("cuda", torch.bfloat16)
    x = torch.randn(394, 768, device="cuda", dtype=torch.bfloat16)
    assert vitkern.explain(OP, x, m.proj.weight, m.proj.bias, x, m.ls1.gamma).backend_name in ("triton", "cuda")
    check_compile_and_cuda_graph(m, x)


# ----------------------------------------------------------------------------------------------- dispatch, errors
def _args(k=16, n=12, dtype=torch.float32, **over):
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, k, generator=g, dtype=dtype), "weight": torch.randn(n, k, generator=g, dtype=dtype),
         "bias": torch.randn(n, generator=g, dtype=dtype), "residual": torch.randn(3, n, generator=g, dtype=dtype),
         "layer_scale": torch.randn(n, generator=g, dtype=dtype)}
    a.update(over)
    return a


def test_cpu_default_is_reference_and_fp64_falls_back_with_reason():
    choice = vitkern.explain(linear_residual, **_args())
    assert choice.backend_name == "reference" and "triton" in str(choice)
    with vitkern.use_backend("triton", op=OP), pytest.raises(vitkern.BackendError, match="dtype"):
        linear_residual(**_args(dtype=torch.float64))
    # no LayerNorm here: the LN ops' single-tile statistics limit on the width does not apply
    wide = _args(k=9000, n=4)
    assert not vitkern.explain(OP, *wide.values()).rejected.get("triton")


@pytest.mark.parametrize(
    "over, error, match",
    [
        ({"x": torch.arange(48).view(3, 16)}, TypeError, "x has dtype torch.int64"),
        ({"x": torch.randn(3, 0)}, ValueError, "last dim"),
        ({"weight": torch.randn(12, 15)}, ValueError, r"weight has shape \(12, 15\); expected \[out_features, 16\]"),
        # fp32 x over fp16/bf16 weights is mixed precision (allowed); over fp64 weights it is not
        ({"weight": torch.randn(12, 16, dtype=torch.float64)}, TypeError,
         "x has dtype torch.float32; expected the weights' dtype torch.float64"),
        ({"bias": torch.randn(12, dtype=torch.float64)}, TypeError,
         "bias has dtype torch.float64; expected x's dtype torch.float32, the weights' torch.float32 or"),
        ({"bias": torch.randn(11)}, ValueError, "bias has shape"),
        ({"residual": torch.randn(3, 11)}, ValueError, "residual has shape"),
        ({"residual": torch.randn(4, 12)}, ValueError, "residual has shape"),
        ({"residual": None}, TypeError, "residual must be a torch.Tensor"),
        ({"layer_scale": torch.randn(12, device="meta")}, ValueError, "layer_scale is on meta"),
    ],
)
def test_bad_input_errors_name_the_argument(over, error, match):
    with pytest.raises(error, match=match):
        linear_residual(**_args(**over))


def test_custom_ops_pass_opcheck():
    a = {k: v.requires_grad_() for k, v in _args().items()}
    torch.library.opcheck(torch.ops.vitkern.linear_residual_fwd.default, tuple(a.values()))
    with torch.no_grad():
        y = torch.ops.vitkern.linear_residual_fwd(*a.values())
    d = {k: v.detach() for k, v in a.items()}
    torch.library.opcheck(torch.ops.vitkern.linear_residual_bwd.default,
                          (torch.randn_like(y), d["x"], d["weight"], d["bias"], d["layer_scale"]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_torch_compile_fullgraph_no_graph_breaks(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = TimmProjResidual(32, 32)

    def f(o, x):
        return linear_residual(o, m.proj.weight, m.proj.bias, x, m.ls1.gamma)

    o, x = torch.randn(2, 3, 32, requires_grad=True), torch.randn(2, 3, 32, requires_grad=True)
    with vitkern.use_backend(backend, op=OP):
        eager = f(o, x)
        g_eager = torch.autograd.grad(eager.sum(), [o, x, m.proj.weight, m.ls1.gamma])
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(o, x)
        g = torch.autograd.grad(out.sum(), [o, x, m.proj.weight, m.ls1.gamma])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)
