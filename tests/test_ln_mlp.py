"""LayerNorm+MLP and LayerNorm+Linear: parity against timm's own modules (norm2 + mlp + ls2, norm1 + attn.qkv) run in
float64 with the same weights, forward and the gradients of x and every parameter.

Tolerance: vitkern.testing's rule, err <= 2 x (the timm modules' error in the same dtype) + atol(dtype) x scale,
both measured against the timm modules in float64 on the same inputs (see vitkern/testing/numerics.py).
Interpreter GEMMs are slow: full gradients at widths 192/384 (and an odd hidden size), forward-only at 768, 394 rows
for a few cases only.
"""

import functools

import pytest
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import vitkern
from vitkern.functional.ln_mlp import ln_linear, ln_mlp
from vitkern.testing import (
    Tolerance, check_compile_and_cuda_graph, check_forward_backward, poison_outputs, randn, run_every_triton_config,
    run_in_gpu_geometry, seed_for,
)

# ------------------------------------------------------------------------------------------------ timm harness


class TimmMlpHalf(nn.Module):
    """The second half of a timm Block: x + ls2(mlp(norm2(x))) (drop_path 0)."""

    def __init__(self, block):
        super().__init__()
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2

    def forward(self, x):
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmQkv(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.norm1, self.attn = block.norm1, block.attn

    def forward(self, x):
        return self.attn.qkv(self.norm1(x))


def timm_block(dim, hidden, layer_scale, approximate="none", qkv_bias=True):
    act = functools.partial(nn.GELU, approximate=approximate)
    return timm_vit.Block(dim, num_heads=max(1, dim // 64), mlp_ratio=hidden / dim, qkv_bias=qkv_bias, act_layer=act,
                          init_values=0.1 if layer_scale else None)


def random_params(module, dtype, device, seed):
    """Fresh random values for every parameter (timm's init would make some of them constant)."""
    out = {}
    for i, (name, p) in enumerate(module.named_parameters()):
        if name.endswith("weight") and p.dim() == 2:  # Linear: keep activations O(1)
            out[name] = randn(p.shape, dtype=dtype, device=device, seed=seed + i, scale=p.shape[1] ** -0.5)
        elif "norm" in name and name.endswith("weight"):
            out[name] = randn(p.shape, dtype=dtype, device=device, seed=seed + i, mean=1.0, scale=0.5)
        else:
            out[name] = randn(p.shape, dtype=dtype, device=device, seed=seed + i, scale=0.5)
    return out


def _mine(module, timm_key):
    back = {v: k for k, v in module.TIMM_KEYS.items()}
    for prefix, mine in back.items():
        if timm_key.startswith(prefix + "."):
            return mine + timm_key[len(prefix):]
    raise KeyError(timm_key)


def _parity(op, mine, theirs, inputs, grads, backend, seed, autocast=None, loss_scale=1.0, grad_tol=None):
    """vitkern module ``mine`` vs timm module ``theirs``, both run with the timm-keyed parameters in ``inputs``
    (both under ``torch.autocast(autocast)`` when given: fp64, the reference run, is left alone by autocast).
    ``grads``: True (every input), False, or the names to check; ``loss_scale`` multiplies the outputs in fp32, so
    the gradient reaching the op is scaled as GradScaler scales it."""
    device = inputs["x"].device.type

    def amp():
        return torch.autocast(device, dtype=autocast, enabled=autocast is not None)

    def kernel(x, **p):
        with amp():
            return functional_call(mine, {_mine(mine, k): v for k, v in p.items()}, (x,)).float() * loss_scale

    def reference(x, **p):
        with amp():
            return functional_call(theirs, p, (x,)).float() * loss_scale

    names = list(inputs) if grads is True else list(grads or [])
    with vitkern.use_backend(backend, op=op):
        return check_forward_backward(kernel, reference, inputs, names, seed=seed, grad_tol=grad_tol)


def run_mlp_parity(rows, dim, hidden, dtype, device, layer_scale, approximate="none", grads=True, mean=0.0, backend="triton",
                   autocast=None, gamma=None, loss_scale=1.0, grad_tol=None):
    """``gamma``: the layer scale's magnitude (default: random like every parameter)."""
    seed = seed_for("ln_mlp", rows, dim, hidden, dtype, layer_scale, approximate, grads, mean, backend, autocast, gamma,
                    loss_scale)
    block = timm_block(dim, hidden, layer_scale, approximate).to(device)
    theirs = TimmMlpHalf(block)
    mine = vitkern.nn.LayerNormMlp.from_timm_block(block)
    inputs = {"x": randn((rows, dim), dtype=dtype, device=device, seed=seed, mean=mean)}
    inputs.update(random_params(theirs, dtype, device, seed + 100))
    if gamma is not None:
        inputs["ls2.gamma"] = randn((dim,), dtype=dtype, device=device, seed=seed + 99, mean=gamma, scale=0.1 * gamma)
    return _parity("ln_mlp", mine, theirs, inputs, grads, backend, seed, autocast, loss_scale, grad_tol)


def run_linear_parity(rows, dim, dtype, device, qkv_bias=True, grads=True, mean=0.0, backend="triton", autocast=None):
    seed = seed_for("ln_linear", rows, dim, dtype, qkv_bias, grads, mean, backend, autocast)
    block = timm_block(dim, 4 * dim, False, qkv_bias=qkv_bias).to(device)
    theirs = TimmQkv(block)
    mine = vitkern.nn.LayerNormLinear.from_timm_block(block)
    inputs = {"x": randn((rows, dim), dtype=dtype, device=device, seed=seed, mean=mean)}
    params = random_params(block, dtype, device, seed + 100)
    inputs.update({k: v for k, v in params.items() if k.startswith(("norm1.", "attn.qkv."))})

    return _parity("ln_linear", mine, theirs, inputs, grads, backend, seed, autocast)


# ------------------------------------------------------------------------------------------------ CPU interpreter
FP32, FP16 = torch.float32, torch.float16
MLP_CASES = [  # rows, dim, hidden, dtype, layer scale, GELU approximation, gradients
    (5, 192, 768, FP32, True, "none", True),
    (5, 192, 768, FP16, False, "tanh", True),
    (1, 192, 768, FP16, True, "none", True),
    (5, 192, 200, FP32, True, "tanh", True),  # hidden not a multiple of 16: partial N and K tiles
    (5, 192, 200, FP16, False, "none", True),
    (1, 384, 1536, FP32, False, "tanh", True),
    (5, 384, 1536, FP16, True, "none", True),
    (394, 192, 768, FP16, True, "none", True),
    (394, 192, 200, FP32, False, "tanh", True),
    (5, 768, 3072, FP32, True, "none", True),  # ViT-B width: gradients too
    (5, 768, 3072, FP16, False, "tanh", False),
    # bf16 (vitkern.testing.interpreter_bf16 makes the interpreter's bf16 exact)
    (5, 192, 200, torch.bfloat16, True, "tanh", True),
    (394, 192, 768, torch.bfloat16, False, "none", True),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("rows, dim, hidden, dtype, layer_scale, approximate, grads", MLP_CASES,
                         ids=[f"{r}x{d}-h{h}-{str(t)[6:]}-{'ls' if s else 'nols'}-{a}-{'grad' if g else 'fwd'}"
                              for r, d, h, t, s, a, g in MLP_CASES])
def test_ln_mlp_interpreter_vs_timm(rows, dim, hidden, dtype, layer_scale, approximate, grads):
    run_mlp_parity(rows, dim, hidden, dtype, "cpu", layer_scale, approximate, grads)


LINEAR_CASES = [(5, 192, FP32, True), (1, 192, FP16, False), (394, 192, FP16, True), (5, 384, FP32, True),
                (5, 768, FP16, True), (394, 192, torch.bfloat16, True)]


@pytest.mark.interpreter
@pytest.mark.parametrize("rows, dim, dtype, qkv_bias", LINEAR_CASES)
def test_ln_linear_interpreter_vs_timm(rows, dim, dtype, qkv_bias):
    run_linear_parity(rows, dim, dtype, "cpu", qkv_bias)


@pytest.mark.interpreter
def test_interpreter_large_mean_is_stable():
    """|mean|/std = 100. The LN prologue normalises each tile before the dot, so nothing cancels (a folded epilogue
    rstd·(x·W′ − μ·colsum W′) would subtract two numbers ~100x the result and fail this)."""
    run_mlp_parity(5, 192, 768, FP32, "cpu", True, "none", mean=100.0)
    run_linear_parity(5, 192, FP32, "cpu", mean=100.0)


@pytest.mark.interpreter
def test_interpreter_batched_and_strided_input():
    """3-D input and a column-sliced (non-contiguous) view: gradients still land on the leaf."""
    dim, hidden, seed = 64, 96, seed_for("ln_mlp-strided")
    big = randn((2, 3, 2 * dim), dtype=FP32, device="cpu", seed=seed)
    p = [randn(s, dtype=FP32, device="cpu", seed=seed + i, scale=0.3)
         for i, s in enumerate([(dim,), (dim,), (hidden, dim), (hidden,), (dim, hidden), (dim,), (dim,)], 1)]
    names = ["x", "ln_w", "ln_b", "w1", "b1", "w2", "b2", "ls"]
    inputs = dict(zip(names, [big] + p))

    def kernel(x, ln_w, ln_b, w1, b1, w2, b2, ls):
        return ln_mlp(x[..., ::2], ln_w, ln_b, w1, b1, w2, b2, ls), ln_linear(x[..., 1::2], ln_w, ln_b, w1, b1)

    def reference(x, ln_w, ln_b, w1, b1, w2, b2, ls):
        xs = x[..., ::2]
        mlp = xs + ls * F.linear(F.gelu(F.linear(F.layer_norm(xs, (dim,), ln_w, ln_b), w1, b1)), w2, b2)
        return mlp, F.linear(F.layer_norm(x[..., 1::2], (dim,), ln_w, ln_b), w1, b1)

    with vitkern.use_backend("triton", op="ln_mlp"), vitkern.use_backend("triton", op="ln_linear"):
        check_forward_backward(kernel, reference, inputs, names, seed=seed)


@pytest.mark.interpreter
def test_interpreter_optional_parameters_absent():
    """No LN affine, no biases, no layer scale (timm's qkv_bias=False, elementwise_affine=False norms)."""
    dim, hidden, seed = 48, 80, seed_for("ln_mlp-bare")
    inputs = {"x": randn((7, dim), dtype=FP16, device="cpu", seed=seed),
              "w1": randn((hidden, dim), dtype=FP16, device="cpu", seed=seed + 1, scale=dim ** -0.5),
              "w2": randn((dim, hidden), dtype=FP16, device="cpu", seed=seed + 2, scale=hidden ** -0.5)}

    def kernel(x, w1, w2):
        return ln_mlp(x, None, None, w1, None, w2, None), ln_linear(x, None, None, w1)

    def reference(x, w1, w2):
        xn = F.layer_norm(x, (dim,))
        return x + F.linear(F.gelu(F.linear(xn, w1)), w2), F.linear(xn, w1)

    with vitkern.use_backend("triton", op="ln_mlp"), vitkern.use_backend("triton", op="ln_linear"):
        check_forward_backward(kernel, reference, inputs, list(inputs), seed=seed)


@pytest.mark.interpreter
def test_interpreter_gradients_are_deterministic():
    torch.manual_seed(0)
    m = vitkern.nn.LayerNormMlp(64, 96, init_values=0.5)
    x = randn((37, 64), dtype=FP32, device="cpu", seed=seed_for("ln_mlp-det")).requires_grad_()
    with vitkern.use_backend("triton", op="ln_mlp"):
        runs = [torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.interpreter
def test_inference_keeps_no_activations_and_writes_every_output():
    x = randn((13, 64), dtype=FP16, device="cpu", seed=seed_for("ln_mlp-infer"))
    m = vitkern.nn.LayerNormMlp(64, 80, init_values=1.0, dtype=FP16)
    args = (m.norm.weight, m.norm.bias, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.ls.gamma)
    with vitkern.use_backend("triton", op="ln_mlp"), poison_outputs(), torch.no_grad():
        y, pre, h, mean, rstd = torch.ops.vitkern.ln_mlp_fwd(x, *args, 1e-6, "none", False)
        assert pre.numel() == 0 and h.numel() == 0
        assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(rstd).all()
        torch.testing.assert_close(m(x), y, atol=0, rtol=0)


# fp32 model under autocast: the GEMMs run in fp16 / bf16, the residual stream stays fp32:
# vitkern/functional/_autocast.py. Parity with timm's modules run under the same autocast, against fp64 (which
# autocast leaves alone): forward and every gradient.
AUTOCAST_CASES = [("triton", 5, 192, 768, True, FP16), ("triton", 394, 192, 200, False, torch.bfloat16),
                  ("reference", 197, 192, 768, True, FP16)]


@pytest.mark.parametrize("backend, rows, dim, hidden, layer_scale, amp", [
    pytest.param(*c, marks=[pytest.mark.interpreter] if c[0] == "triton" else []) for c in AUTOCAST_CASES])
def test_autocast_keeps_the_fp32_residual_stream_as_timm_does(backend, rows, dim, hidden, layer_scale, amp):
    run_mlp_parity(rows, dim, hidden, FP32, "cpu", layer_scale, backend=backend, autocast=amp)
    run_linear_parity(rows, dim, FP32, "cpu", backend=backend, autocast=amp)
    block = timm_block(dim, hidden, layer_scale)
    x = randn((3, dim), dtype=FP32, device="cpu", seed=1)
    with torch.autocast("cpu", dtype=amp), vitkern.use_backend(backend, op="ln_mlp"), \
            vitkern.use_backend(backend, op="ln_linear"):
        assert vitkern.nn.LayerNormMlp.from_timm_block(block)(x).dtype == FP32  # x's, as timm's x + ls2(mlp(..))
        assert vitkern.nn.LayerNormLinear.from_timm_block(block)(x).dtype == amp  # a Linear's output


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_reference_backend_vs_timm(dtype):
    run_mlp_parity(197, 192, 768, dtype, "cpu", True, "none", backend="reference")
    run_linear_parity(197, 192, dtype, "cpu", backend="reference")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("gamma", [1e-6, 1e-5])
def test_fp16_small_layer_scale_keeps_the_mlp_gradients(backend, gamma):
    """fp16 with a layer scale at its init size (DeiT III / CaiT) and a loss-scaled gradient: (dy·γ) @ W2 with γ
    folded into W2 underflowed in fp16 and lost most of dpre, hence of fc1's and norm2's gradients; γ on dy (timm's
    order) keeps them. These gradients are O(1e-2): bound 2 x torch's fp16 error + 1e-4 (the default fp16 atol,
    4e-3, would swamp them). x's gradient is the residual's dy plus a small branch term, and γ's overflows fp16 at
    this loss scale in timm's graph too: not checked here."""
    run_mlp_parity(50, 192, 384, FP16, "cpu", True, backend=backend, gamma=gamma, loss_scale=4096.0,
                   grads=["norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias"], grad_tol=Tolerance(k=2.0, atol=1e-4))


@pytest.mark.interpreter
@pytest.mark.parametrize("a_dtype, dtype", [(FP16, FP16), (FP32, FP16), (FP32, FP32)],
                         ids=["fp16", "fp32-dy-fp16-w", "fp32"])
@pytest.mark.parametrize("act_bwd", [False, True], ids=["plain", "gelu-bwd"])
def test_a_scale_prologue_equals_the_scaled_operand(a_dtype, dtype, act_bwd):
    """The GEMM's SCALE_A prologue (fp16's dy·γ, ops.ln_linear.layer_scaled_dy_gemm) rounds a·s[k] once to B's dtype
    and then runs the same tiles as the GEMM on that operand written out: the results are bit-identical. Shapes
    leave partial tiles in M, N and K; dy is a column slice (non-unit row stride)."""
    from vitkern.kernels.triton import ln_linear as lnl_k

    M, K, N = 50, 200, 72
    dy = torch.randn(M, K + 8, dtype=a_dtype)[:, 3:3 + K]
    w = torch.randn(K, N, dtype=dtype) * 0.05
    s = torch.rand(K, dtype=dtype) * 1e-3 + 1e-6  # layer-scale sized: dy·γ small, not underflowing in fp32
    pre = torch.randn(M, N, dtype=dtype) if act_bwd else None
    kw = dict(act=lnl_k.ACT_GELU_ERF, pre=pre, act_bwd=True) if act_bwd else {}
    got = torch.full((M, N), float("nan"), dtype=dtype)
    lnl_k.fused_linear(dy, w, got, a_scale=s, **kw)
    want = torch.full((M, N), float("nan"), dtype=dtype)
    lnl_k.fused_linear((dy.float() * s.float()).to(dtype), w, want, **kw)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="exclusive"):
        stats = torch.zeros(M), torch.ones(M), None, None
        lnl_k.fused_linear(dy, w, got, ln=stats, a_scale=s)


# ----------------------------------------------------------------------------------------------- GPU
VIT_WIDTHS = [384, 768, 1024, 1280]  # ViT-S/B/L/H
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 394, 64 * 197, 16 * 577])
@pytest.mark.parametrize("dim", VIT_WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
def test_triton_gpu_vs_timm(dtype, dim, rows):
    run_mlp_parity(rows, dim, 4 * dim, dtype, "cuda", rows % 2 == 0, "none" if dim != 1024 else "tanh")
    run_linear_parity(rows, dim, dtype, "cuda", qkv_bias=dim != 1280)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [394, 64 * 197])
@pytest.mark.parametrize("dim", [384, 768])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_gpu_autocast_vs_timm(amp, dim, rows):
    """fp32 model under CUDA autocast: fp32 x (LayerNorm in fp32 on CUDA autocast, as timm's), 16-bit GEMMs, fp32
    residual stream; against timm's modules under the same autocast."""
    run_mlp_parity(rows, dim, 4 * dim, FP32, "cuda", True, backend="triton", autocast=amp)
    run_linear_parity(rows, dim, FP32, "cuda", backend="triton", autocast=amp)


@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiles every autotune config: over the suite's 120 s per test on a cold cache
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])  # tiling differs per config, not per dtype
def test_triton_gpu_every_config(dtype):
    """Every GEMM tile config of every fused_linear variant (LN+qkv, LN+fc1+GELU, fc2+layer scale+residual and the
    backward GEMMs) at M = 2·197 (a partial last row tile for every BLOCK_M)."""
    def run():
        run_mlp_parity(2 * 197, 384, 4 * 384, dtype, "cuda", True)
        run_linear_parity(2 * 197, 384, dtype, "cuda")
    run_every_triton_config(run)


