"""The CUDA C++ LayerNorm+Linear / LayerNorm+MLP / Linear+residual forward (csrc/ops/ln_mlp.cu,
csrc/common/cublaslt.h, vitkern/ops/ln_mlp_cuda.py): LayerNorm kernel + cuBLASLt GEMMs with epilogues; linear_residual
is LayerNorm+MLP's fc2 step (the same C++ function) on its own.

* CPU, always: the backends are registered after Triton, report themselves unavailable with a reason, reject
  backward problems (the Triton backward runs after a CUDA forward) and, until the op files route forwards to
  ``fused_forward``, forward problems too, saying so.
* CPU, when vitkern._C is built (``bash scripts/build_csrc.sh --inplace``): schemas, Meta kernels (shapes of the
  contract), input checks naming the argument, torch.compile on meta tensors (opcheck: on the GPU), and the cuBLASLt symbol
  lookup (dlopen/dlsym into torch's libcublasLt, no GPU needed).
* GPU (``@pytest.mark.gpu``, skipped with the reason otherwise): forward parity of y, pre, h, mean, rstd against
  float64 with vitkern.testing's rule (err <= 2 x PyTorch's error in the same dtype + atol(dtype) x scale), against
  the Triton forward (Triton's error as the baseline), every GELU / layer-scale variant, forward+backward with the
  op's own backward consuming the CUDA forward's saved tensors, strided/odd shapes, determinism, streams, and
  compute-sanitizer (slow). linear_residual: y against float64 and against the Triton forward at ViT widths, both
  layer-scale paths, strided x / weight / residual, forward+backward with the op's own (Triton) backward.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern import dispatch
from vitkern.ops import linear_residual as linear_residual_op
from vitkern.ops import ln_linear as ln_linear_op
from vitkern.ops import ln_mlp as ln_mlp_op
from vitkern.ops.ln_linear import LnLinearReference
from vitkern.backends.cuda_common import BACKWARD_REASON
from vitkern.ops.ln_mlp_cuda import CUDA_MAX_D, LAYER_SCALE_IMPLS, LinearResidualCuda, LnLinearCuda, LnMlpCuda
from vitkern.testing.sanitizer import run_under_sanitizer
from vitkern.testing import Tolerance, check_forward_backward, materialize, poison_outputs, randn, seed_for
from vitkern.testing.numerics import assert_close

EPS = 1e-6
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _mlp_backend() -> LnMlpCuda:
    return dispatch.backends("ln_mlp")["cuda"]


def _linear_backend() -> LnLinearCuda:
    return dispatch.backends("ln_linear")["cuda"]


def _lr_backend() -> LinearResidualCuda:
    return dispatch.backends("linear_residual")["cuda"]


def _problem(op, direction="forward", device="cuda", dtype=torch.bfloat16, x=(394, 768), param_dtypes=None):
    params = param_dtypes if param_dtypes is not None else (dtype,) * 4
    attrs = (("weight_dtypes", ()), ("other_dtypes", tuple((f"p{i}", d) for i, d in enumerate(params))),
             ("device_index", 0))
    return dispatch.Problem(op, direction, device, dtype, (("x", x),), attrs)


# ----------------------------------------------------------------------------------------------- CPU: status
def test_backends_registered_after_triton():
    for op, cls in (("ln_linear", LnLinearCuda), ("ln_mlp", LnMlpCuda), ("linear_residual", LinearResidualCuda)):
        table = dispatch.backends(op)
        assert isinstance(table["cuda"], cls)
        # unmeasured: must not be the default on CUDA until committed benchmark numbers say it is faster
        assert table["cuda"].cuda_rank > table["triton"].cuda_rank


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU status; this machine has a GPU")
def test_unavailable_without_gpu_with_reason():
    for b in (_mlp_backend(), _linear_backend(), _lr_backend()):
        reason = b.availability()
        assert reason and "CUDA extension" in reason, reason
    x = torch.randn(3, 192)
    choice = vitkern.explain("ln_mlp", x, None, None, torch.randn(768, 192), None, torch.randn(192, 768), None)
    assert choice.backend_name == "reference"
    assert "cuda: rejected: " + _mlp_backend().availability() in str(choice), str(choice)
    choice = vitkern.explain("linear_residual", x, torch.randn(96, 192), None, torch.randn(3, 96), None)
    assert choice.backend_name == "reference"
    assert "cuda: rejected: " + _lr_backend().availability() in str(choice), str(choice)


@pytest.mark.parametrize("op", ["ln_linear", "ln_mlp", "linear_residual"])
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


def test_mixed_precision_goes_to_triton_with_the_reason():
    """An fp32 residual stream over bf16 weights (autocast): the cuBLASLt ops take one dtype and reject it by name;
    the Triton backend (and the reference) take it."""
    x, w1, w2 = torch.randn(4, 16), torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    problems = {"ln_mlp": ln_mlp_op._problem("forward", x, None, None, w1, None, w2, None, torch.randn(16)),
                "ln_linear": ln_linear_op._problem("forward", x, torch.randn(16), None, w1, None),
                "linear_residual": linear_residual_op._problem("forward", x.to(torch.bfloat16), w1.t(), None,
                                                               torch.randn(4, 32), None)}
    for op, p in problems.items():
        reasons = " | ".join(dispatch.backends(op)["cuda"].op_reasons(p))
        assert "mixed precision runs on Triton" in reasons, (op, reasons)
        assert ln_linear_op.mixed_dtype_reasons(p) == [], op


def test_linear_residual_has_no_width_limit():
    """No LayerNorm in linear_residual: the LayerNorm kernel's width limit is not a reason; the rest still are."""
    b = _lr_backend()
    assert not b.op_reasons(_problem("linear_residual", x=(394, 4 * CUDA_MAX_D)))
    p = _problem("linear_residual", device="cpu", dtype=torch.float64, x=(4, CUDA_MAX_D + 8),
                 param_dtypes=(torch.float32,))
    reasons = " | ".join(b.reject_reasons(p))
    for part in ("device 'cpu'", "torch.float64 not in", "parameter dtypes ['torch.float32'] differ"):
        assert part in reasons, reasons
    assert "width" not in reasons, reasons


