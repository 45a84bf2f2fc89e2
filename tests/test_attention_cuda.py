"""The CUDA C++ attention forward (csrc/ops/attention.cu(h), vitkern/ops/attention_cuda.py).

* CPU, always: the backend is registered after Triton, reports itself unavailable with a reason (extension not built /
  no GPU), rejects what its kernels cannot run and every backward problem (the backward runs on Triton), and decides
  which layouts it can vector-load.
* CPU, when vitkern._C is built (``bash scripts/build_csrc.sh --inplace``): the op schemas exist, the Meta kernels give
  the contract's shapes and dtypes, the C++ input checks name the argument, torch.compile on meta tensors
  (torch.library.opcheck runs on the GPU: it checks nothing on meta inputs).
* GPU (``@pytest.mark.gpu``; skipped with the reason when the extension cannot run): parity against float64 with
  vitkern.testing's rule (err <= 2 x PyTorch's error in the same dtype + atol(dtype) x scale) through the op and
  autograd (CUDA forward, Triton backward on the CUDA forward's lse), for the shape classes of the Triton tests;
  every kernel path (resident K/V, streaming; the sm_90a wgmma kernels with 2 and 1 warpgroups) called directly
  and through the backend (VITKERN_CUDA_ATTENTION_KERNEL / use_kernel); accuracy with the Triton backend as the
  baseline;
  strided / misaligned layouts; determinism; dispatch and explain; torch.compile; compute-sanitizer (slow).

Forcing: tests force ``cuda`` with strict=False (the backward problem is rejected by design and falls to Triton) and
count the calls, so a silent fallback fails the test.
"""

from __future__ import annotations


import pytest
import torch

import vitkern
from test_attention import ref_packed, ref_separate  # shared attention references
from vitkern.functional.attention import attention
from vitkern.ops import attention as attn_op
from vitkern.backends.cuda_common import BACKWARD_REASON
from vitkern.ops import attention_cuda
from vitkern.ops.attention_cuda import (
    CUDA_HEAD_DIMS, KERNEL_ENV, AttentionCuda, kernel_choice, use_kernel, vector_ready,
)
from vitkern.testing.backends import check_ran, cuda_forward_triton_backward
from vitkern.testing.sanitizer import run_under_sanitizer, workload
from vitkern.testing import Tolerance, check_forward_backward, materialize, randn, seed_for
from vitkern.testing.numerics import assert_close

OP = "attention"
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
NS = [1, 50, 197, 257]  # single query, 16-tile tails, ViT-B/S, ViT-H/14


def _backend() -> AttentionCuda:
    return vitkern.dispatch.backends(OP)["cuda"]


def _problem(direction="forward", device="cuda", dtype=torch.bfloat16, q=(2, 12, 197, 64), k=None, **attrs):
    attrs = {"layout": "packed", "dropout_p": 0.0, "same_dtype": True, **attrs}
    return vitkern.dispatch.Problem(OP, direction, device, dtype, (("q", q), ("k", k or q)), tuple(attrs.items()))


# ----------------------------------------------------------------------------------------------- CPU: status
def test_backend_registered_after_triton():
    table = vitkern.dispatch.backends(OP)
    assert isinstance(table["cuda"], AttentionCuda)
    # unmeasured: must not be the default on CUDA until committed benchmark numbers say it is faster
    assert table["cuda"].cuda_rank > table["triton"].cuda_rank


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU status; this machine has a GPU")
def test_unavailable_without_gpu_with_reason():
    reason = _backend().availability()
    assert reason and "CUDA extension" in reason
    choice = vitkern.explain(attention, qkv=torch.randn(2, 7, 3 * 64), num_heads=2)
    assert choice.backend_name == "reference"
    assert "cuda: rejected: " + reason in str(choice), str(choice)


def test_rejects_what_the_kernels_cannot_run():
    p = _problem(device="cpu", dtype=torch.float32, q=(2, 3, 0, 48), k=(2, 3, 5, 48), dropout_p=0.1,
                 same_dtype=False)
    reasons = " | ".join(_backend().reject_reasons(p))
    for part in ("device 'cpu'", "float32", "head_dim 48 not in", "empty input", "dropout", "different dtypes"):
        assert part in reasons, reasons