@pytest.mark.interpreter
def test_interpreter_gpu_geometry_every_config():
    """Every GEMM tile config of every fused_linear variant (LN+qkv, LN+fc1+GELU, fc2+layer scale+residual, the
    backward GEMMs), in the interpreter with the GPU path's tiles (vitkern.testing.gpu_geometry): parity, bounds
    and races of what test_triton_gpu_every_config runs, before a GPU does. M=70, K=96: partial last row and K
    blocks."""
    def run():
        run_mlp_parity(70, 96, 4 * 96, torch.float32, "cpu", True)
        run_linear_parity(70, 96, torch.float32, "cpu")
    run_in_gpu_geometry(run)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
def test_triton_gpu_large_batch_and_large_mean(dtype):
    run_mlp_parity(256 * 197, 768, 3072, dtype, "cuda", True, "none")
    run_mlp_parity(4096, 1024, 4096, dtype, "cuda", True, "tanh", mean=100.0)
    run_linear_parity(4096, 768, dtype, "cuda", mean=100.0)


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_gpu_fuzz():
    g = torch.Generator().manual_seed(4321)
    for _ in range(30):
        rows = int(torch.randint(1, 6000, (1,), generator=g))
        dim = int(torch.randint(8, 1600, (1,), generator=g))
        hidden = int(torch.randint(8, 6400, (1,), generator=g))
        dtype = GPU_DTYPES[int(torch.randint(0, 3, (1,), generator=g))]
        ls, tanh = (bool(torch.randint(0, 2, (1,), generator=g)) for _ in range(2))
        run_mlp_parity(rows, dim, hidden, dtype, "cuda", ls, "tanh" if tanh else "none")
        run_linear_parity(rows, dim, dtype, "cuda", qkv_bias=ls)


