"""The CUDA C++ shifted-window attention forward (csrc/ops/window_attention.cu(h), vitkern/ops/window_attention_cuda.py).

* CPU, always: registered after Triton, unavailable with a reason without the extension / a GPU, rejects what the
  kernel cannot run and every backward problem (the backward runs on Triton).
* CPU, when vitkern._C is built: schemas, Meta shapes (padded maps: the window count), C++ input checks naming the
  argument, no CPU kernel (opcheck: on the GPU).
* GPU (``@pytest.mark.gpu``): parity against float64 with vitkern.testing's rule through the op and autograd (CUDA
  forward, Triton backward on the CUDA forward's lse) for windows 7 and 12 (shifted, unshifted, padded, timm's
  roll-then-pad and torchvision's pad_first), ws 16 (N = 256), non-square windows, no qkv bias, a -inf mask, every
  head dim; the Swin stage shapes and the reference Swin block; out/lse against the Triton backend; determinism;
  dispatch and explain. compute-sanitizer runs on this kernel in tests/test_attention_cuda.py (one workload for
  both kernels).

Forcing: strict=False (backward problems fall to Triton by design) plus call counts, so a silent fallback fails.
"""

from __future__ import annotations

import pytest
import torch

import vitkern
from test_window_attention import (  # shared Swin test helpers
    GRADS, SWIN_STAGES, _BlockAttnPath, _block_reference, _functional_case, _params, check_functional, make_case,
)
from vitkern.functional.window_attention import window_attention
from vitkern.nn.window_attention import ShiftedWindowAttention
from vitkern.ops import window_attention as wa_op
from vitkern.backends.cuda_common import BACKWARD_REASON
from vitkern.ops.attention_cuda import CUDA_HEAD_DIMS
from vitkern.ops.window_attention_cuda import WindowAttentionCuda, window_smem_bytes
from vitkern.reference import swin as ref_swin
from vitkern.testing.backends import check_ran, cuda_forward_triton_backward
from vitkern.testing import Tolerance, check_forward_backward, materialize, poison_outputs, seed_for
from vitkern.testing.numerics import assert_close

OP = "window_attention"
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]


def _backend() -> WindowAttentionCuda:
    return vitkern.dispatch.backends(OP)["cuda"]


def _problem(direction="forward", device="cuda", dtype=torch.bfloat16, qkv=(2, 56, 56, 288), window=(7, 7),
             head_dim=32, contiguous=True):
    heads = qkv[-1] // (3 * head_dim)
    table = ((2 * window[0] - 1) * (2 * window[1] - 1), heads)
    attrs = (("window", window), ("shift", (3, 3)), ("heads", heads), ("head_dim", head_dim),
             ("contiguous", contiguous))
    return vitkern.dispatch.Problem(OP, direction, device, dtype, (("qkv", qkv), ("table", table)), attrs)


# ----------------------------------------------------------------------------------------------- CPU: status
def test_backend_registered_after_triton():
    table = vitkern.dispatch.backends(OP)
    assert isinstance(table["cuda"], WindowAttentionCuda)
    assert table["cuda"].cuda_rank > table["triton"].cuda_rank  # unmeasured: not the default until numbers exist


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU status; this machine has a GPU")
def test_unavailable_without_gpu_with_reason():
    reason = _backend().availability()
    assert reason and "CUDA extension" in reason
    inputs, _ = _functional_case(1, (14, 14), (7, 7), (3, 3), 2, 32, torch.float32, "cpu")
    choice = vitkern.explain(window_attention, inputs["qkv"], inputs["table"], 2, 7, 3)
    assert choice.backend_name == "reference"
    assert "cuda: rejected: " + reason in str(choice), str(choice)


def test_rejects_what_the_kernel_cannot_run():
    p = _problem(device="cpu", dtype=torch.float32, qkv=(0, 17, 17, 48), window=(17, 17), head_dim=16,
                 contiguous=False)
    reasons = " | ".join(_backend().reject_reasons(p))
    for part in ("device 'cpu'", "float32", "289 tokens > 256", "head_dim 16 not in", "not contiguous", "empty"):
        assert part in reasons, reasons