@pytest.mark.parametrize("op, module", [("ln_linear", ln_linear_op), ("ln_mlp", ln_mlp_op),
                                        ("linear_residual", linear_residual_op)])
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
    for name in ("ln_linear_fwd", "ln_mlp_fwd", "linear_residual_fwd"):
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
    stats = _meta(m, dtype=torch.float32)
    act = _meta(m, hidden) if save else None
    ops.ln_mlp_fwd.out(*_meta_mlp(m, d, hidden, ls=ls), EPS, "none", y=_meta(m, d), pre=act, h=act, mean=stats,
                       rstd=stats)
    ops.ln_linear_fwd.out(_meta(m, d), None, None, _meta(3 * d, d), None, EPS, y=_meta(m, 3 * d), mean=stats,
                          rstd=stats)


@pytest.mark.parametrize("bias, ls", [(True, True), (False, False)], ids=["bias_ls", "nobias_nols"])
def test_linear_residual_meta_shapes(ops, bias, ls):
    m, k, n = 394, 768, 2304
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        y = ops.linear_residual_fwd(_meta(m, k, dtype=dtype), _meta(n, k, dtype=dtype),
                                    _meta(n, dtype=dtype) if bias else None, _meta(m, n, dtype=dtype),
                                    _meta(n, dtype=dtype) if ls else None)
        assert (y.shape, y.dtype, y.device.type) == ((m, n), dtype, "meta")
        ops.linear_residual_fwd.out(_meta(m, k, dtype=dtype), _meta(n, k, dtype=dtype),
                                    _meta(n, dtype=dtype) if bias else None, _meta(m, n, dtype=dtype),
                                    _meta(n, dtype=dtype) if ls else None, y=_meta(m, n, dtype=dtype))
    # no LayerNorm: no width limit; a strided residual and x (any row stride) are accepted
    wide = CUDA_MAX_D + 8
    x = _meta(m, wide + 8)[:, :wide]
    res = _meta(m, 24)[:, 4:20]
    y = ops.linear_residual_fwd(x, _meta(16, wide), None, res, _meta(16), 2)
    assert y.shape == (m, 16) and y.is_contiguous()
    assert ops.linear_residual_fwd(_meta(0, k), _meta(n, k), None, _meta(0, n), None).shape == (0, n)


@pytest.mark.gpu
def test_opcheck(cuda_ops):
    # on real tensors: torch.library.opcheck checks nothing when an input is on the meta device
    cases = [
        (cuda_ops.ln_mlp_fwd, (*_meta_mlp(6, 192, 768), EPS, "tanh", True, 1, 2)),
        (cuda_ops.ln_mlp_fwd, (*_meta_mlp(6, 192, 768, ls=False), EPS, "none", False)),
        (cuda_ops.ln_linear_fwd, (_meta(6, 192), _meta(192), _meta(192), _meta(576, 192), _meta(576), EPS)),
        (cuda_ops.linear_residual_fwd, (_meta(6, 192), _meta(96, 192), _meta(96), _meta(6, 96), _meta(96), 1)),
        (cuda_ops.linear_residual_fwd, (_meta(6, 192), _meta(96, 192), None, _meta(6, 96), None)),
    ]
    for i, (op, args) in enumerate(cases):
        torch.library.opcheck(op.default, materialize(args, device="cuda", seed=seed_for("oc", i)))