@pytest.mark.gpu
def test_gpu_dispatch_compile_and_cuda_graph():
    m = vitkern.nn.LayerNormMlp(768, init_values=0.1, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(394, 768, device="cuda", dtype=torch.bfloat16)
    p = (m.norm.weight, m.norm.bias, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.ls.gamma)
    assert vitkern.explain("ln_mlp", x, *p).backend_name in ("triton", "cuda")
    check_compile_and_cuda_graph(m, x)


# ----------------------------------------------------------------------------------------------- dispatch, modules
def _mlp_args(dim=16, hidden=24, dtype=torch.float32, **over):
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, dim, generator=g, dtype=dtype), "ln_weight": torch.randn(dim, generator=g, dtype=dtype),
         "ln_bias": torch.randn(dim, generator=g, dtype=dtype),
         "fc1_weight": torch.randn(hidden, dim, generator=g, dtype=dtype),
         "fc1_bias": torch.randn(hidden, generator=g, dtype=dtype),
         "fc2_weight": torch.randn(dim, hidden, generator=g, dtype=dtype),
         "fc2_bias": torch.randn(dim, generator=g, dtype=dtype), "layer_scale": torch.randn(dim, generator=g, dtype=dtype)}
    a.update(over)
    return a


def test_cpu_default_is_reference_and_fp64_falls_back_with_reason():
    a = _mlp_args()
    choice = vitkern.explain(ln_mlp, **a)
    assert choice.backend_name == "reference" and "triton" in str(choice)
    a64 = _mlp_args(dtype=torch.float64)
    with vitkern.use_backend("triton", op="ln_mlp"), pytest.raises(vitkern.BackendError, match="dtype"):
        ln_mlp(**a64)
    with vitkern.use_backend("triton", op="ln_linear", strict=False):
        assert vitkern.explain("ln_linear", a64["x"], None, None, a64["fc1_weight"]).backend_name == "reference"
    wide = torch.randn(2, 9000)
    reasons = str(vitkern.explain("ln_linear", wide, None, None, torch.randn(4, 9000)))
    assert "9000" in reasons


