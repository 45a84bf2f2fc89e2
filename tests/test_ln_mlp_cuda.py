"""The CUDA C++ LayerNorm+Linear / LayerNorm+MLP forward (csrc/ops/ln_mlp.cu, csrc/common/cublaslt.h,
vitkern/ops/ln_mlp_cuda.py): LayerNorm kernel + cuBLASLt GEMMs with epilogues.

* CPU, always: the backends are registered after Triton, report themselves unavailable with a reason, reject
  backward problems (the Triton backward runs after a CUDA forward) and, until the op files route forwards to
  ``fused_forward``, forward problems too, saying so.
* CPU, when vitkern._C is built (``bash scripts/build_csrc.sh --inplace``): schemas, Meta kernels (shapes of the
  contract), input checks naming the argument, opcheck / torch.compile on meta tensors, and the cuBLASLt symbol
  lookup (dlopen/dlsym into torch's libcublasLt, no GPU needed).
* GPU (``@pytest.mark.gpu``, skipped with the reason otherwise): forward parity of y, pre, h, mean, rstd against
  float64 with vitkern.testing's rule (err <= 2 x PyTorch's error in the same dtype + atol(dtype) x scale), against
  the Triton forward (Triton's error as the baseline), every GELU / layer-scale variant, forward+backward with the
  op's own backward consuming the CUDA forward's saved tensors, strided/odd shapes, determinism, streams, and
  compute-sanitizer (slow).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern import dispatch
from vitkern.ops import ln_linear as ln_linear_op
from vitkern.ops import ln_mlp as ln_mlp_op
from vitkern.ops.ln_linear import LnLinearReference
from vitkern.backends.cuda_common import BACKWARD_REASON
from vitkern.ops.ln_mlp_cuda import CUDA_MAX_D, LnLinearCuda, LnMlpCuda
from vitkern.testing.sanitizer import run_under_sanitizer
from vitkern.testing import check_forward_backward, poison_outputs, randn, seed_for
from vitkern.testing.numerics import assert_close

EPS = 1e-6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _mlp_backend() -> LnMlpCuda:
    return dispatch.backends("ln_mlp")["cuda"]


def _linear_backend() -> LnLinearCuda:
    return dispatch.backends("ln_linear")["cuda"]


def _problem(op, direction="forward", device="cuda", dtype=torch.bfloat16, x=(394, 768), param_dtypes=None):
    attrs = (("param_dtypes", param_dtypes if param_dtypes is not None else (dtype,) * 4), ("device_index", 0))
    return dispatch.Problem(op, direction, device, dtype, (("x", x),), attrs)


# ----------------------------------------------------------------------------------------------- CPU: status
def test_backends_registered_after_triton():
    for op, cls in (("ln_linear", LnLinearCuda), ("ln_mlp", LnMlpCuda)):
        table = dispatch.backends(op)
        assert isinstance(table["cuda"], cls)
        # unmeasured: must not be the default on CUDA until committed benchmark numbers say it is faster
        assert table["cuda"].cuda_rank > table["triton"].cuda_rank


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU status; this machine has a GPU")
def test_unavailable_without_gpu_with_reason():
    for b in (_mlp_backend(), _linear_backend()):
        reason = b.availability()
        assert reason and "CUDA extension" in reason, reason
    x = torch.randn(3, 192)
    choice = vitkern.explain("ln_mlp", x, None, None, torch.randn(768, 192), None, torch.randn(192, 768), None)
    assert choice.backend_name == "reference"
    assert "cuda: rejected: " + _mlp_backend().availability() in str(choice), str(choice)


@pytest.mark.parametrize("op", ["ln_linear", "ln_mlp"])
def test_backward_problems_go_to_the_next_backend_with_the_reason(op):
    b = dispatch.backends(op)["cuda"]
    assert b.reject_reasons(_problem(op, "backward")) == [BACKWARD_REASON]


@pytest.mark.parametrize("op", ["ln_linear", "ln_mlp"])
def test_rejects_what_the_kernels_cannot_run(op):
    b = dispatch.backends(op)["cuda"]
    p = _problem(op, device="cpu", dtype=torch.float64, x=(4, CUDA_MAX_D + 8), param_dtypes=(torch.float32,))
    reasons = " | ".join(b.reject_reasons(p))
    for part in ("device 'cpu'", "torch.float64 not in", f"input width {CUDA_MAX_D + 8} > {CUDA_MAX_D}",
                 "parameter dtypes ['torch.float32'] differ"):
        assert part in reasons, reasons


@pytest.mark.parametrize("op, module", [("ln_linear", ln_linear_op), ("ln_mlp", ln_mlp_op)])
def test_op_files_route_forwards_to_whole_op_backends(op, module):
    """The op files drive Triton through stats/linear primitives; a backend with fused_forward (CUDA: LN kernel +
    cuBLASLt) gets the whole forward instead."""
    assert module.BACKEND_FUSED_FORWARD == "fused_forward"
    assert callable(getattr(dispatch.backends(op)["cuda"], module.BACKEND_FUSED_FORWARD))


# ----------------------------------------------------------------------------------------------- CPU: the built extension
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _meta_mlp(m=394, d=768, hidden=3072, dtype=torch.bfloat16, ls=True):
    return (_meta(m, d, dtype=dtype), _meta(d, dtype=dtype), _meta(d, dtype=dtype), _meta(hidden, d, dtype=dtype),
            _meta(hidden, dtype=dtype), _meta(d, hidden, dtype=dtype), _meta(d, dtype=dtype),
            _meta(d, dtype=dtype) if ls else None)


def test_schemas_exist(ops):
    for name in ("ln_linear_fwd", "ln_mlp_fwd"):
        assert {"default", "out"} <= set(getattr(ops, name).overloads()), name


def test_cublaslt_symbols_resolve(ops):
    """The ops call the cuBLASLt torch loaded (dlopen(RTLD_NOLOAD) + dlsym, csrc/common/cublaslt.h): the lookup
    works without a GPU, and the library is the CUDA major version torch was built for."""
    version = ops._cublaslt_version()
    assert version // 10000 == int(torch.version.cuda.split(".")[0]), version


@pytest.mark.parametrize("save", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("ls", [True, False], ids=["ls", "nols"])
def test_meta_shapes(ops, save, ls):
    m, d, hidden = 394, 768, 3072
    y, pre, h, mean, rstd = ops.ln_mlp_fwd(*_meta_mlp(m, d, hidden, ls=ls), EPS, "none", save)
    assert (y.shape, y.dtype, y.device.type) == ((m, d), torch.bfloat16, "meta")
    assert pre.shape == h.shape == ((m, hidden) if save else (0,)) and pre.dtype == h.dtype == torch.bfloat16
    assert mean.shape == rstd.shape == (m,) and mean.dtype == rstd.dtype == torch.float32
    y, mean, rstd = ops.ln_linear_fwd(_meta(m, d), None, None, _meta(3 * d, d), None, EPS)
    assert y.shape == (m, 3 * d) and y.dtype == torch.bfloat16 and mean.shape == (m,) and mean.dtype == torch.float32


def test_meta_opcheck(ops):
    torch.library.opcheck(ops.ln_mlp_fwd.default, (*_meta_mlp(6, 192, 768), EPS, "tanh", True, 1, 2))
    torch.library.opcheck(ops.ln_mlp_fwd.default, (*_meta_mlp(6, 192, 768, ls=False), EPS, "none", False))
    torch.library.opcheck(ops.ln_linear_fwd.default, (_meta(6, 192), _meta(192), _meta(192), _meta(576, 192),
                                                      _meta(576), EPS))


def test_meta_torch_compile(ops):
    def f(*args):
        y, pre, h, mean, rstd = ops.ln_mlp_fwd(*args, EPS, "none", True)
        return y, h, mean

    y, h, mean = torch.compile(f, fullgraph=True, backend="aot_eager")(*_meta_mlp(8, 384, 1536))
    assert y.shape == (8, 384) and h.shape == (8, 1536) and mean.dtype == torch.float32


def _mlp_call(**over):
    args = dict(zip(["x", "ln_w", "ln_b", "w1", "b1", "w2", "b2", "ls"], _meta_mlp(4, 8, 16)))
    kw = {"approximate": "none", "save": False, "gelu_impl": 0, "ls_impl": 0}
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return lambda o: o.ln_mlp_fwd(*args.values(), EPS, kw["approximate"], kw["save"], kw["gelu_impl"], kw["ls_impl"])


@pytest.mark.parametrize(
    "call, match",
    [
        (_mlp_call(x=_meta(4, 8, dtype=torch.float64)), r"ln_mlp_fwd: x must have dtype float16, bfloat16 or float32"),
        (_mlp_call(x=_meta(2, 4, 8)), r"ln_mlp_fwd: x must be 2-D"),
        (_mlp_call(x=_meta(8, 4).t()), r"x must be contiguous in its last dim"),
        (_mlp_call(x=_meta(4, 8).expand(4, 8).as_strided((4, 8), (0, 1))), r"x rows overlap"),
        (_mlp_call(x=_meta(2, CUDA_MAX_D + 8), ln_w=None, ln_b=None, w1=_meta(16, CUDA_MAX_D + 8),
                   w2=_meta(CUDA_MAX_D + 8, 16), b2=None, ls=None),
         rf"the LayerNorm width\) must be in \[1, {CUDA_MAX_D}\]"),
        (_mlp_call(ln_w=_meta(8, dtype=torch.float32)), r"ln_weight must have x's dtype bfloat16, got float32"),
        (_mlp_call(ln_b=_meta(7)), r"ln_bias.size\(0\) must be 8, got 7"),
        (_mlp_call(w1=_meta(16, 9)), r"fc1_weight must have shape \[16, 8\], got \[16, 9\]"),
        (_mlp_call(b1=_meta(15)), r"fc1_bias.size\(0\) must be 16, got 15"),
        (_mlp_call(w2=_meta(8, 15)), r"fc2_weight must have shape \[8, 16\], got \[8, 15\]"),
        (_mlp_call(w2=_meta(16, 8).t()), r"fc2_weight must be contiguous in its last dim"),
        (_mlp_call(ls=_meta(8, dtype=torch.float16)), r"layer_scale must have x's dtype bfloat16, got float16"),
        (_mlp_call(approximate="erf"), r"approximate must be \"none\" \(exact erf GELU\) or \"tanh\", got \"erf\""),
        (_mlp_call(gelu_impl=1), r"gelu_impl=1 \(cuBLASLt GELU epilogue\) computes the tanh approximation"),
        (_mlp_call(gelu_impl=3), r"gelu_impl must be 0 \(auto\), 1 \(cuBLASLt epilogue\) or 2"),
        (_mlp_call(ls_impl=-1), r"ls_impl must be 0 \(auto\), 1 \(fold into fc2\) or 2"),
        (lambda o: o.ln_linear_fwd(_meta(4, 8), None, None, _meta(0, 8), None, EPS),
         r"ln_linear_fwd: weight must have at least one row"),
        (lambda o: o.ln_linear_fwd(_meta(4, 8), None, None, _meta(6, 8), _meta(5), EPS),
         r"ln_linear_fwd: bias.size\(0\) must be 6, got 5"),
        (lambda o: o.ln_linear_fwd(_meta(4, 8), None, None, _meta(6, 8), None, -1.0), r"eps must be >= 0"),
    ],
    ids=["x_dtype", "x_3d", "x_strided_cols", "x_overlapping_rows", "too_wide", "ln_weight_dtype", "ln_bias_size",
         "fc1_shape", "fc1_bias_size", "fc2_shape", "fc2_transposed", "ls_dtype", "approximate", "erf_epilogue",
         "gelu_impl", "ls_impl", "linear_no_rows", "linear_bias", "eps"],
)
def test_checks_name_the_argument(ops, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(ops)


def test_no_cpu_kernel(ops):
    with pytest.raises(RuntimeError, match="CPU"):  # NotImplementedError from the dispatcher (a RuntimeError)
        ops.ln_linear_fwd(torch.zeros(2, 8), None, None, torch.zeros(4, 8), None, EPS)


# ----------------------------------------------------------------------------------------------- GPU helpers
NAMES = ["x", "ln_w", "ln_b", "w1", "b1", "w2", "b2", "ls"]


def make_mlp_inputs(rows, d, hidden, dtype, seed, layer_scale=True, biases=True, affine=True, mean=0.0,
                    device="cuda"):
    """Fresh random values for every tensor (never zeros); weights scaled so activations stay O(1)."""
    def r(shape, i, **kw):
        return randn(shape, dtype=dtype, device=device, seed=seed + i, **kw)

    return {
        "x": r((rows, d), 0, mean=mean),
        "ln_w": r((d,), 1, mean=1.0, scale=0.5) if affine else None,
        "ln_b": r((d,), 2, scale=0.5) if affine else None,
        "w1": r((hidden, d), 3, scale=d ** -0.5),
        "b1": r((hidden,), 4, scale=0.5) if biases else None,
        "w2": r((d, hidden), 5, scale=hidden ** -0.5),
        "b2": r((d,), 6, scale=0.5) if biases else None,
        "ls": r((d,), 7, scale=0.5) if layer_scale else None,
    }


def mlp_reference(x, ln_w, ln_b, w1, b1, w2, b2, ls, approximate="none"):
    """The unfused module chain (LayerNorm, Linear, GELU, Linear, layer scale, residual): y, pre, h."""
    pre = F.linear(F.layer_norm(x, x.shape[-1:], ln_w, ln_b, EPS), w1, b1)
    h = F.gelu(pre, approximate=approximate)
    z = F.linear(h, w2, b2)
    return x + (z * ls if ls is not None else z), pre, h


def _stats_reference(x):
    return LnLinearReference().stats(x, EPS)  # fp32 statistics of x in its dtype (fp64 for fp64)


class _CudaMlp(torch.autograd.Function):
    """Forward: the CUDA backend's whole-op forward (called directly, so these tests do not depend on the op files'
    routing); backward: the op's own backward (vitkern::ln_mlp_bwd, default dispatch: Triton on a GPU, since the
    CUDA backend rejects backward problems) from the CUDA forward's pre, h, mean, rstd — what autograd runs after a
    CUDA forward."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, ls, approximate, gelu_impl, ls_impl):
        save = any(ctx.needs_input_grad[:8])
        y, pre, h, mean, rstd = _mlp_backend().fused_forward(x, ln_w, ln_b, w1, b1, w2, b2, ls, EPS, approximate, save,
                                                             gelu_impl=gelu_impl, layer_scale_impl=ls_impl)
        ctx.approximate = approximate
        ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2, b2, ls, pre, h, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        grads = torch.ops.vitkern.ln_mlp_bwd(dy.contiguous(), *ctx.saved_tensors, EPS, ctx.approximate)
        need = ctx.needs_input_grad
        return tuple(g if need[i] and g.numel() else None for i, g in enumerate(grads)) + (None, None, None)