@pytest.mark.parametrize("window, d", [((7, 7), 32), ((12, 12), 32), ((16, 16), 128), ((3, 5), 64), ((1, 1), 80)])
def test_accepts_supported_problems(window, d, monkeypatch):
    monkeypatch.setattr("vitkern.backends.cuda_common.device_reason", lambda *a: None)
    monkeypatch.setattr("vitkern.ops.window_attention_cuda._smem_optin", lambda index: 227 * 1024)  # H100 / H200
    assert _backend().reject_reasons(_problem(qkv=(2, 20, 20, 3 * 2 * d), window=window, head_dim=d)) == []


def test_rejects_windows_that_exceed_the_device_shared_memory(monkeypatch):
    monkeypatch.setattr("vitkern.backends.cuda_common.device_reason", lambda *a: None)
    monkeypatch.setattr("vitkern.ops.window_attention_cuda._smem_optin", lambda index: 163 * 1024)  # A100
    need = window_smem_bytes((16, 16), 128)
    assert need > 163 * 1024
    reasons = _backend().reject_reasons(_problem(qkv=(1, 32, 32, 3 * 128), window=(16, 16), head_dim=128))
    assert reasons == [f"a 16x16 window at head_dim 128 needs {need} bytes of shared memory > {163 * 1024} on cuda:0"]


def test_backward_problems_go_to_the_next_backend_with_the_reason():
    assert _backend().reject_reasons(_problem(direction="backward")) == [BACKWARD_REASON]


# ----------------------------------------------------------------------------------------------- CPU: the built extension
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _meta_args(B=2, H=14, W=14, heads=3, D=32, window=(7, 7), shift=(3, 3), bias=True, dtype=torch.bfloat16):
    T = (2 * window[0] - 1) * (2 * window[1] - 1)
    return (_meta(B, H, W, 3 * heads * D, dtype=dtype), _meta(3 * heads * D, dtype=dtype) if bias else None,
            _meta(T, heads, dtype=torch.float32), heads, list(window), list(shift), D ** -0.5, -100.0, False)


def test_schemas_exist(ops):
    assert {"default", "out"} <= set(ops.window_attention_fwd.overloads())


@pytest.mark.parametrize("H, W, window, nw", [(14, 14, (7, 7), 4), (17, 19, (7, 7), 9), (13, 25, (12, 12), 6),
                                              (5, 4, (5, 4), 1), (7, 11, (3, 5), 9)])