@pytest.mark.parametrize("d", CUDA_HEAD_DIMS)
def test_accepts_supported_head_dims_on_cuda_problems(d, monkeypatch):
    # device-independent part of the decision (the arch check needs a GPU: bypassed here)
    monkeypatch.setattr("vitkern.backends.cuda_common.device_reason", lambda *a: None)
    assert _backend().reject_reasons(_problem(q=(2, 3, 197, d), k=(2, 3, 50, d))) == []


def test_head_dims_match_the_build_config():
    from vitkern import _build_config

    assert CUDA_HEAD_DIMS == _build_config.HEAD_DIMS  # csrc/common/dispatch.h instantiates exactly these


def test_backward_problems_go_to_the_next_backend_with_the_reason():
    assert _backend().reject_reasons(_problem(direction="backward")) == [BACKWARD_REASON]
    assert "Triton" in BACKWARD_REASON and "backward" in BACKWARD_REASON


def test_kernel_choice_from_env_and_use_kernel(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert kernel_choice() == "auto" and _backend().settings() == ()
    monkeypatch.setenv(KERNEL_ENV, "wgmma")
    assert kernel_choice() == "wgmma" and _backend().settings() == (("kernel", "wgmma"),)
    with use_kernel("streaming"):
        assert kernel_choice() == "streaming"
        with use_kernel("wgmma1"):
            assert kernel_choice() == "wgmma1"
        assert kernel_choice() == "streaming"
    assert kernel_choice() == "wgmma"  # the override is gone, the environment applies again
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match=r"VITKERN_CUDA_ATTENTION_KERNEL must be one of auto, .*got 'fastest'"):
        kernel_choice()
    with pytest.raises(ValueError, match=r"use_kernel: name must be one of"):
        with use_kernel("wgmma2"):
            pass