def test_meta_torch_compile(ops):
    def f(*args):
        y, pre, h, mean, rstd = ops.ln_mlp_fwd(*args, EPS, "none", True)
        return y, h, mean

    y, h, mean = torch.compile(f, fullgraph=True, backend="aot_eager")(*_meta_mlp(8, 384, 1536))
    assert y.shape == (8, 384) and h.shape == (8, 1536) and mean.dtype == torch.float32

    def g(x, w, b, res, ls):
        return ops.linear_residual_fwd(x, w, b, res, ls, 2)

    y = torch.compile(g, fullgraph=True, backend="aot_eager")(_meta(8, 384), _meta(96, 384), _meta(96), _meta(8, 96),
                                                              _meta(96))
    assert y.shape == (8, 96) and y.dtype == torch.bfloat16


def _mlp_call(**over):
    args = dict(zip(["x", "ln_w", "ln_b", "w1", "b1", "w2", "b2", "ls"], _meta_mlp(4, 8, 16)))
    kw = {"approximate": "none", "save": False, "gelu_impl": 0, "ls_impl": 0}
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return lambda o: o.ln_mlp_fwd(*args.values(), EPS, kw["approximate"], kw["save"], kw["gelu_impl"], kw["ls_impl"])


def _lr_call(**over):
    args = {"x": _meta(4, 8), "w": _meta(6, 8), "b": _meta(6), "res": _meta(4, 6), "ls": _meta(6), "ls_impl": 0}
    args.update(over)
    return lambda o: o.linear_residual_fwd(*args.values())


# The .out overloads on the valid problems of _mlp_call / ln_linear [4, 8] -> [4, 6] / _lr_call; `outs` replace the
# correct outputs.
def _mlp_out(**outs):
    kw = {"y": _meta(4, 8), "pre": _meta(4, 16), "h": _meta(4, 16), "mean": _meta(4, dtype=torch.float32),
          "rstd": _meta(4, dtype=torch.float32)}
    kw.update(outs)
    return lambda o: o.ln_mlp_fwd.out(*_meta_mlp(4, 8, 16), EPS, "none", **kw)


def _linear_out(**outs):
    kw = {"y": _meta(4, 6), "mean": _meta(4, dtype=torch.float32), "rstd": _meta(4, dtype=torch.float32)}
    kw.update(outs)
    return lambda o: o.ln_linear_fwd.out(_meta(4, 8), None, None, _meta(6, 8), _meta(6), EPS, **kw)