def test_meta_shapes(ops, H, W, window, nw):
    args = _meta_args(H=H, W=W, window=window, shift=(window[0] // 2, window[1] // 2))
    out, lse = ops.window_attention_fwd(*args)
    assert (out.shape, out.dtype, out.device.type) == ((2, H, W, 96), torch.bfloat16, "meta")
    assert (lse.shape, lse.dtype) == ((2 * nw, 3, window[0] * window[1]), torch.float32)
    ops.window_attention_fwd.out(*args, out=_meta(2, H, W, 96), lse=_meta(2 * nw, 3, window[0] * window[1],
                                                                          dtype=torch.float32))


@pytest.mark.gpu
def test_opcheck(cuda_ops):
    # on real tensors: torch.library.opcheck checks nothing when an input is on the meta device
    for i, args in enumerate([_meta_args(), _meta_args(H=9, W=10, bias=False, D=64, heads=1)]):
        torch.library.opcheck(cuda_ops.window_attention_fwd.default,
                              materialize(args, device="cuda", seed=seed_for("oc", i)))


def _with(**over):
    names = ["qkv", "qkv_bias", "table", "heads", "window", "shift", "scale", "mask_value", "pad_first"]
    args = dict(zip(names, _meta_args()))
    args.update(over)
    return [args[n] for n in names]


@pytest.mark.parametrize(
    "args, match",
    [
        (_with(qkv=_meta(2, 14, 14, 288, dtype=torch.float32)), r"qkv must have dtype float16 or bfloat16, got float32"),
        (_with(qkv=_meta(2, 14, 14, 288).transpose(1, 2)), r"qkv must be contiguous"),
        (_with(qkv=_meta(14, 14, 288)), r"qkv must be 4-D"),
        (_with(heads=5), r"qkv.size\(3\) must be 3 \* heads \* head_dim, got 288 with heads=5"),
        (_with(qkv=_meta(2, 14, 14, 144), qkv_bias=None, heads=3), r"head_dim .* must be one of 32, 64, 80, 96, 128, got 16"),
        (_with(window=[17, 16], table=_meta(33 * 31, 3, dtype=torch.float32)), r"window \[17, 16\] has 272 tokens"),
        (_with(shift=[7, 3]), r"shift \[7, 3\] must satisfy 0 <= shift < window \[7, 7\]"),
        (_with(table=_meta(169, 3)), r"table must have dtype float32, got bfloat16"),
        (_with(table=_meta(168, 3, dtype=torch.float32)), r"table must have shape \[169, 3\], got \[168, 3\]"),
        (_with(qkv_bias=_meta(288, dtype=torch.float16)), r"qkv_bias must have qkv's dtype bfloat16, got float16"),
        (_with(qkv_bias=_meta(287)), r"qkv_bias must have shape \[288\], got \[287\]"),
        (_with(mask_value=1.0), r"mask_value must be <= 0"),
        (_with(mask_value=float("nan")), r"mask_value must be <= 0"),
        (_with(scale=float("inf")), r"scale must be finite"),
        (_with(heads=0), r"heads must be >= 1"),
    ],
    ids=["fp32", "strided", "3d", "heads", "head_dim", "window_too_big", "shift", "table_dtype", "table_shape",
         "bias_dtype", "bias_shape", "mask_positive", "mask_nan", "scale", "no_heads"],
)
def test_checks_name_the_argument(ops, args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.window_attention_fwd(*args)


def test_out_checks_name_the_argument(ops):
    with pytest.raises(RuntimeError, match=r"lse must have shape \[8, 3, 49\], got \[8, 3, 48\]"):
        ops.window_attention_fwd.out(*_meta_args(), out=_meta(2, 14, 14, 96), lse=_meta(8, 3, 48, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"out must have shape \[2, 14, 14, 96\]"):
        ops.window_attention_fwd.out(*_meta_args(), out=_meta(2, 14, 14, 97), lse=_meta(8, 3, 49, dtype=torch.float32))


def test_no_cpu_kernel(ops):
    args = [torch.empty_like(a, device="cpu") if isinstance(a, torch.Tensor) else a for a in _meta_args()]
    with pytest.raises(RuntimeError, match="CPU"):
        ops.window_attention_fwd(*args)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def force_cuda(cuda_ops):
    """Prefer the cuda backend; counts of the CUDA forwards and Triton backwards (vitkern.testing.backends)."""
    with cuda_forward_triton_backward(OP) as calls:
        yield calls




def run_functional_cuda(calls, B, res, window, shift, heads, D, dtype, mask_value=-100.0, bias=True,
                        pad_first=False):
    before = dict(calls)
    check_functional(B, res, window, shift, heads, D, dtype, "cuda", mask_value, bias, pad_first, salt=("cuda",))
    check_ran(calls, before)


# (B, map, window, shift, heads, head_dim, extra kwargs)
FUNCTIONAL_CASES = {
    "ws7_shift": (2, (14, 14), (7, 7), (3, 3), 3, 32, {}),
    "ws7_noshift": (2, (14, 14), (7, 7), (0, 0), 3, 32, {}),
    "ws7_padded_shift": (2, (17, 19), (7, 7), (3, 3), 2, 32, {}),
    "ws7_padded_pad_first": (1, (17, 19), (7, 7), (3, 3), 2, 32, {"pad_first": True}),
    "ws12_shift": (1, (24, 24), (12, 12), (6, 6), 2, 32, {}),
    "ws12_padded_shift": (2, (13, 25), (12, 12), (6, 6), 2, 32, {}),
    "ws12_padded_pad_first": (1, (13, 13), (12, 12), (6, 6), 1, 32, {"pad_first": True}),
    "ws16_n256": (1, (32, 40), (16, 16), (8, 8), 2, 32, {}),
    "no_qkv_bias_padded": (1, (9, 10), (7, 7), (3, 3), 2, 32, {"bias": False}),
    "neg_inf_mask": (1, (14, 14), (7, 7), (3, 3), 2, 32, {"mask_value": float("-inf")}),
    "non_square_window": (1, (7, 11), (3, 5), (1, 2), 2, 64, {}),
    "window_is_map": (2, (5, 4), (5, 4), (0, 0), 1, 32, {}),
    "ws2": (1, (5, 7), (2, 2), (1, 1), 1, 32, {}),
    "d64_ws8": (2, (30, 20), (8, 8), (4, 4), 2, 64, {}),
    "d80": (1, (17, 19), (7, 7), (3, 3), 2, 80, {}),
    "d96": (1, (17, 19), (7, 7), (3, 3), 2, 96, {}),
    "d128_ws12": (1, (20, 26), (12, 12), (6, 6), 2, 128, {}),
    "d128_ws16": (1, (32, 32), (16, 16), (8, 8), 1, 128, {}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(FUNCTIONAL_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_functional_parity(force_cuda, dtype, case):
    B, res, window, shift, heads, D, kw = FUNCTIONAL_CASES[case]
    run_functional_cuda(force_cuda, B, res, window, shift, heads, D, dtype, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("model", sorted(SWIN_STAGES))
def test_cuda_swin_stage_shapes(force_cuda, model, dtype):
    ws = 12 if model.endswith("384") else 7
    for res, heads in SWIN_STAGES[model]:
        window, _ = ref_swin.clamp_window_and_shift((res, res), (ws, ws), (0, 0))
        for shift in {0, window[0] // 2} if window[0] < res else {0}:
            run_functional_cuda(force_cuda, 2, (res, res), window, (shift, shift), heads, 32, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,res,ws,shift,heads,D", [
    (4, (56, 56), 7, 3, 3, 32), (2, (30, 20), 8, 4, 2, 64), (2, (20, 26), 12, 6, 2, 128), (2, (6, 10), 7, 3, 3, 32),
])
def test_cuda_block_parity(force_cuda, B, res, ws, shift, heads, D, dtype):
    """The fused module (qkv linear -> CUDA forward -> proj; Triton backward) against the reference Swin block."""
    block, inputs, seed = make_case(B, res, ws, shift, heads, D, dtype, "cuda", seed_key=("cuda",))
    fused = ShiftedWindowAttention.from_timm_block(block)
    before = dict(force_cuda)
    check_forward_backward(lambda x, **kw: torch.func.functional_call(fused, _params(**kw), (x,)),
                           _block_reference(_BlockAttnPath(block)), inputs, GRADS, seed=seed)
    check_ran(force_cuda, before)


def _fwd(backend, inputs, heads, window, shift, scale, mask_value=-100.0, pad_first=False):
    with vitkern.use_backend(backend, op=OP), poison_outputs():
        return torch.ops.vitkern.window_attention_fwd(inputs["qkv"], inputs["qkv_bias"], inputs["table"], heads,
                                                      list(window), list(shift), scale, mask_value, pad_first)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["ws7_padded_shift", "ws12_padded_pad_first", "ws16_n256", "d128_ws12",
                                  "neg_inf_mask", "non_square_window"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_out_and_lse_as_accurate_as_triton(cuda_ops, dtype, case):
    """out and lse (padded tokens' lse included: the Triton backward reads it) vs float64, with the Triton
    backend's error as the baseline."""
    B, res, window, shift, heads, D, kw = FUNCTIONAL_CASES[case]
    mask_value, pad_first = kw.get("mask_value", -100.0), kw.get("pad_first", False)
    inputs, _ = _functional_case(B, res, window, shift, heads, D, dtype, "cuda", kw.get("bias", True), ("vs-triton",))
    got = _fwd("cuda", inputs, heads, window, shift, D ** -0.5, mask_value, pad_first)
    tri = _fwd("triton", inputs, heads, window, shift, D ** -0.5, mask_value, pad_first)
    as64 = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    ref = wa_op.reference_forward(as64["qkv"], as64["qkv_bias"], as64["table"], heads, window, shift, D ** -0.5,
                                  mask_value, pad_first)
    assert_close("out", got[0].cpu(), ref[0].cpu(), tri[0].cpu())
    # fp32 lse of both kernels: tensor-core dots with fp32 accumulation and an SFU exp2; 1e-5 x scale floor
    assert_close("lse", got[1].cpu(), ref[1].cpu(), tri[1].cpu(), Tolerance(atol=1e-5))


@pytest.mark.gpu
def test_cuda_forward_is_deterministic(cuda_ops):
    inputs, _ = _functional_case(8, (56, 56), (7, 7), (3, 3), 3, 32, torch.bfloat16, "cuda", True, ("det",))
    runs = [_fwd("cuda", inputs, 3, (7, 7), (3, 3), 32 ** -0.5) for _ in range(3)]
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))


@pytest.mark.gpu
def test_gpu_dispatch_lists_cuda_after_triton_and_backward_on_triton(cuda_ops):
    inputs, _ = _functional_case(2, (56, 56), (7, 7), (3, 3), 3, 32, torch.bfloat16, "cuda", True, ("dispatch",))
    qkv, table = inputs["qkv"], inputs["table"]
    choice = vitkern.explain(window_attention, qkv, table, 3, 7, 3)
    assert choice.backend_name == "triton", str(choice)  # until the GPU session commits numbers and flips the rank
    assert "cuda: supported, lower preference" in str(choice)
    with vitkern.use_backend("cuda", op=OP, strict=False):
        bwd = vitkern.dispatch.select(wa_op.problem("backward", qkv, table, 3, (7, 7), (3, 3)))
    assert bwd.backend_name == "triton" and "cuda: rejected: " + BACKWARD_REASON in str(bwd), str(bwd)


@pytest.mark.gpu
def test_cuda_torch_compile_fullgraph(force_cuda):
    m = ShiftedWindowAttention(96, 3, window_size=7, shift_size=3, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 56, 56, 96, device="cuda", dtype=torch.bfloat16)
    eager = m(x)
    before = dict(force_cuda)
    # inductor may pick other GEMM kernels for the two linears: bf16 rounding differences only
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), eager, atol=2e-2, rtol=2e-2)
    check_ran(force_cuda, before, backward=False)


@pytest.mark.gpu
@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
def test_cuda_largest_window_fits_or_is_rejected_with_reason(cuda_ops, d):
    """ws 16 (256 tokens) at every head dim: runs where the device has the shared memory (H100/H200: all), and where
    it does not, the backend rejects it with the byte count instead of failing at launch."""
    qkv = torch.randn(1, 16, 16, 3 * d, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(31 * 31, 1, device="cuda", dtype=torch.bfloat16)
    choice = vitkern.dispatch.select(wa_op.problem("forward", qkv, table, 1, (16, 16), (8, 8)))
    reasons = _backend().reject_reasons(choice.problem)
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    if window_smem_bytes((16, 16), d) > optin:
        assert reasons and "bytes of shared memory" in reasons[0]
    else:
        assert reasons == []
        with vitkern.use_backend("cuda", op=OP):
            out = window_attention(qkv, table, 1, 16, 8)
        ref64, ref_bf16 = (wa_op.reference_forward(qkv.to(dt), None, table.to(dt), 1, (16, 16), (8, 8), d ** -0.5,
                                                   -100.0)[0] for dt in (torch.float64, torch.bfloat16))
        assert_close("out", out.cpu(), ref64.cpu(), ref_bf16.cpu())