@pytest.mark.parametrize(
    "over, error, match",
    [
        ({"x": torch.arange(48).view(3, 16)}, TypeError, "x has dtype torch.int64"),
        ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
        ({"x": torch.randn(3, 0)}, ValueError, "last dim"),
        ({"ln_weight": torch.randn(15)}, ValueError, "ln_weight has shape"),  # disagrees with ln_bias: its fault
        ({"x": torch.randn(3, 15)}, ValueError, r"x has shape \(3, 15\); its last dim must be the LayerNorm's width 16"),
        ({"fc1_weight": torch.randn(24, 15)}, ValueError, "fc1_weight has shape"),
        ({"fc1_bias": torch.randn(23)}, ValueError, "fc1_bias has shape"),
        ({"fc2_weight": torch.randn(24, 16)}, ValueError, "fc2_weight has shape"),
        ({"fc2_weight": None}, TypeError, "fc2_weight must be a torch.Tensor"),
        ({"fc2_bias": torch.randn(16, dtype=torch.float64)}, TypeError, "fc2_bias has dtype"),
        ({"layer_scale": torch.randn(16, device="meta")}, ValueError, "layer_scale is on meta"),
        ({"eps": 0.0}, ValueError, "eps must be a positive"),
        ({"approximate": "sigmoid"}, ValueError, "approximate must be one of"),
    ],
)
def test_bad_input_errors_name_the_argument(over, error, match):
    with pytest.raises(error, match=match):
        ln_mlp(**_mlp_args(**over))