def _lr_out(y):
    return lambda o: o.linear_residual_fwd.out(_meta(4, 8), _meta(6, 8), _meta(6), _meta(4, 6), _meta(6), y=y)


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
        (_lr_call(x=_meta(4, 8, dtype=torch.float64)),
         r"linear_residual_fwd: x must have dtype float16, bfloat16 or float32"),
        (_lr_call(x=_meta(4, 2, 8)), r"linear_residual_fwd: x must be 2-D"),
        (_lr_call(x=_meta(8, 4).t()), r"linear_residual_fwd: x must be contiguous in its last dim"),
        (_lr_call(x=_meta(4, 8).as_strided((4, 8), (0, 1))), r"linear_residual_fwd: x rows overlap"),
        (_lr_call(x=_meta(4, 0), w=_meta(6, 0)), r"linear_residual_fwd: x.size\(1\) \(in_features\) must be >= 1"),
        (_lr_call(w=_meta(0, 8), b=None, res=_meta(4, 0), ls=None),
         r"linear_residual_fwd: weight must have at least one row \(out_features\)"),
        (_lr_call(w=_meta(6, 9)), r"linear_residual_fwd: weight must have shape \[6, 8\], got \[6, 9\]"),
        (_lr_call(w=_meta(6, 8, dtype=torch.float16)), r"weight must have x's dtype bfloat16, got float16"),
        (_lr_call(w=_meta(8, 6).t()), r"linear_residual_fwd: weight must be contiguous in its last dim"),
        (_lr_call(b=_meta(5)), r"linear_residual_fwd: bias.size\(0\) must be 6, got 5"),
        (_lr_call(b=_meta(6, dtype=torch.float32)), r"bias must have x's dtype bfloat16, got float32"),
        (_lr_call(res=_meta(4, 7)), r"linear_residual_fwd: residual must have shape \[4, 6\], got \[4, 7\]"),
        (_lr_call(res=_meta(6)), r"linear_residual_fwd: residual must be 2-D"),
        (_lr_call(res=_meta(4, 6, dtype=torch.float32)), r"residual must have x's dtype bfloat16, got float32"),
        (_lr_call(res=_meta(6, 4).t()), r"linear_residual_fwd: residual must be contiguous in its last dim"),
        (_lr_call(res=_meta(1, 6).expand(4, 6)), r"linear_residual_fwd: residual rows overlap \(stride\(0\) 0 < 6\)"),
        (_lr_call(ls=_meta(7)), r"linear_residual_fwd: layer_scale.size\(0\) must be 6, got 7"),
        (_lr_call(ls=_meta(6, dtype=torch.float16)), r"layer_scale must have x's dtype bfloat16, got float16"),
        (_lr_call(ls=_meta(12)[::2]), r"linear_residual_fwd: layer_scale must be contiguous"),
        (_lr_call(ls_impl=3), r"ls_impl must be 0 \(auto\), 1 \(fold into the weight\) or 2 \(separate kernel\)"),
        (_mlp_out(y=_meta(4, 16)), r"ln_mlp_fwd: y must have shape \[4, 8\], got \[4, 16\]"),
        (_mlp_out(pre=None), r"ln_mlp_fwd: pre and h are saved together"),
        (_mlp_out(pre=_meta(4, 16, dtype=torch.float32)), r"ln_mlp_fwd: pre must have x's dtype bfloat16, got float32"),
        (_mlp_out(h=_meta(16, 4).t()), r"ln_mlp_fwd: h must be contiguous"),
        (_mlp_out(rstd=_meta(3, dtype=torch.float32)), r"ln_mlp_fwd: rstd must have shape \[4\], got \[3\]"),
        (_linear_out(y=_meta(4, 8)), r"ln_linear_fwd: y must have shape \[4, 6\], got \[4, 8\]"),
        (_linear_out(mean=_meta(4)), r"ln_linear_fwd: mean must have dtype float32, got bfloat16"),
        (_lr_out(_meta(4, 7)), r"linear_residual_fwd: y must have shape \[4, 6\], got \[4, 7\]"),
        (_lr_out(_meta(4, 6, dtype=torch.float16)),
         r"linear_residual_fwd: y must have x's dtype bfloat16, got float16"),
        (_lr_out(_meta(4, 8)[:, :6]), r"linear_residual_fwd: y must be contiguous"),
    ],
    ids=["x_dtype", "x_3d", "x_strided_cols", "x_overlapping_rows", "too_wide", "ln_weight_dtype", "ln_bias_size",
         "fc1_shape", "fc1_bias_size", "fc2_shape", "fc2_transposed", "ls_dtype", "approximate", "erf_epilogue",
         "gelu_impl", "ls_impl", "linear_no_rows", "linear_bias", "eps",
         "lr_x_dtype", "lr_x_3d", "lr_x_strided_cols", "lr_x_overlapping_rows", "lr_no_in_features",
         "lr_no_out_features", "lr_weight_shape", "lr_weight_dtype", "lr_weight_transposed", "lr_bias_size",
         "lr_bias_dtype", "lr_residual_shape", "lr_residual_1d", "lr_residual_dtype", "lr_residual_transposed",
         "lr_residual_broadcast", "lr_ls_size", "lr_ls_dtype", "lr_ls_strided", "lr_ls_impl",
         "mlp_out_y_shape", "mlp_out_h_without_pre", "mlp_out_pre_dtype", "mlp_out_h_transposed", "mlp_out_rstd_shape",
         "linear_out_y_shape", "linear_out_mean_dtype", "lr_out_y_shape", "lr_out_y_dtype", "lr_out_y_strided_rows"],
)
def test_checks_name_the_argument(ops, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(ops)


def test_no_cpu_kernel(ops):
    with pytest.raises(RuntimeError, match="CPU"):  # NotImplementedError from the dispatcher (a RuntimeError)
        ops.ln_linear_fwd(torch.zeros(2, 8), None, None, torch.zeros(4, 8), None, EPS)
    with pytest.raises(RuntimeError, match="CPU"):
        ops.linear_residual_fwd(torch.zeros(2, 8), torch.zeros(4, 8), None, torch.zeros(2, 4), None)


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


# ----------------------------------------------------------------------------------------------- GPU: linear_residual
LR_NAMES = ["x", "w", "b", "res", "ls"]
VIT_WIDTHS = [384, 768, 1024, 1280]  # ViT-S/B/L/H
LR_ROWS = [1, 394, 64 * 197]
LR_PARAMS = {"bias_ls": (True, True), "bias_nols": (True, False), "nobias_ls": (False, True),
             "nobias_nols": (False, False)}


def make_lr_inputs(rows, k, n, dtype, seed, bias=True, layer_scale=True, device="cuda"):
    """x [rows, k], weight [n, k] (scaled so x @ Wᵀ is O(1)), bias [n], residual [rows, n], layer scale [n]."""
    def r(shape, i, **kw):
        return randn(shape, dtype=dtype, device=device, seed=seed + i, **kw)

    return {
        "x": r((rows, k), 0),
        "w": r((n, k), 1, scale=k ** -0.5),
        "b": r((n,), 2, scale=0.5) if bias else None,
        "res": r((rows, n), 3),
        "ls": r((n,), 4, scale=0.5) if layer_scale else None,
    }


def linear_residual_reference(x, w, b, res, ls):
    """The unfused module chain (timm: x + ls1(attn.proj(o))): each step rounded to the dtype."""
    z = F.linear(x, w, b)
    return res + (z * ls if ls is not None else z)


def _lr_args(inputs):
    return [inputs[k] for k in LR_NAMES]


def _lr_impls(inputs):
    """Both layer-scale paths when there is a layer scale (auto picks one of them by M vs K); else the only path."""
    return ("fold", "kernel", "auto") if inputs["ls"] is not None else ("auto",)


def check_lr_forward(inputs, impls=None, baseline=None):
    """y of the CUDA forward (output poisoned first) against float64, once per layer-scale path; the bound's baseline
    is PyTorch's unfused chain in the inputs' dtype, or `baseline` (another backend's y)."""
    args = _lr_args(inputs)
    ref64 = linear_residual_reference(*(t.double() if t is not None else None for t in args))
    same = baseline if baseline is not None else linear_residual_reference(*args)
    ys = {}
    for impl in impls or _lr_impls(inputs):
        with poison_outputs():
            ys[impl] = _lr_backend().fused_forward(*args, layer_scale_impl=impl)
        assert ys[impl].shape == ref64.shape and ys[impl].dtype == inputs["x"].dtype and ys[impl].is_contiguous()
        assert_close(f"y (ls_impl={impl})", ys[impl], ref64, same)
    return ys


@pytest.mark.gpu
@pytest.mark.parametrize("params", list(LR_PARAMS))
@pytest.mark.parametrize("rows", LR_ROWS)
@pytest.mark.parametrize("d", VIT_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_linear_residual_forward_parity(cuda_ops, dtype, d, rows, params):
    """The attention proj of ViT-S/B/L/H (K = N = D) at 1 row, 2 images and 64 images of 197 tokens: auto folds the
    layer scale from M >= D on, so the sweep runs both paths through auto as well as forced."""
    bias, ls = LR_PARAMS[params]
    seed = seed_for("linear-residual-cuda-fwd", dtype, d, rows, params)
    inputs = make_lr_inputs(rows, d, d, dtype, seed, bias, ls)
    ys = check_lr_forward(inputs)
    if ls:  # auto is one of the two forced paths, bit for bit (never the fold in fp16: γ·W would underflow)
        forced = "fold" if rows >= d and dtype != torch.float16 else "kernel"
        torch.testing.assert_close(ys["auto"], ys[forced], atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("gamma", [1e-6, 1e-5])
def test_cuda_linear_residual_fp16_small_layer_scale(cuda_ops, gamma):
    """fp16 with a layer scale at its init size (DeiT III / CaiT) at M >= K, where auto would fold γ into W: γ·W
    (~1e-8) underflows fp16, so auto applies γ after the GEMM in fp32. The branch, γ·(x @ Wᵀ + b), is ~1e-6 here
    and invisible next to the residual: compared on its own (residual 0), bound 2 x the unfused fp16 chain's error
    + 1e-9 (fp16's atol would swamp values of this size)."""
    seed = seed_for("linear-residual-cuda-small-ls", gamma)
    inputs = make_lr_inputs(1024, 768, 768, torch.float16, seed)
    inputs["ls"] = randn((768,), dtype=torch.float16, device="cuda", seed=seed + 9, mean=gamma, scale=0.1 * gamma)
    inputs["res"] = torch.zeros_like(inputs["res"])
    args = _lr_args(inputs)
    ref64 = linear_residual_reference(*(t.double() if t is not None else None for t in args))
    with poison_outputs():
        y = _lr_backend().fused_forward(*args, layer_scale_impl="auto")
    assert_close("y (fp16, small layer scale)", y, ref64, linear_residual_reference(*args), Tolerance(k=2.0, atol=1e-9))


@pytest.mark.gpu
@pytest.mark.parametrize("params", ["bias_ls", "nobias_nols"])
@pytest.mark.parametrize("rows", LR_ROWS)
@pytest.mark.parametrize("d", VIT_WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_linear_residual_as_accurate_as_triton(cuda_ops, dtype, d, rows, params):
    """Same inputs through the Triton forward (one rounding in its epilogue): the CUDA forward's error, both
    layer-scale paths, is within the rule with the Triton forward's error as the baseline."""
    bias, ls = LR_PARAMS[params]
    seed = seed_for("linear-residual-cuda-vs-triton", dtype, d, rows, params)
    inputs = make_lr_inputs(rows, d, d, dtype, seed, bias, ls)
    with vitkern.use_backend("triton", op="linear_residual"), torch.no_grad():
        y_triton = torch.ops.vitkern.linear_residual_fwd(*_lr_args(inputs))
    check_lr_forward(inputs, baseline=y_triton)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(3072, 768), (768, 2304), (100, 300), (300, 100)],
                         ids=["fc2_shape", "qkv_shape", "odd_widen", "odd_narrow"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_linear_residual_rectangular(cuda_ops, dtype, k, n):
    """K != N (the MLP's fc2 shape, a widening GEMM) and odd widths: unaligned weight/residual rows (the scalar paths
    of the fold and residual kernels), partial tiles; rows below and above K (auto's switch)."""
    for rows in (37, 3100):
        seed = seed_for("linear-residual-cuda-rect", dtype, k, n, rows)
        check_lr_forward(make_lr_inputs(rows, k, n, dtype, seed))
        check_lr_forward(make_lr_inputs(rows, k, n, dtype, seed, bias=False))


def _strided(t, extra, off, seed):
    """t's values as a column slice of a wider matrix: row stride t.size(1) + extra, base offset `off` elements."""
    rows, cols = t.shape
    big = randn((rows, cols + extra), dtype=t.dtype, device=t.device, seed=seed)
    view = big[:, off:off + cols]
    view.copy_(t)
    assert view.stride() == (cols + extra, 1)
    return view


@pytest.mark.gpu
@pytest.mark.parametrize("operand", ["x", "w", "res", "all"])
@pytest.mark.parametrize("layout", ["row_stride_aligned", "row_stride_odd", "offset_1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_linear_residual_strided_rows(cuda_ops, dtype, layout, operand):
    """x (the GEMM's A), the weight (B; also the fold kernel's input) and the residual (C, or the residual kernel's
    input) as row-strided views passed straight to the C++ op (no copy): leading dimension = the row stride
    (8-aligned, odd, or a misaligned base pointer), both layer-scale paths, with and without bias."""
    rows, k, n = 50, 384, 192
    extra = {"row_stride_aligned": 8, "row_stride_odd": 3, "offset_1": 8}[layout]
    off = 1 if layout == "offset_1" else 0
    seed = seed_for("linear-residual-cuda-strided", dtype, layout, operand)
    for bias in (True, False):
        inputs = make_lr_inputs(rows, k, n, dtype, seed, bias=bias)
        for i, name in enumerate(("x", "w", "res")):
            if operand in (name, "all"):
                inputs[name] = _strided(inputs[name], extra, off, seed + 10 + i)
        args = _lr_args(inputs)
        ref64 = linear_residual_reference(*(t.double() if t is not None else None for t in args))
        same = linear_residual_reference(*args)
        for impl in ("fold", "kernel"):
            y = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
            cuda_ops.linear_residual_fwd.out(*args, LAYER_SCALE_IMPLS[impl], y=y)
            assert_close(f"y (ls_impl={impl}, bias={bias})", y, ref64, same)


class _CudaLinearResidual(torch.autograd.Function):
    """Forward: the CUDA backend's whole-op forward; backward: the op's own backward (vitkern::linear_residual_bwd,
    default dispatch: Triton on a GPU, since the CUDA backend rejects backward problems; it needs only the inputs) —
    what autograd runs after a CUDA forward. The residual's gradient is dy itself."""

    @staticmethod
    def forward(ctx, x, w, b, res, ls, ls_impl):
        y = _lr_backend().fused_forward(x, w, b, res, ls, layer_scale_impl=ls_impl)
        ctx.save_for_backward(x, w, b, ls)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, ls = ctx.saved_tensors
        dx, dw, db, dls = torch.ops.vitkern.linear_residual_bwd(dy.contiguous(), x, w, b, ls)
        need = ctx.needs_input_grad
        grads = (dx, dw, db, dy, dls)
        return tuple(g if need[i] and g.numel() else None for i, g in enumerate(grads)) + (None,)


def cuda_linear_residual(ls_impl="auto"):
    def fn(x, w, b, res, ls):
        return _CudaLinearResidual.apply(x, w, b, res, ls, ls_impl)

    return fn


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["vit_b_fold", "vit_b_kernel", "nobias_nols", "fc2_shape", "odd_fold"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_linear_residual_forward_backward(cuda_ops, dtype, case):
    """Training: CUDA forward, the op's Triton backward; y and every gradient (x, weight, bias, residual, layer
    scale) against float64."""
    rows, k, n, bias, ls, impl = {
        "vit_b_fold": (197, 768, 768, True, True, "fold"),
        "vit_b_kernel": (197, 768, 768, True, True, "kernel"),
        "nobias_nols": (394, 384, 384, False, False, "auto"),
        "fc2_shape": (394, 1536, 384, True, True, "auto"),  # M < K: auto takes the kernel path
        "odd_fold": (197, 100, 300, True, True, "fold"),
    }[case]
    seed = seed_for("linear-residual-cuda-fwd-bwd", dtype, case)
    inputs = make_lr_inputs(rows, k, n, dtype, seed, bias, ls)
    grads = [name for name, v in inputs.items() if v is not None]
    check_forward_backward(cuda_linear_residual(impl), linear_residual_reference, inputs, grads, seed=seed)


@pytest.mark.gpu
def test_cuda_linear_residual_x_as_residual(cuda_ops):
    """x read both as the GEMM's A and as the residual (allowed: both are inputs; only y must be separate)."""
    inputs = make_lr_inputs(394, 384, 384, torch.bfloat16, seed_for("linear-residual-cuda-x-res"))
    inputs["res"] = inputs["x"]
    check_lr_forward(inputs)


@pytest.mark.gpu
def test_cuda_linear_residual_is_deterministic_and_uses_the_current_stream(cuda_ops):
    inputs = make_lr_inputs(2000, 768, 768, torch.bfloat16, seed_for("linear-residual-cuda-det"))
    for impl in ("fold", "kernel"):
        runs = [_lr_backend().fused_forward(*_lr_args(inputs), layer_scale_impl=impl) for _ in range(2)]
        assert torch.equal(*runs)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            on_side = _lr_backend().fused_forward(*_lr_args(inputs), layer_scale_impl=impl)
        s.synchronize()
        assert torch.equal(runs[0], on_side)


@pytest.mark.gpu
def test_cuda_linear_residual_empty_and_bad_inputs(cuda_ops):
    """M = 0 returns an empty y; the checks that need CUDA tensors (devices, the .out variant's y, memory overlap)
    name the argument."""
    args = _lr_args(make_lr_inputs(0, 192, 96, torch.bfloat16, seed_for("linear-residual-cuda-empty")))
    assert cuda_ops.linear_residual_fwd(*args).shape == (0, 96)
    assert _lr_backend().fused_forward(*args).shape == (0, 96)
    y = torch.empty(0, 96, dtype=torch.bfloat16, device="cuda")
    cuda_ops.linear_residual_fwd.out(*args, y=y)

    inputs = make_lr_inputs(4, 192, 192, torch.bfloat16, seed_for("linear-residual-cuda-bad"))
    x, w, b, res, ls = _lr_args(inputs)
    x0, res0 = x.clone(), res.clone()
    op = "vitkern_C::linear_residual_fwd: "

    def out(**kw):
        a = {"x": x, "w": w, "b": b, "res": res, "ls": ls, "ls_impl": 0, "y": torch.empty_like(res)} | kw
        y = a.pop("y")
        return lambda: cuda_ops.linear_residual_fwd.out(*a.values(), y=y)

    cases = [
        (lambda: cuda_ops.linear_residual_fwd(x.cpu(), w, b, res, ls),
         "x must be a CUDA tensor, got a tensor on cpu"),
        (lambda: cuda_ops.linear_residual_fwd(x, w, b.cpu(), res, ls),
         "bias must be a CUDA tensor, got a tensor on cpu"),
        (lambda: cuda_ops.linear_residual_fwd(x, w, b, res.cpu(), ls),
         "residual must be a CUDA tensor, got a tensor on cpu"),
        (lambda: cuda_ops.linear_residual_fwd(x, w, b, res, ls.cpu()),
         "layer_scale must be a CUDA tensor, got a tensor on cpu"),
        (lambda: cuda_ops.linear_residual_fwd(x, w, b, res, ls, 5), "ls_impl must be 0 (auto)"),
        (out(y=torch.empty(4, 192, dtype=torch.bfloat16)), "y must be a CUDA tensor, got a tensor on cpu"),
        (out(y=torch.empty(4, 191, dtype=torch.bfloat16, device="cuda")), "y must have shape [4, 192], got [4, 191]"),
        (out(y=torch.empty(4, 192, dtype=torch.float16, device="cuda")), "y must have x's dtype bfloat16, got float16"),
        (out(y=torch.empty(192, 4, dtype=torch.bfloat16, device="cuda").t()), "y must be contiguous"),
        (out(y=res), "y (written) and residual (read) share memory"),
        (out(y=x), "y (written) and x (read) share memory"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError) as info:
            call()
        assert op + match in str(info.value), (match, str(info.value))
    # nothing was written (the overlap checks run before any launch)
    torch.testing.assert_close(res, res0, atol=0, rtol=0)
    torch.testing.assert_close(x, x0, atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_ln_mlp_out_refuses_aliased_outputs(cuda_ops):
    """The .out overloads write y, pre and h while reading x (restrict pointers): any two of them sharing memory is
    refused with both names, before anything is written."""
    m, d, hidden = 4, 64, 128
    g = torch.Generator(device="cuda").manual_seed(seed_for("ln-mlp-cuda-aliasing"))

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    params = (rand(d), rand(d), rand(hidden, d), rand(hidden), rand(d, hidden), rand(d), rand(d))
    buf = rand(m * hidden)  # contiguous views of one storage: x / y [m, d] overlap pre / h [m, hidden]
    x, y, pre, h = rand(m, d), rand(m, d), rand(m, hidden), rand(m, hidden)
    small, big = buf[: m * d].view(m, d), buf.view(m, hidden)
    stats = [torch.empty(m, device="cuda", dtype=torch.float32) for _ in range(2)]

    def mlp(x=x, **outs):
        kw = {"y": y, "pre": pre, "h": h, "mean": stats[0], "rstd": stats[1]} | outs
        return lambda: cuda_ops.ln_mlp_fwd.out(x, *params, EPS, "none", **kw)

    cases = [
        (mlp(x=small, pre=big), "ln_mlp_fwd: pre (written) and x (read) share memory"),
        (mlp(x=small, h=big), "ln_mlp_fwd: h (written) and x (read) share memory"),
        (mlp(y=small, pre=big), "ln_mlp_fwd: y (written) and pre (read) share memory"),
        (mlp(y=small, h=big), "ln_mlp_fwd: y (written) and h (read) share memory"),
        (mlp(pre=big, h=big), "ln_mlp_fwd: h (written) and pre (read) share memory"),
        (lambda: cuda_ops.ln_linear_fwd.out(x, params[0], params[1], rand(d, d), None, EPS, y=x, mean=stats[0],
                                            rstd=stats[1]), "ln_linear_fwd: y (written) and x (read) share memory"),
    ]
    before = buf.clone()
    for call, match in cases:
        with pytest.raises(RuntimeError) as info:
            call()
        assert "vitkern_C::" + match in str(info.value), (match, str(info.value))
    torch.testing.assert_close(buf, before, atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_linear_residual_torch_compile_and_opcheck(cuda_ops):
    inputs = make_lr_inputs(394, 384, 384, torch.bfloat16, seed_for("linear-residual-cuda-compile"))

    def f(*args):
        return cuda_ops.linear_residual_fwd(*args, 2)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*_lr_args(inputs)), f(*_lr_args(inputs)), atol=0,
                               rtol=0)
    torch.library.opcheck(cuda_ops.linear_residual_fwd.default, tuple(_lr_args(inputs)))
    torch.library.opcheck(cuda_ops.linear_residual_fwd.default,
                          (inputs["x"], inputs["w"], None, inputs["res"], None, 1))


@pytest.mark.gpu
def test_gpu_linear_residual_dispatch_through_the_op(cuda_ops):
    """Through vitkern.functional.linear_residual: the CUDA forward (strict) via the op's fused_forward routing;
    training falls back to the Triton backward (strict=False)."""
    from vitkern.functional.linear_residual import linear_residual

    inputs = make_lr_inputs(394, 768, 768, torch.bfloat16, seed_for("linear-residual-cuda-dispatch"))
    choice = vitkern.explain("linear_residual", *_lr_args(inputs))
    assert "cuda: supported, lower preference" in str(choice), str(choice)  # ranked after Triton until measured
    with vitkern.use_backend("cuda", op="linear_residual"), torch.no_grad():
        y = linear_residual(*_lr_args(inputs))
    torch.testing.assert_close(y, check_lr_forward(inputs, impls=("auto",))["auto"], atol=0, rtol=0)

    def kernel(**a):
        with vitkern.use_backend("cuda", op="linear_residual", strict=False):
            return linear_residual(*(a[k] for k in LR_NAMES))

    seed = seed_for("linear-residual-cuda-dispatch-grad")
    check_forward_backward(kernel, linear_residual_reference, inputs, LR_NAMES, seed=seed)


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
        # linear_residual: x [m, d] @ fc1_weightᵀ + fc1_bias, strided residual [m, hidden]
        res = torch.randn(m, hidden + off, device="cuda", dtype=dtype)[:, off:]
        ls_h = torch.randn(hidden, device="cuda", dtype=dtype) * 0.1
        for ls_impl in (1, 2):
            ops.linear_residual_fwd(x, p[2], p[3], res, ls_h, ls_impl)
            ops.linear_residual_fwd(x, p[2], None, res, ls_h, ls_impl)
        ops.linear_residual_fwd(x, p[2], None, res, None)
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("sanitizer_tool, clean", [("memcheck", "ERROR SUMMARY: 0 errors"),
                                                   ("synccheck", "ERROR SUMMARY: 0 errors")])
def test_compute_sanitizer(cuda_ops, sanitizer_tool, clean):
    run_under_sanitizer(sanitizer_tool, SANITIZER_SCRIPT, clean)