@pytest.mark.parametrize("cap, archs, expect", [
    ((9, 0), "sm_90a", []),
    ((9, 0), "sm_80", ["needs vitkern._C built for sm_90a; it was built for [sm_80]"]),
    ((8, 0), "sm_90a,sm_80", ["needs an sm_90 GPU (H100/H200); cuda:0 is sm_80"]),
    ((10, 0), "sm_90a", ["needs an sm_90 GPU (H100/H200); cuda:0 is sm_100"]),
])
def test_wgmma_kernels_need_sm90_and_an_sm90a_build(monkeypatch, cap, archs, expect):
    """The sm_90a kernels are rejected with the reason (and the dispatcher falls back) wherever they cannot run;
    the automatic kernels are not affected."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(attention_cuda, "extension_status",
                        lambda: type("Status", (), {"info": staticmethod(lambda: {"cuda_archs": archs})})())
    for name in ("wgmma", "wgmma1"):
        with use_kernel(name):
            reasons = _backend().device_reasons(_problem(), 0)
        assert [r.split("=", 1)[1] for r in reasons] == [f"{name} {e}" for e in expect], reasons
    with use_kernel("auto"):
        assert _backend().device_reasons(_problem(), 0) == []


def test_vector_ready_layouts():
    qkv = torch.randn(2, 5, 3 * 4 * 32)
    assert all(vector_ready(t) for t in attn_op.head_views(qkv, "packed", 4))  # packed linear output: no copy
    assert vector_ready(torch.randn(1, 3, 5, 32).expand(4, -1, -1, -1))  # batch stride 0
    assert vector_ready(torch.randn(2, 5, 3, 32).transpose(1, 2))  # bnhd storage
    assert not vector_ready(torch.randn(2, 3, 5, 64)[..., ::2])  # strided head dim: copied by forward()
    assert not vector_ready(torch.randn(2, 3, 5, 36)[..., :32])  # row stride 36: not 16-byte rows
    assert not vector_ready(torch.randn(2 * 3 * 5 * 32 + 1)[1:].view(2, 3, 5, 32))  # misaligned data


# ----------------------------------------------------------------------------------------------- CPU: the built extension
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _meta_packed(B=2, N=197, H=3, D=64, dtype=torch.bfloat16):
    return attn_op.head_views(_meta(B, N, 3 * H * D, dtype=dtype), "packed", H)


def test_schemas_exist(ops):
    assert {"default", "out"} <= set(ops.attention_fwd.overloads())


@pytest.mark.parametrize("nq, nk", [(197, 197), (1, 50), (300, 7)])
def test_meta_shapes(ops, nq, nk):
    q = _meta(2, 3, nq, 80)
    k = _meta(2, 3, nk, 80).transpose(1, 2).contiguous().transpose(1, 2)  # bnhd storage
    out, lse = ops.attention_fwd(q, k, k, 0.125)
    assert (out.shape, out.dtype, out.device.type) == ((2, 3, nq, 80), torch.bfloat16, "meta")
    assert (lse.shape, lse.dtype) == ((2, 3, nq), torch.float32)
    q, k, v = _meta_packed()
    out = _meta(2, 197, 3 * 64).view(2, 197, 3, 64).transpose(1, 2)  # the [B, N, H·D] proj input as [B, H, N, D]
    ops.attention_fwd.out(q, k, v, 0.125, 0, out=out, lse=_meta(2, 3, 197, dtype=torch.float32))


@pytest.mark.gpu
def test_opcheck(cuda_ops):
    # on real tensors: torch.library.opcheck checks nothing when an input is on the meta device
    q = _meta(2, 3, 50, 64)
    for i, args in enumerate([(q, q, q, 0.125), (*_meta_packed(N=20, D=32), 0.2, 2)]):
        torch.library.opcheck(cuda_ops.attention_fwd.default, materialize(args, device="cuda", seed=seed_for("oc", i)))


def test_meta_torch_compile(ops):
    def f(q, k, v):
        out, lse = ops.attention_fwd(q, k, v, 0.125)
        return out, lse

    out, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(*_meta_packed(N=50))
    assert out.shape == (2, 3, 50, 64) and lse.shape == (2, 3, 50) and lse.dtype == torch.float32


def _strided(shape, strides, dtype=torch.bfloat16):
    return torch.empty_strided(shape, strides, device="meta", dtype=dtype)


_Q = (2, 3, 50, 64)
_LSE = (2, 3, 50)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda o: o.attention_fwd(_meta(*_Q, dtype=torch.float32), _meta(*_Q, dtype=torch.float32),
                                   _meta(*_Q, dtype=torch.float32), 0.1),
         r"attention_fwd: q must have dtype float16 or bfloat16, got float32"),
        (lambda o: o.attention_fwd(_meta(*_Q), _meta(*_Q, dtype=torch.float16), _meta(*_Q), 0.1),
         r"q and k must have the same dtype, got bfloat16 and float16"),
        (lambda o: o.attention_fwd(_meta(2, 3, 50, 48), _meta(2, 3, 50, 48), _meta(2, 3, 50, 48), 0.1),
         r"head_dim \(q.size\(3\)\) must be one of 32, 64, 80, 96, 128, got 48"),
        (lambda o: o.attention_fwd(_meta(*_Q), _meta(2, 3, 50, 64), _meta(2, 3, 49, 64), 0.1),
         r"k and v must have the same shape"),
        (lambda o: o.attention_fwd(_meta(*_Q), _meta(2, 4, 50, 64), _meta(2, 4, 50, 64), 0.1),
         r"must agree in B, H and D"),
        (lambda o: o.attention_fwd(_meta(2, 50, 64), _meta(*_Q), _meta(*_Q), 0.1), r"q must be 4-D"),
        (lambda o: o.attention_fwd(_meta(*_Q), _meta(2, 3, 0, 64), _meta(2, 3, 0, 64), 0.1), r"k has no keys"),
        (lambda o: o.attention_fwd(_strided(_Q, (10560, 3520, 66, 1)), _meta(*_Q), _meta(*_Q), 0.1),
         r"q.stride\(2\) must be a multiple of 8 elements"),
        (lambda o: o.attention_fwd(_meta(*_Q), _meta(2, 3, 50, 128)[..., ::2], _meta(*_Q), 0.1),
         r"k must be contiguous in its last dim"),
        (lambda o: o.attention_fwd(_meta(*_Q), _meta(*_Q), _meta(*_Q), 0.1, 5), r"kernel_path must be 0"),
        (lambda o: o.attention_fwd(_meta(*_Q), _meta(*_Q), _meta(*_Q), float("inf")), r"scale must be finite"),
        (lambda o: o.attention_fwd.out(_meta(*_Q), _meta(*_Q), _meta(*_Q), 0.1, out=_meta(2, 3, 49, 64),
                                       lse=_meta(*_LSE, dtype=torch.float32)),
         r"out must have shape \[2, 3, 50, 64\], got \[2, 3, 49, 64\]"),
        (lambda o: o.attention_fwd.out(_meta(*_Q), _meta(*_Q), _meta(*_Q), 0.1, out=_meta(*_Q, dtype=torch.float16),
                                       lse=_meta(*_LSE, dtype=torch.float32)),
         r"out must have q's dtype bfloat16, got float16"),
        (lambda o: o.attention_fwd.out(_meta(*_Q), _meta(*_Q), _meta(*_Q), 0.1, out=_meta(*_Q), lse=_meta(*_LSE)),
         r"lse must have dtype float32, got bfloat16"),
        (lambda o: o.attention_fwd.out(_meta(*_Q), _meta(*_Q), _meta(*_Q), 0.1, out=_meta(*_Q),
                                       lse=_meta(2, 50, 3, dtype=torch.float32).transpose(1, 2)),
         r"lse must be contiguous"),
    ],
    ids=["fp32", "k_dtype", "head_dim", "kv_shape", "heads", "q_3d", "no_keys", "row_stride", "k_last_dim",
         "kernel_path", "scale", "out_shape", "out_dtype", "lse_dtype", "lse_strided"],
)
def test_checks_name_the_argument(ops, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(ops)


def test_no_cpu_kernel(ops):
    q = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="CPU"):  # NotImplementedError from the dispatcher (a RuntimeError)
        ops.attention_fwd(q, q, q, 0.1)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def force_cuda(cuda_ops):
    """Prefer the cuda backend; counts of the CUDA forwards and Triton backwards (vitkern.testing.backends)."""
    with cuda_forward_triton_backward(OP) as calls:
        yield calls




def run_packed_cuda(calls, B, H, N, D, dtype, scale=None, magnitude=1.0):
    """Forward (CUDA) and backward (Triton, on the CUDA forward's out and lse) of the packed op vs float64."""
    seed = seed_for("attn-cuda-packed", B, H, N, D, dtype, scale, magnitude)
    inputs = {"qkv": randn((B, N, 3 * H * D), dtype=dtype, device="cuda", seed=seed, scale=magnitude)}
    before = dict(calls)
    report = check_forward_backward(lambda qkv: attention(qkv=qkv, num_heads=H, scale=scale),
                                    lambda qkv: ref_packed(qkv, H, scale), inputs, ["qkv"], seed=seed)
    check_ran(calls, before)
    return report


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "wgmma", "wgmma1"])
@pytest.mark.parametrize("D", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_packed_parity(force_cuda, dtype, N, D, kernel):
    _skip_unless_kernel_runs(kernel)
    with use_kernel(kernel):
        run_packed_cuda(force_cuda, 2, 3, N, D, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, H, N, D",
    [(32, 6, 197, 64), (32, 12, 197, 64), (8, 16, 577, 64), (4, 16, 1025, 64), (8, 16, 257, 80), (4, 16, 1025, 80),
     (256, 12, 197, 64), (2, 16, 197, 128)],
    ids=["vit_s", "vit_b", "vit_l384", "vit_l_1025", "vit_h14", "vit_h_1025", "vit_b_b256", "d128"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kernel", ["auto", "wgmma"])
def test_cuda_vit_shapes(force_cuda, dtype, B, H, N, D, kernel):
    _skip_unless_kernel_runs(kernel)
    with use_kernel(kernel):
        run_packed_cuda(force_cuda, B, H, N, D, dtype)


@pytest.mark.gpu
def test_cuda_scale_and_large_logits(force_cuda):
    run_packed_cuda(force_cuda, 1, 2, 197, 64, torch.bfloat16, scale=0.3)
    run_packed_cuda(force_cuda, 1, 2, 197, 64, torch.float16, magnitude=4.0)  # logits ~ ±60: online max matters


@pytest.mark.gpu
@pytest.mark.parametrize("layout, nq, nk, D", [("bhnd", 197, 197, 64), ("bnhd", 577, 577, 80), ("bhnd", 50, 197, 96),
                                               ("bnhd", 300, 7, 32), ("bhnd", 1, 1025, 128)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_separate_layouts(force_cuda, dtype, layout, nq, nk, D):
    B, H = 3, 4
    seed = seed_for("attn-cuda-sep", layout, nq, nk, D, dtype)
    shape = (lambda n: (B, H, n, D)) if layout == "bhnd" else (lambda n: (B, n, H, D))
    inputs = {name: randn(shape(n), dtype=dtype, device="cuda", seed=seed + i)
              for i, (name, n) in enumerate((("q", nq), ("k", nk), ("v", nk)))}
    before = dict(force_cuda)
    check_forward_backward(lambda q, k, v: attention(q, k, v, layout=layout),
                           lambda q, k, v: ref_separate(q, k, v, layout=layout), inputs, ["q", "k", "v"], seed=seed)
    check_ran(force_cuda, before)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed_slice", "misaligned_slice", "dim_strided", "expanded_kv"])
def test_cuda_strided_and_misaligned(force_cuda, layout):
    """Views the kernel reads in place (a slice of a wider buffer, k/v broadcast over the batch) and views the
    backend copies first (a 2-byte-misaligned slice, a strided head dim): all exact against float64."""
    B, H, N, D, dtype = 2, 3, 197, 64, torch.bfloat16
    seed = seed_for("attn-cuda-strided", layout)
    if layout in ("packed_slice", "misaligned_slice"):
        off = 8 if layout == "packed_slice" else 1  # 1 element: data and rows not 16-byte aligned
        inputs = {"big": randn((B, N + 1, 3 * H * D + 8), dtype=dtype, device="cuda", seed=seed)}
        view = lambda big: big[:, 1:, off:off + 3 * H * D]  # noqa: E731
        kernel = lambda big: attention(qkv=view(big), num_heads=H)  # noqa: E731
        ref = lambda big: ref_packed(view(big), H)  # noqa: E731
    else:
        if layout == "dim_strided":
            shapes, view = [(B, H, N, 2 * D)] * 3, lambda *t: tuple(x[..., ::2] for x in t)
        else:
            shapes = [(B, H, N, D), (1, H, N, D), (1, H, N, D)]
            view = lambda q, k, v: (q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))  # noqa: E731
        inputs = {n: randn(s, dtype=dtype, device="cuda", seed=seed + i) for i, (n, s) in enumerate(zip("qkv", shapes))}
        kernel = lambda q, k, v: attention(*view(q, k, v))  # noqa: E731
        ref = lambda q, k, v: ref_separate(*view(q, k, v))  # noqa: E731
    before = dict(force_cuda)
    check_forward_backward(kernel, ref, inputs, list(inputs), seed=seed)
    check_ran(force_cuda, before)


# --- the two kernel paths, called directly
def _ref64(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def _torch_same_dtype(q, k, v, scale):
    """PyTorch's explicit formula in the inputs' dtype (the baseline of the tolerance rule)."""
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.float(), -1).to(q.dtype) @ v, torch.logsumexp(s.float(), -1)


def _resident_bytes(nk, d, itemsize=2):  # csrc/ops/attention.cuh resident_smem_bytes
    return (2 * -(-nk // 16) * 16 + 64) * (d + 8) * itemsize


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, H, nq, nk, D",
    [(2, 3, 197, 197, 64), (2, 3, 50, 50, 128), (1, 2, 257, 257, 80), (3, 1, 1, 1, 32), (2, 2, 77, 300, 96),
     (1, 2, 577, 577, 32), (1, 2, 1025, 1025, 64), (64, 12, 197, 197, 64), (1, 1, 4096, 4096, 128)],
    ids=["vit_b", "d128", "vit_h14", "n1", "cross", "split_heads", "n1025", "many_heads", "n4096"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_paths_match_float64(cuda_ops, dtype, B, H, nq, nk, D):
    """kernel_path 1 (resident K/V; a clear error where it does not fit in shared memory), 2 (streaming) and, on
    sm_90, 3 / 4 (wgmma, 2 / 1 warpgroups; elsewhere a clear error) called directly, all against float64; the
    automatic choice (0) reproduces path 1 or 2 bitwise. Outputs poisoned."""
    seed = seed_for("attn-cuda-path", B, H, nq, nk, D, dtype)
    q = randn((B, H, nq, D), dtype=dtype, device="cuda", seed=seed)
    k = randn((B, H, nk, D), dtype=dtype, device="cuda", seed=seed + 1)
    v = randn((B, H, nk, D), dtype=dtype, device="cuda", seed=seed + 2)
    scale = D ** -0.5
    results = {}
    with vitkern.testing.poison_outputs():
        for path in (1, 2, 3, 4):
            if path == 1 and _resident_bytes(nk, D) > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
                with pytest.raises(RuntimeError, match=r"kernel_path=1 \(resident K/V\) needs"):
                    cuda_ops.attention_fwd(q, k, v, scale, path)
                continue
            if path >= 3 and torch.cuda.get_device_capability(0) != (9, 0):
                with pytest.raises(RuntimeError, match=rf"kernel_path={path} \(wgmma\) needs an sm_90 GPU"):
                    cuda_ops.attention_fwd(q, k, v, scale, path)
                continue
            results[path] = cuda_ops.attention_fwd(q, k, v, scale, path)
        auto = cuda_ops.attention_fwd(q, k, v, scale, 0)
    o64, lse64 = _ref64(q, k, v, scale)
    o_t, lse_t = _torch_same_dtype(q, k, v, scale)
    for path, (out, lse) in results.items():
        assert_close(f"out (path {path})", out.cpu(), o64.cpu(), o_t.cpu())
        # lse: fp32 from fp32-accumulated tensor-core dots and an SFU exp2 (the Triton kernel's arithmetic); the
        # baseline rounds the scores to the input dtype first, so it bounds the error loosely but honestly
        assert_close(f"lse (path {path})", lse.cpu(), lse64.cpu(), lse_t.cpu())
    assert any(torch.equal(auto[0], o) and torch.equal(auto[1], l) for p, (o, l) in results.items() if p <= 2)


def _skip_unless_kernel_runs(kernel):
    if kernel in attention_cuda.WGMMA_KERNELS and torch.cuda.get_device_capability(0) != (9, 0):
        pytest.skip(f"the {kernel} kernel runs on sm_90 only (this GPU: sm_%d%d); its rejection is tested on CPU"
                    % torch.cuda.get_device_capability(0))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "wgmma", "wgmma1"])
@pytest.mark.parametrize("N, D", [(197, 64), (257, 80), (1025, 64), (50, 128), (1, 32), (577, 96)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_as_accurate_as_triton(cuda_ops, dtype, N, D, kernel):
    """Forward out and lse of the op with the CUDA backend (each kernel choice) vs float64, with the Triton
    backend's error as the baseline (err <= 2 x Triton's + atol x scale)."""
    _skip_unless_kernel_runs(kernel)
    B, H = 4, 6
    seed = seed_for("attn-cuda-vs-triton", N, D, dtype)
    qkv = randn((B, N, 3 * H * D), dtype=dtype, device="cuda", seed=seed)
    runs = {}
    for name in ("cuda", "triton"):
        with vitkern.use_backend(name, op=OP), use_kernel(kernel):
            runs[name] = torch.ops.vitkern.attention_fwd(qkv, None, None, H, "packed", D ** -0.5)
    q, k, v = attn_op.head_views(qkv, "packed", H)
    o64, lse64 = _ref64(q, k, v, D ** -0.5)
    o64 = o64.transpose(1, 2).reshape(B, N, H * D)
    assert_close("out", runs["cuda"][0].cpu(), o64.cpu(), runs["triton"][0].cpu())
    assert_close("lse", runs["cuda"][1].cpu(), lse64.cpu(), runs["triton"][1].cpu(), Tolerance(atol=1e-5))


@pytest.mark.gpu
def test_cuda_forward_is_deterministic(cuda_ops):
    qkv = randn((64, 197, 3 * 768), dtype=torch.bfloat16, device="cuda", seed=seed_for("attn-cuda-det"))
    with vitkern.use_backend("cuda", op=OP):
        runs = [torch.ops.vitkern.attention_fwd(qkv, None, None, 12, "packed", 0.125) for _ in range(3)]
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))


@pytest.mark.gpu
def test_gpu_dispatch_lists_cuda_after_triton_and_backward_on_triton(cuda_ops):
    qkv = torch.randn(2, 197, 3 * 768, device="cuda", dtype=torch.bfloat16)
    choice = vitkern.explain(attention, qkv=qkv, num_heads=12)
    assert choice.backend_name == "triton", str(choice)  # until the GPU session commits numbers and flips the rank
    assert "cuda: supported, lower preference" in str(choice)
    q4, k4, v4 = attn_op.head_views(qkv, "packed", 12)
    with vitkern.use_backend("cuda", op=OP, strict=False):
        assert vitkern.dispatch.select(attn_op.problem("forward", q4, k4, v4, "packed")).backend_name == "cuda"
        bwd = vitkern.dispatch.select(attn_op.problem("backward", q4, k4, v4, "packed"))
    assert bwd.backend_name == "triton" and "cuda: rejected: " + BACKWARD_REASON in str(bwd), str(bwd)
    # strict forcing: the backward has no CUDA kernel, and the error says so (BackendError is a RuntimeError)
    with vitkern.use_backend("cuda", op=OP), pytest.raises(RuntimeError, match="no CUDA backward kernel"):
        attention(qkv=qkv.requires_grad_(), num_heads=12).sum().backward()


@pytest.mark.gpu
def test_cuda_torch_compile_fullgraph(force_cuda):
    qkv = torch.randn(4, 197, 3 * 384, device="cuda", dtype=torch.bfloat16)
    f = lambda x: attention(qkv=x, num_heads=6)  # noqa: E731
    eager = f(qkv)
    before = dict(force_cuda)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(qkv), eager, atol=0, rtol=0)
    check_ran(force_cuda, before, backward=False)


@pytest.mark.gpu
def test_cuda_input_checks(cuda_ops):
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="k must be a CUDA tensor, got a tensor on cpu"):
        cuda_ops.attention_fwd(q, q.cpu(), q, 0.1)
    base = torch.randn(1 * 2 * 8 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="q must be 16-byte aligned"):
        cuda_ops.attention_fwd(base[1:].view(1, 2, 8, 64), q, q, 0.1)


# ----------------------------------------------------------------------------------------------- compute-sanitizer
# Small shapes of every kernel instantiation class: every attention path (tails at N = 1, 50, 70, 197; the wgmma
# kernels on sm_90: their CTAs of 64 / 128 rows leave a whole idle warpgroup at N = 1, 33, 50), and the
# window kernel (shifted + padded, pad_first, ws 12 with several query tiles per warp). Also runnable by hand:
#   PYTHONPATH=. compute-sanitizer --tool memcheck --error-exitcode 3 python tests/test_attention_cuda.py
# the body of a vitkern.testing.sanitizer.workload (which loads the extension as `ops`)
SANITIZER_SCRIPT = r"""
for dtype in (torch.bfloat16, torch.float16):
    for B, H, N, D in ((1, 2, 50, 64), (2, 1, 197, 80), (1, 1, 70, 128), (1, 1, 1, 32), (1, 1, 33, 96)):
        qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype)
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        for path in (1, 2, 3, 4) if torch.cuda.get_device_capability() == (9, 0) else (1, 2):
            out, lse = ops.attention_fwd(q, k, v, D ** -0.5, path)
    for res, ws, shift, pad_first, bias in (((14, 14), (7, 7), (3, 3), False, True), ((11, 9), (4, 4), (2, 2), True, False),
                                            ((13, 13), (12, 12), (6, 6), False, True), ((5, 6), (2, 3), (0, 0), False, True)):
        heads, D = 2, 32
        qkv = torch.randn(2, *res, 3 * heads * D, device="cuda", dtype=dtype)
        table = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads, device="cuda")
        b = torch.randn(3 * heads * D, device="cuda", dtype=dtype) if bias else None
        out, lse = ops.window_attention_fwd(qkv, b, table, heads, list(ws), list(shift), D ** -0.5, -100.0, pad_first)
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    "sanitizer_tool, clean",
    [
        ("memcheck", "ERROR SUMMARY: 0 errors"),  # out-of-bounds / misaligned global and shared accesses
        ("racecheck", "RACECHECK SUMMARY: 0 hazards"),  # shared tiles: K/V stages, per-warp staging reuse
        ("synccheck", "ERROR SUMMARY: 0 errors"),  # every thread reaches every __syncthreads / __syncwarp
        ("initcheck", "ERROR SUMMARY: 0 errors"),  # zero-filled tails: no uninitialised shared/global reads
    ],
)
def test_compute_sanitizer(cuda_ops, sanitizer_tool, clean):
    run_under_sanitizer(sanitizer_tool, SANITIZER_SCRIPT, clean)


if __name__ == "__main__":  # the sanitizer workload, for running compute-sanitizer by hand
    exec(workload(SANITIZER_SCRIPT))