def test_module_called_with_the_wrong_width_names_the_input():
    with pytest.raises(ValueError, match=r"x has shape \(3, 15\); its last dim must be the LayerNorm's width 16"):
        vitkern.nn.LayerNormMlp(16, 24)(torch.randn(3, 15))


def test_ln_linear_bad_input():
    with pytest.raises(ValueError, match=r"weight has shape \(4, 15\); expected \[out_features, 16\]"):
        ln_linear(torch.randn(2, 16), None, None, torch.randn(4, 15))
    with pytest.raises(ValueError, match="bias has shape"):
        ln_linear(torch.randn(2, 16), None, None, torch.randn(4, 16), torch.randn(5))


@pytest.mark.parametrize("layer_scale", [True, False])
def test_modules_share_parameters_and_round_trip_timm_state_dicts(layer_scale):
    block = timm_block(64, 256, layer_scale)
    for p in block.parameters():
        nn.init.normal_(p)
    mlp = vitkern.nn.LayerNormMlp.from_timm_block(block)
    qkv = vitkern.nn.LayerNormLinear.from_timm_block(block)
    assert mlp.fc1.weight is block.mlp.fc1.weight and mlp.norm.weight is block.norm2.weight
    assert qkv.linear.weight is block.attn.qkv.weight and qkv.norm.weight is block.norm1.weight
    x = torch.randn(2, 5, 64)
    # fp32 on both sides, different summation orders, N(0, 1) weights (outputs ~ 100): the fp64 parity is tested above
    close = functools.partial(torch.testing.assert_close, rtol=1e-4, atol=1e-3)
    close(mlp(x), TimmMlpHalf(block)(x))
    close(qkv(x), TimmQkv(block)(x))
    # fresh modules load the timm block's state_dict and write it back under the same keys
    fresh_mlp = vitkern.nn.LayerNormMlp(64, 256, init_values=1.0 if layer_scale else None)
    fresh_qkv = vitkern.nn.LayerNormLinear(64, 192)
    fresh_mlp.load_timm_state_dict(block.state_dict())
    fresh_qkv.load_timm_state_dict(block.state_dict())
    close(fresh_mlp(x), TimmMlpHalf(block)(x))
    close(fresh_qkv(x), TimmQkv(block)(x))
    expected = {k for k in block.state_dict() if k.startswith(("norm2.", "mlp.", "ls2."))}
    assert set(fresh_mlp.timm_state_dict()) == expected
    assert set(fresh_qkv.timm_state_dict()) == {k for k in block.state_dict() if k.startswith(("norm1.", "attn.qkv."))}
    other = timm_block(64, 256, layer_scale)
    other.load_state_dict({**other.state_dict(), **fresh_mlp.timm_state_dict(), **fresh_qkv.timm_state_dict()})
    close(TimmMlpHalf(other)(x), mlp(x))
    assert mlp.state_dict().keys() == fresh_mlp.state_dict().keys()


