"""The CUDA C++ LayerNorm backend (csrc/ops/layer_norm.cu, vitkern/ops/layer_norm_cuda.py).

* CPU, always: the backend reports itself unavailable with a reason and ``vitkern.explain`` lists it.
* CPU, when vitkern._C is built (``bash scripts/build_csrc.sh --inplace``): the op schemas exist, the Meta kernels give
  the contract's shapes and dtypes, the input checks name the argument,
  ``torch.compile(fullgraph=True, backend="aot_eager")`` on meta tensors (``torch.library.opcheck`` runs on the GPU:
  it checks nothing on meta inputs).
* GPU (``@pytest.mark.gpu``; skipped with the reason when the extension cannot run): parity against float64 with
  ``vitkern.testing.check_forward_backward`` (its rule: err <= 2 x PyTorch's error in the same dtype + atol(dtype) x
  scale), against the Triton backend, the scalar (unaligned / strided) path, determinism, and compute-sanitizer
  (memcheck, racecheck, synccheck; slow).

Forcing: ``use_backend`` is a ContextVar, which the autograd engine's CUDA worker thread may not see (backward runs
there), so GPU tests also set ``VITKERN_BACKEND=layer_norm=cuda`` (process-wide) and count the backend's calls.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import vitkern
from test_layer_norm import grad_names, make_inputs, reference, vitkern_ln  # shared LayerNorm test helpers
from vitkern._extension import extension_status
from vitkern.ops.layer_norm_cuda import CUDA_MAX_N, LayerNormCuda
from vitkern.testing.sanitizer import run_under_sanitizer
from vitkern.testing import check_forward_backward, randn, seed_for
from vitkern.testing.numerics import assert_close

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _backend() -> LayerNormCuda:
    return vitkern.dispatch.backends("layer_norm")["cuda"]


# ----------------------------------------------------------------------------------------------- CPU: status
def test_backend_registered_after_triton():
    table = vitkern.dispatch.backends("layer_norm")
    assert isinstance(table["cuda"], LayerNormCuda)
    # unmeasured: must not be the default on CUDA until committed benchmark numbers say it is faster
    assert table["cuda"].cuda_rank > table["triton"].cuda_rank


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU status; this machine has a GPU")
def test_unavailable_without_gpu_with_reason():
    reason = _backend().availability()
    assert reason and "CUDA extension" in reason
    st = extension_status()
    assert (st.reason in reason) and not st.can_run
    choice = vitkern.explain(vitkern.functional.layer_norm, torch.randn(3, 192), 192)
    assert choice.backend_name == "reference"
    text = str(choice)
    assert "cuda: rejected: " + reason in text, text


def test_rejects_what_the_kernels_cannot_run():
    b = _backend()
    p = vitkern.dispatch.Problem(
        "layer_norm", "forward", "cpu", torch.float64, (("x", (4, CUDA_MAX_N + 1)),),
        (("weight_dtype", torch.float16), ("unit_col_stride", False)),
    )
    reasons = " | ".join(b.reject_reasons(p))
    for part in ("device 'cpu'", "float64", f"row width {CUDA_MAX_N + 1} > {CUDA_MAX_N}", "not contiguous",
                 "neither x's dtype nor float32"):
        assert part in reasons, reasons


# ----------------------------------------------------------------------------------------------- CPU: the built extension
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_schemas_exist(ops):
    for name, overloads in (("layer_norm_fwd", {"default", "out"}), ("layer_norm_bwd", {"default", "out"})):
        assert overloads <= set(getattr(ops, name).overloads()), name


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32, None])
def test_meta_shapes(ops, residual, param_dtype):
    m, n = 394, 768
    x = _meta(m, n)
    w = _meta(n, dtype=param_dtype) if param_dtype else None
    y, s, mean, rstd = ops.layer_norm_fwd(x, w, w, _meta(m, n) if residual else None, 1e-6)
    assert (y.shape, y.dtype, y.device.type) == ((m, n), torch.bfloat16, "meta")
    assert s.shape == ((m, n) if residual else (0,)) and s.dtype == torch.bfloat16
    assert mean.shape == rstd.shape == (m,) and mean.dtype == rstd.dtype == torch.float32
    stats = _meta(m, dtype=torch.float32)
    # .out: y as a row-strided view (only a unit column stride is required)
    ops.layer_norm_fwd.out(x, w, w, _meta(m, n) if residual else None, 1e-6, y=_meta(m, n + 64)[:, :n],
                           sum=_meta(m, n) if residual else None, mean=stats, rstd=stats)
    for need_dw, need_db in ((True, True), (False, True), (True, False)):
        dx, dw, db = ops.layer_norm_bwd(x, x if residual else None, x, w, stats, stats, need_dw, need_db)
        assert dx.shape == (m, n) and dx.dtype == torch.bfloat16
        assert dw.shape == ((n,) if need_dw else (0,)) and dw.dtype == torch.float32
        assert db.shape == ((n,) if need_db else (0,)) and db.dtype == torch.float32
        # .out writes dx into the caller's tensor and allocates dweight / dbias like the functional form
        dw_out, db_out = ops.layer_norm_bwd.out(x, x if residual else None, x, w, stats, stats, need_dw, need_db,
                                                dx=_meta(m, n))
        for got, want in ((dw_out, dw), (db_out, db)):
            assert (got.shape, got.dtype, got.device.type) == (want.shape, torch.float32, "meta")


def test_meta_torch_compile(ops):
    def f(x, w, b, r):
        y, s, mean, rstd = ops.layer_norm_fwd(x, w, b, r, 1e-6)
        return y, s, mean

    x, w = _meta(8, 384), _meta(384)
    y, s, mean = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, w, _meta(8, 384))
    assert y.shape == s.shape == (8, 384) and mean.shape == (8,) and mean.dtype == torch.float32


def _fwd_out(**outs):
    """layer_norm_fwd.out on a valid [4, 8] problem with a residual; `outs` replace the correct outputs."""
    kw = {"y": _meta(4, 8), "sum": _meta(4, 8), "mean": _meta(4, dtype=torch.float32),
          "rstd": _meta(4, dtype=torch.float32)}
    kw.update(outs)
    return lambda o: o.layer_norm_fwd.out(_meta(4, 8), _meta(8, dtype=torch.float32), None, _meta(4, 8), 1e-5, **kw)


def _bwd_out(dx):
    stats = _meta(4, dtype=torch.float32)
    return lambda o: o.layer_norm_bwd.out(_meta(4, 8), None, _meta(4, 8), None, stats, stats, True, True, dx=dx)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda o: o.layer_norm_fwd(_meta(4, 8, dtype=torch.float64), None, None, None, 1e-5),
         r"layer_norm_fwd: x must have dtype float16, bfloat16 or float32, got Double"),
        (lambda o: o.layer_norm_fwd(_meta(4, 8), _meta(8, dtype=torch.float16), None, None, 1e-5),
         r"weight must have dtype bfloat16 or float32, got float16"),
        (lambda o: o.layer_norm_fwd(_meta(4, 8), _meta(8, dtype=torch.float32), _meta(8), None, 1e-5),
         r"weight and bias must have the same dtype, got float32 and bfloat16"),
        (lambda o: o.layer_norm_fwd(_meta(4, 8), _meta(7), None, None, 1e-5), r"weight.size\(0\) must be 8, got 7"),
        (lambda o: o.layer_norm_fwd(_meta(4, 8), None, None, _meta(4, 9), 1e-5),
         r"residual must have shape \[4, 8\], got \[4, 9\]"),
        (lambda o: o.layer_norm_fwd(_meta(8, 4).t(), None, None, None, 1e-5), r"x must be contiguous in its last dim"),
        (lambda o: o.layer_norm_fwd(_meta(2, 3, 8), None, None, None, 1e-5), r"x must be 2-D"),
        (lambda o: o.layer_norm_fwd(_meta(2, CUDA_MAX_N + 8), None, None, None, 1e-5),
         rf"row width\) must be in \[1, {CUDA_MAX_N}\], got {CUDA_MAX_N + 8}"),
        (lambda o: o.layer_norm_fwd(_meta(2, 8), None, None, None, -1.0), r"eps must be >= 0"),
        (lambda o: o.layer_norm_bwd(_meta(4, 8), None, _meta(4, 8), None, _meta(3, dtype=torch.float32),
                                    _meta(4, dtype=torch.float32), True, True), r"mean must have shape \[4\], got \[3\]"),
        (lambda o: o.layer_norm_bwd(_meta(4, 8, dtype=torch.float16), None, _meta(4, 8), None,
                                    _meta(4, dtype=torch.float32), _meta(4, dtype=torch.float32), True, True),
         r"layer_norm_bwd: dy must have dtype bfloat16, got float16"),
        (_fwd_out(y=_meta(4, 9)), r"layer_norm_fwd: y must have shape \[4, 8\], got \[4, 9\]"),
        (_fwd_out(y=_meta(8, 4).t()), r"layer_norm_fwd: y must be contiguous in its last dim"),
        (_fwd_out(sum=None), r"layer_norm_fwd: sum must be given exactly when residual is"),
        (_fwd_out(mean=_meta(4)), r"layer_norm_fwd: mean must have dtype float32, got bfloat16"),
        (_fwd_out(rstd=_meta(8, dtype=torch.float32)[::2]), r"layer_norm_fwd: rstd must be contiguous"),
        (_bwd_out(_meta(4, 8, dtype=torch.float32)), r"layer_norm_bwd: dx must have dtype bfloat16, got float32"),
        (_bwd_out(_meta(3, 8)), r"layer_norm_bwd: dx must have shape \[4, 8\], got \[3, 8\]"),
    ],
    ids=["x_dtype", "weight_dtype", "param_mismatch", "weight_size", "residual_shape", "strided_cols", "x_3d",
         "too_wide", "eps", "stats_shape", "dy_dtype", "out_y_shape", "out_y_strided_cols", "out_sum_missing",
         "out_mean_dtype", "out_rstd_strided", "out_dx_dtype", "out_dx_shape"],
)
def test_checks_name_the_argument(ops, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(ops)


def test_no_cpu_kernel(ops):
    with pytest.raises(RuntimeError, match="CPU"):  # NotImplementedError from the dispatcher (a RuntimeError)
        ops.layer_norm_fwd(torch.zeros(2, 8), None, None, None, 1e-5)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def force_cuda(cuda_ops, monkeypatch):
    """Force the cuda backend for forward and backward; yields the call counts of each direction."""
    calls = {"forward": 0, "backward": 0}
    b = _backend()
    fwd, bwd = type(b).forward, type(b).backward

    def counted(direction, fn):
        def wrapper(self, *args):
            calls[direction] += 1
            return fn(self, *args)

        return wrapper

    monkeypatch.setattr(type(b), "forward", counted("forward", fwd))
    monkeypatch.setattr(type(b), "backward", counted("backward", bwd))
    monkeypatch.setenv("VITKERN_BACKEND", "layer_norm=cuda")
    with vitkern.use_backend("cuda", op="layer_norm"):
        yield calls


def run_cuda_parity(rows, width, dtype, residual, calls, **kw):
    seed = seed_for("ln-cuda", rows, width, dtype, residual, tuple(sorted(kw.items())))
    inputs = make_inputs(rows, width, dtype, "cuda", residual, seed, **kw)
    before = dict(calls)
    report = check_forward_backward(vitkern_ln, reference, inputs, grad_names(inputs), seed=seed)
    assert calls["forward"] > before["forward"] and calls["backward"] > before["backward"], calls
    return report


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", [1, 3, 394, 256 * 197])
@pytest.mark.parametrize("width", [192, 384, 768, 1000, 1024, 1280, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_parity(force_cuda, dtype, width, rows, residual):
    run_cuda_parity(rows, width, dtype, residual, force_cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1, 7, 100, 1001, 2000, 3000, 8192])  # odd widths: scalar path; multi-warp rows
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_parity_other_widths(force_cuda, dtype, width):
    run_cuda_parity(37, width, dtype, True, force_cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fp32_params", "no_affine", "weight_only", "bias_only_fp32", "mixed_params"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_param_variants(force_cuda, dtype, variant):
    seed = seed_for("ln-cuda-variants", dtype, variant)
    inputs = make_inputs(394, 768, dtype, "cuda", True, seed, affine=variant != "no_affine",
                         param_dtype=torch.float32 if variant in ("fp32_params", "bias_only_fp32") else None)
    if variant == "weight_only":
        inputs["bias"] = None
    if variant == "bias_only_fp32":
        inputs["weight"] = None
    if variant == "mixed_params":  # weight in x's dtype, bias fp32: the backend upcasts the weight (exactly)
        inputs["bias"] = inputs["bias"].float()
    check_forward_backward(vitkern_ln, reference, inputs, grad_names(inputs), seed=seed)
    assert force_cuda["forward"] and force_cuda["backward"]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["offset_1", "row_stride_odd", "column_slice_fallback", "3d_batch_slice"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_misaligned_and_strided_rows(force_cuda, dtype, layout):
    """Views whose base pointer / row stride break 16-byte alignment take the scalar path; strided columns are
    made contiguous by the functional. Views are built inside the function so gradients land on the leaf."""
    width, rows = 768, 50
    seed = seed_for("ln-cuda-strided", dtype, layout)
    extra = {"offset_1": 8, "row_stride_odd": 3, "column_slice_fallback": width, "3d_batch_slice": 0}[layout]
    big = randn((rows, width + extra), dtype=dtype, device="cuda", seed=seed)
    if layout == "3d_batch_slice":
        big = randn((4, rows, width), dtype=dtype, device="cuda", seed=seed)
    view = {
        "offset_1": lambda t: t[:, 1:1 + width],  # base pointer off by one element, row stride width + 8
        "row_stride_odd": lambda t: t[:, :width],  # row stride width + 3: not a multiple of the pack
        "column_slice_fallback": lambda t: t[:, ::2],  # stride(1) == 2: copied to unit stride by the functional
        "3d_batch_slice": lambda t: t[::2],  # rows not uniformly strided: reshaped (copied)
    }[layout]
    params = make_inputs(1, width, dtype, "cuda", False, seed + 7)
    inputs = {"x": big, "weight": params["weight"], "bias": params["bias"],
              "residual": randn(tuple(big.shape), dtype=dtype, device="cuda", seed=seed + 9)}

    def kernel(x, weight, bias, residual):
        return vitkern_ln(view(x), weight, bias, view(residual))

    def ref(x, weight, bias, residual):
        return reference(view(x), weight, bias, view(residual))

    check_forward_backward(kernel, ref, inputs, ["x", "weight", "bias", "residual"], seed=seed)


@pytest.mark.gpu
def test_cuda_large_mean_is_stable(force_cuda):
    """|mean|/std = 100: the two-pass variance from registers keeps the digits a one-pass E[x²]-E[x]² would lose."""
    run_cuda_parity(4096, 768, torch.float32, False, force_cuda, mean=100.0)
    run_cuda_parity(4096, 1280, torch.bfloat16, True, force_cuda, mean=100.0)


@contextlib.contextmanager
def _forced(name):
    old = os.environ.get("VITKERN_BACKEND")
    os.environ["VITKERN_BACKEND"] = f"layer_norm={name}"
    try:
        with vitkern.use_backend(name, op="layer_norm"):
            yield
    finally:
        if old is None:
            os.environ.pop("VITKERN_BACKEND", None)
        else:
            os.environ["VITKERN_BACKEND"] = old


def _fwd_bwd(backend, inputs, dy, ds, dtype=None):
    """y, sum and the gradients of x, weight, bias, residual; backend None: plain PyTorch (in `dtype`)."""
    leaves = {k: v.detach().to(dtype or v.dtype).clone().requires_grad_() for k, v in inputs.items() if v is not None}
    with _forced(backend) if backend else contextlib.nullcontext():
        y, s = (vitkern_ln if backend else reference)(**leaves)
        torch.autograd.backward([y, s], [dy.to(y.dtype), ds.to(s.dtype)])
    return [y.detach(), s.detach()] + [leaves[k].grad for k in ("x", "weight", "bias", "residual")]


@pytest.mark.gpu
@pytest.mark.parametrize("width", [384, 768, 1280])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_as_accurate_as_triton(cuda_ops, dtype, width):
    """Against float64, the CUDA backend's error is within vitkern.testing's rule with the Triton backend as the
    baseline (err <= 2 x Triton's error + atol(dtype) x scale), for the outputs and every gradient."""
    seed = seed_for("ln-cuda-vs-triton", dtype, width)
    inputs = make_inputs(2 * 197, width, dtype, "cuda", True, seed)
    dy = randn((2 * 197, width), dtype=dtype, device="cuda", seed=seed + 11)
    ds = randn((2 * 197, width), dtype=dtype, device="cuda", seed=seed + 12)
    got, triton = _fwd_bwd("cuda", inputs, dy, ds), _fwd_bwd("triton", inputs, dy, ds)
    ref64 = _fwd_bwd(None, inputs, dy, ds, dtype=torch.float64)
    for name, a, t, r in zip(["y", "sum", "dx", "dweight", "dbias", "dresidual"], got, triton, ref64):
        assert_close(name, a.cpu(), r.cpu(), t.cpu())
    assert torch.equal(got[1], triton[1])  # the sum is one rounding of x + r in both


@pytest.mark.gpu
@pytest.mark.parametrize("width", [768, 4096])
def test_cuda_backward_is_deterministic(force_cuda, width):
    seed = seed_for("ln-cuda-det", width)
    inputs = make_inputs(256 * 197, width, torch.bfloat16, "cuda", True, seed)
    dy = randn((256 * 197, width), dtype=torch.bfloat16, device="cuda", seed=seed + 1)
    ds = randn((256 * 197, width), dtype=torch.bfloat16, device="cuda", seed=seed + 2)
    runs = [_fwd_bwd("cuda", inputs, dy, ds) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.gpu
def test_cuda_empty_and_device_checks(cuda_ops):
    x = torch.randn(0, 768, device="cuda", dtype=torch.bfloat16)
    y, s, mean, rstd = cuda_ops.layer_norm_fwd(x, None, None, None, 1e-6)
    assert y.shape == (0, 768) and s.shape == (0,) and mean.shape == (0,)
    dx, dw, db = cuda_ops.layer_norm_bwd(x, None, x, None, mean, rstd, True, True)
    assert dx.shape == (0, 768) and torch.equal(dw, torch.zeros(768, device="cuda"))
    with pytest.raises(RuntimeError, match="weight must be a CUDA tensor, got a tensor on cpu"):
        cuda_ops.layer_norm_fwd(torch.randn(4, 8, device="cuda"), torch.randn(8), None, None, 1e-5)


@pytest.mark.gpu
def test_gpu_dispatch_lists_cuda_after_triton(cuda_ops):
    x = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16)
    choice = vitkern.explain("layer_norm", x, 768)
    assert choice.backend_name == "triton", str(choice)  # until the GPU session commits numbers and flips the rank
    assert "cuda: supported, lower preference" in str(choice)


@pytest.mark.gpu
def test_cuda_ops_torch_compile_and_opcheck(cuda_ops):
    x = torch.randn(394, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, device="cuda", dtype=torch.float32)
    r = torch.randn_like(x)

    def f(x, w, r):
        return cuda_ops.layer_norm_fwd(x, w, w, r, 1e-6)[0]

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, w, r), f(x, w, r), atol=0, rtol=0)
    stats = torch.rand(394, device="cuda") + 0.5
    torch.library.opcheck(cuda_ops.layer_norm_fwd.default, (x, w, w, r, 1e-6))
    torch.library.opcheck(cuda_ops.layer_norm_fwd.default, (x, None, None, None, 1e-6))
    torch.library.opcheck(cuda_ops.layer_norm_bwd.default, (x, x, x, w, stats, stats, True, True))