def cuda_mlp(approximate="none", gelu_impl="auto", ls_impl="auto"):
    def fn(x, ln_w, ln_b, w1, b1, w2, b2, ls):
        return _CudaMlp.apply(x, ln_w, ln_b, w1, b1, w2, b2, ls, approximate, gelu_impl, ls_impl)

    return fn


def reference_mlp(approximate="none"):
    def fn(x, ln_w, ln_b, w1, b1, w2, b2, ls):
        return mlp_reference(x, ln_w, ln_b, w1, b1, w2, b2, ls, approximate)[0]

    return fn


def _args(inputs):
    return [inputs[k] for k in NAMES]


def check_mlp_forward(inputs, approximate="none", save=True, baseline=None, **impls):
    """y, pre, h, mean, rstd of the CUDA forward (outputs poisoned first) against float64; the error bound's
    baseline is PyTorch in the inputs' dtype, or `baseline` = another backend's forward outputs."""
    with poison_outputs():
        y, pre, h, mean, rstd = _mlp_backend().fused_forward(*_args(inputs), EPS, approximate, save, **impls)
    ref64 = mlp_reference(*(t.double() if t is not None else None for t in _args(inputs)), approximate)
    same = baseline or mlp_reference(*_args(inputs), approximate)
    assert_close("y", y.cpu(), ref64[0].cpu(), same[0].cpu())
    if save:
        assert_close("pre", pre.cpu(), ref64[1].cpu(), same[1].cpu())
        assert_close("h", h.cpu(), ref64[2].cpu(), same[2].cpu())
    else:
        assert pre.numel() == 0 and h.numel() == 0
    mean64, rstd64 = _stats_reference(inputs["x"].double())
    mean32, rstd32 = _stats_reference(inputs["x"])
    assert_close("mean", mean.cpu(), mean64.cpu(), mean32.cpu())
    assert_close("rstd", rstd.cpu(), rstd64.cpu(), rstd32.cpu())
    return y, pre, h, mean, rstd