def test_from_timm_block_rejects_what_it_cannot_fuse():
    block = timm_vit.Block(64, 2, proj_drop=0.1)
    with pytest.raises(ValueError, match="dropout"):
        vitkern.nn.LayerNormMlp.from_timm_block(block)
    block = timm_vit.Block(64, 2, act_layer=nn.SiLU)
    with pytest.raises(ValueError, match="nn.GELU"):
        vitkern.nn.LayerNormMlp.from_timm_block(block)
    # same submodule names, other math: post-norm; gamma_2 scaling the branch and q_bias / v_bias (EVA, BEiT)
    eva, beit = pytest.importorskip("timm.models.eva"), pytest.importorskip("timm.models.beit")
    for block in (timm_vit.ResPostBlock(64, 2), eva.EvaBlock(64, 2, init_values=0.1), beit.Block(64, 2, init_values=0.1)):
        for module in (vitkern.nn.LayerNormMlp, vitkern.nn.LayerNormLinear):
            with pytest.raises(ValueError, match=f"got {type(block).__qualname__} from"):
                module.from_timm_block(block)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16], ids=["fp32", "mixed-fp32-x-fp16-weights"])
def test_custom_ops_pass_opcheck(weight_dtype):
    a = _mlp_args()
    a["fc1_weight"], a["fc2_weight"] = a["fc1_weight"].to(weight_dtype), a["fc2_weight"].to(weight_dtype)
    params = [a[k] for k in ("ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "layer_scale")]
    x = a["x"].requires_grad_()
    for p in params:
        p.requires_grad_()
    torch.library.opcheck(torch.ops.vitkern.ln_mlp_fwd.default, (x, *params, 1e-6, "tanh", True))
    with torch.no_grad():
        y, pre, h, mean, rstd = torch.ops.vitkern.ln_mlp_fwd(x, *params, 1e-6, "tanh", True)
    detached = [p.detach() for p in params]
    torch.library.opcheck(torch.ops.vitkern.ln_mlp_bwd.default,
                          (torch.randn_like(y), x.detach(), *detached, pre, h, mean, rstd, 1e-6, "tanh"))
    lin = (x, params[0], params[1], params[2], params[3], 1e-6)
    torch.library.opcheck(torch.ops.vitkern.ln_linear_fwd.default, lin)
    with torch.no_grad():
        y, mean, rstd = torch.ops.vitkern.ln_linear_fwd(*lin)
    torch.library.opcheck(torch.ops.vitkern.ln_linear_bwd.default,
                          (torch.randn_like(y), x.detach(), *detached[:4], mean, rstd, 1e-6))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_torch_compile_fullgraph_no_graph_breaks(backend):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = vitkern.nn.LayerNormLinear(32, 32)
            self.mlp = vitkern.nn.LayerNormMlp(32, 48, init_values=0.5)

        def forward(self, x):
            return self.mlp(x + self.qkv(x))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 3, 32, requires_grad=True)
    with vitkern.use_backend(backend, op="ln_mlp"), vitkern.use_backend(backend, op="ln_linear"):
        eager = model(x)
        (gx_eager,) = torch.autograd.grad(eager.sum(), x)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gx, gx_eager)