# the body of a vitkern.testing.sanitizer.workload (which loads the extension as `ops`)
SANITIZER_SCRIPT = r"""
for dtype in (torch.bfloat16, torch.float32):
    for m, n, off in ((5, 768, 0), (3, 1000, 1), (2, 4096, 0), (7, 100, 0), (1, 8192, 3)):
        base = torch.randn(m, n + off, device="cuda", dtype=dtype)
        x = base[:, off:]  # off > 0: misaligned rows, scalar path
        r = torch.randn_like(x)
        w = torch.randn(n, device="cuda", dtype=torch.float32)
        y, s, mean, rstd = ops.layer_norm_fwd(x, w, w, r, 1e-6)
        dx, dw, db = ops.layer_norm_bwd(torch.randn_like(y), torch.randn_like(y), s, w, mean, rstd, True, True)
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    "sanitizer_tool, clean",
    [
        ("memcheck", "ERROR SUMMARY: 0 errors"),  # out-of-bounds / misaligned accesses
        ("racecheck", "RACECHECK SUMMARY: 0 hazards"),  # the shared-memory row and partial reductions
        ("synccheck", "ERROR SUMMARY: 0 errors"),  # every thread reaches every __syncthreads
    ],
)
def test_compute_sanitizer(cuda_ops, sanitizer_tool, clean):
    run_under_sanitizer(sanitizer_tool, SANITIZER_SCRIPT, clean)