# ----------------------------------------------------------------------------------------------- GPU: ln_mlp
@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("layer_scale", [False, True], ids=["nols", "ls"])
@pytest.mark.parametrize("rows", [1, 37, 394])
@pytest.mark.parametrize("d", [192, 384, 768, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_mlp_forward_parity(cuda_ops, dtype, d, rows, layer_scale, approximate):
    seed = seed_for("ln-mlp-cuda-fwd", dtype, d, rows, layer_scale, approximate)
    inputs = make_mlp_inputs(rows, d, 4 * d, dtype, seed, layer_scale)
    check_mlp_forward(inputs, approximate, save=True)
    check_mlp_forward(inputs, approximate, save=False)


@pytest.mark.gpu
@pytest.mark.parametrize("save", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("ls_impl", ["fold", "kernel"])
@pytest.mark.parametrize("gelu_impl, approximate",
                         [("epilogue", "tanh"), ("kernel", "tanh"), ("kernel", "none"), ("auto", "tanh")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_mlp_variants(cuda_ops, dtype, gelu_impl, approximate, ls_impl, save):
    """Every fc1 GELU path and both layer-scale paths, at M below and above the hidden size (auto's switch)."""
    for rows in (300, 2000):
        seed = seed_for("ln-mlp-cuda-variants", dtype, gelu_impl, approximate, ls_impl, save, rows)
        inputs = make_mlp_inputs(rows, 384, 1536, dtype, seed)
        check_mlp_forward(inputs, approximate, save, gelu_impl=gelu_impl, layer_scale_impl=ls_impl)


@pytest.mark.gpu
def test_gelu_epilogue_is_tanh(cuda_ops, monkeypatch):
    """cuBLASLt's GELU epilogue computes the tanh approximation (why approximate="none" never uses it): in fp32 its
    h is much closer to gelu_tanh(pre) than to the exact erf GELU (they differ by up to 4.7e-4 near |x| = 2.7)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    inputs = make_mlp_inputs(394, 384, 1536, torch.float32, seed_for("gelu-epilogue-tanh"), layer_scale=False)
    y, pre, h, _, _ = _mlp_backend().fused_forward(*_args(inputs), EPS, "tanh", True, gelu_impl="epilogue")
    p = pre.double()
    err_tanh = (h.double() - F.gelu(p, approximate="tanh")).abs().max().item()
    err_erf = (h.double() - F.gelu(p)).abs().max().item()
    assert p.abs().max() > 2.5, "the inputs must reach the region where the two GELUs differ"
    assert err_tanh < err_erf / 4, (err_tanh, err_erf)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [384, 768])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_mlp_as_accurate_as_triton(cuda_ops, dtype, d):
    """Same inputs through the Triton forward: the CUDA forward's error (y, pre, h) is within the rule with the
    Triton forward's error as the baseline."""
    for layer_scale, approximate in ((True, "none"), (False, "tanh")):
        seed = seed_for("ln-mlp-cuda-vs-triton", dtype, d, layer_scale, approximate)
        inputs = make_mlp_inputs(394, d, 4 * d, dtype, seed, layer_scale)
        with vitkern.use_backend("triton", op="ln_mlp"), torch.no_grad():
            y, pre, h, _, _ = torch.ops.vitkern.ln_mlp_fwd(*_args(inputs), EPS, approximate, True)
        check_mlp_forward(inputs, approximate, save=True, baseline=(y, pre, h))


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["ls_tanh", "nols_none", "no_affine_no_bias", "odd_hidden", "odd_width"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_mlp_forward_backward(cuda_ops, dtype, case):
    """Training: the op's backward (Triton) runs on the CUDA forward's saved pre/h/mean/rstd; every gradient against
    float64. Odd sizes: hidden 300 (aux leading dim not a multiple of 8: auto takes the GELU kernel) and D 100 (the
    LayerNorm's scalar path, unaligned cuBLASLt rows)."""
    d, hidden, ls, approximate, kw = {
        "ls_tanh": (384, 1536, True, "tanh", {}),
        "nols_none": (768, 3072, False, "none", {}),
        "no_affine_no_bias": (192, 768, True, "none", {"affine": False, "biases": False}),
        "odd_hidden": (192, 300, True, "tanh", {}),
        "odd_width": (100, 400, True, "none", {}),
    }[case]
    seed = seed_for("ln-mlp-cuda-fwd-bwd", dtype, case)
    inputs = make_mlp_inputs(197, d, hidden, dtype, seed, ls, **kw)
    grads = [k for k, v in inputs.items() if v is not None]
    check_forward_backward(cuda_mlp(approximate), reference_mlp(approximate), inputs, grads, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["row_stride_aligned", "row_stride_odd", "offset_1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_mlp_strided_rows(cuda_ops, dtype, layout):
    """x as a row-strided view: the LayerNorm reads it (vectorised or scalar path) and fc2 reads it again as C with
    ldc = its row stride (8-aligned, odd, or a misaligned base pointer)."""
    d, rows = 384, 50
    extra = {"row_stride_aligned": 8, "row_stride_odd": 3, "offset_1": 8}[layout]
    seed = seed_for("ln-mlp-cuda-strided", dtype, layout)
    inputs = make_mlp_inputs(rows, d, 4 * d, dtype, seed)
    big = randn((rows, d + extra), dtype=dtype, device="cuda", seed=seed + 99)
    off = 1 if layout == "offset_1" else 0
    inputs["x"] = big[:, off:off + d]
    assert inputs["x"].stride(0) == d + extra
    check_mlp_forward(inputs, "none", save=True)


@pytest.mark.gpu
def test_cuda_mlp_large_mean_is_stable(cuda_ops):
    """|mean|/std = 100: the LayerNorm's two-pass variance keeps the digits (and the residual through C is exact)."""
    inputs = make_mlp_inputs(394, 768, 3072, torch.bfloat16, seed_for("ln-mlp-cuda-mean"), mean=100.0)
    check_mlp_forward(inputs, "none", save=True)


@pytest.mark.gpu
def test_cuda_mlp_is_deterministic_and_uses_the_current_stream(cuda_ops):
    inputs = make_mlp_inputs(2000, 768, 3072, torch.bfloat16, seed_for("ln-mlp-cuda-det"))
    runs = [_mlp_backend().fused_forward(*_args(inputs), EPS, "tanh", True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        on_side = _mlp_backend().fused_forward(*_args(inputs), EPS, "tanh", True)
    s.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(runs[0], on_side))


@pytest.mark.gpu
def test_cuda_mlp_empty_and_device_checks(cuda_ops):
    inputs = make_mlp_inputs(0, 192, 768, torch.bfloat16, seed_for("ln-mlp-cuda-empty"))
    y, pre, h, mean, rstd = cuda_ops.ln_mlp_fwd(*_args(inputs), EPS, "none", True)
    assert y.shape == (0, 192) and pre.shape == h.shape == (0, 768) and mean.shape == (0,)
    inputs = make_mlp_inputs(4, 192, 768, torch.bfloat16, seed_for("ln-mlp-cuda-dev"))
    inputs["b2"] = inputs["b2"].cpu()
    with pytest.raises(RuntimeError, match="fc2_bias must be a CUDA tensor, got a tensor on cpu"):
        cuda_ops.ln_mlp_fwd(*_args(inputs), EPS, "none", False)


@pytest.mark.gpu
def test_cuda_ops_torch_compile_and_opcheck(cuda_ops):
    inputs = make_mlp_inputs(394, 384, 1536, torch.bfloat16, seed_for("ln-mlp-cuda-compile"))

    def f(*args):
        return cuda_ops.ln_mlp_fwd(*args, EPS, "none", False)[0]

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*_args(inputs)), f(*_args(inputs)), atol=0, rtol=0)
    torch.library.opcheck(cuda_ops.ln_mlp_fwd.default, (*_args(inputs), EPS, "tanh", True))
    x, w = inputs["x"], inputs["w1"]
    torch.library.opcheck(cuda_ops.ln_linear_fwd.default, (x, inputs["ln_w"], inputs["ln_b"], w, inputs["b1"], EPS))


@pytest.mark.gpu
def test_gpu_dispatch_through_the_op(cuda_ops):
    """Through vitkern.functional.ln_mlp: the CUDA forward (strict) once the op file routes whole-op forwards;
    training falls back to the Triton backward (strict=False)."""
    from vitkern.functional.ln_mlp import ln_mlp

    inputs = make_mlp_inputs(394, 768, 3072, torch.bfloat16, seed_for("ln-mlp-cuda-dispatch"))
    choice = vitkern.explain("ln_mlp", *_args(inputs), EPS)
    assert "cuda: supported, lower preference" in str(choice), str(choice)  # ranked after Triton until measured
    with vitkern.use_backend("cuda", op="ln_mlp"), torch.no_grad():
        y = ln_mlp(*_args(inputs), EPS)
    ref = check_mlp_forward(inputs, "none", save=False)[0]
    torch.testing.assert_close(y, ref, atol=0, rtol=0)

    def kernel(**a):
        with vitkern.use_backend("cuda", op="ln_mlp", strict=False):
            return ln_mlp(*(a[k] for k in NAMES), EPS)

    seed = seed_for("ln-mlp-cuda-dispatch-grad")
    check_forward_backward(kernel, reference_mlp(), inputs, NAMES, seed=seed)


# ----------------------------------------------------------------------------------------------- GPU: ln_linear
def linear_reference(x, ln_w, ln_b, w, b):
    return F.linear(F.layer_norm(x, x.shape[-1:], ln_w, ln_b, EPS), w, b)


class _CudaLinear(torch.autograd.Function):
    """The CUDA whole-op forward, then the op's own backward (Triton on a GPU) from its mean/rstd."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w, b):
        y, mean, rstd = _linear_backend().fused_forward(x, ln_w, ln_b, w, b, EPS)
        ctx.has_bias = b is not None
        ctx.save_for_backward(x, ln_w, ln_b, w, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, ln_w, ln_b, w, mean, rstd = ctx.saved_tensors
        grads = torch.ops.vitkern.ln_linear_bwd(dy.contiguous(), x, ln_w, ln_b, w, ctx.has_bias, mean, rstd, EPS)
        return tuple(g if ctx.needs_input_grad[i] and g.numel() else None for i, g in enumerate(grads))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["affine_bias", "no_affine_no_bias"])
@pytest.mark.parametrize("rows", [1, 37, 394])
@pytest.mark.parametrize("d", [192, 384, 768, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_linear_forward_parity(cuda_ops, dtype, d, rows, variant):
    seed = seed_for("ln-linear-cuda-fwd", dtype, d, rows, variant)
    full = variant == "affine_bias"
    inp = make_mlp_inputs(rows, d, 3 * d, dtype, seed, affine=full, biases=full)
    args = (inp["x"], inp["ln_w"], inp["ln_b"], inp["w1"], inp["b1"])
    with poison_outputs():
        y, mean, rstd = _linear_backend().fused_forward(*args, EPS)
    ref64 = linear_reference(*(t.double() if t is not None else None for t in args))
    assert_close("y", y.cpu(), ref64.cpu(), linear_reference(*args).cpu())
    mean64, rstd64 = _stats_reference(inp["x"].double())
    mean32, rstd32 = _stats_reference(inp["x"])
    assert_close("mean", mean.cpu(), mean64.cpu(), mean32.cpu())
    assert_close("rstd", rstd.cpu(), rstd64.cpu(), rstd32.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_linear_forward_backward(cuda_ops, dtype):
    for d, n in ((768, 2304), (100, 300)):  # the qkv GEMM of ViT-B; odd widths (scalar LN path, unaligned rows)
        seed = seed_for("ln-linear-cuda-fwd-bwd", dtype, d)
        inp = make_mlp_inputs(197, d, n, dtype, seed)
        inputs = {k: inp[k] for k in ("x", "ln_w", "ln_b")} | {"w": inp["w1"], "b": inp["b1"]}
        check_forward_backward(lambda **a: _CudaLinear.apply(*a.values()), lambda **a: linear_reference(**a), inputs,
                               list(inputs), seed=seed)


# ----------------------------------------------------------------------------------------------- GPU: sanitizer
# the body of a vitkern.testing.sanitizer.workload (which loads the extension as `ops`)
SANITIZER_SCRIPT = r"""
for dtype in (torch.bfloat16, torch.float32):
    for m, d, hidden, off in ((5, 384, 1536, 0), (37, 100, 300, 1), (300, 192, 768, 0)):
        base = torch.randn(m, d + off, device="cuda", dtype=dtype)
        x = base[:, off:]
        p = [torch.randn(*s, device="cuda", dtype=dtype) * 0.1
             for s in ((d,), (d,), (hidden, d), (hidden,), (d, hidden), (d,), (d,))]
        for approximate, gelu_impl in (("tanh", 0), ("none", 2)):
            for ls_impl in (1, 2):
                ops.ln_mlp_fwd(x, *p, 1e-6, approximate, True, gelu_impl, ls_impl)
                ops.ln_mlp_fwd(x, *p, 1e-6, approximate, False, gelu_impl, ls_impl)
        ops.ln_linear_fwd(x, p[0], p[1], p[2], p[3], 1e-6)
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("sanitizer_tool, clean", [("memcheck", "ERROR SUMMARY: 0 errors"),
                                                   ("synccheck", "ERROR SUMMARY: 0 errors")])
def test_compute_sanitizer(cuda_ops, sanitizer_tool, clean):
    run_under_sanitizer(sanitizer_tool, SANITIZER_SCRIPT, clean)
