"""The CUDA C++ patch embedding forward (csrc/ops/patch_embed.cu, patch_embed.cuh, vitkern/ops/patch_embed_cuda.py):
a gather kernel (patch rows + prefix tokens in one pass) and a strided-batched cuBLASLt GEMM writing the patch tokens
in place in [B, P + Np, D], bias through the epilogue, position embedding through a batch-stride-0 C.

* CPU, always: registered after Triton, unavailable with a reason, backward problems rejected with the reason (the
  Triton backward runs from x, norm, weight), unsupported problems rejected.
* CPU, when vitkern._C is built: schema, Meta kernel (the contract's shapes for every prefix / pos combination),
  input checks naming the argument, torch.compile on meta tensors (opcheck: on the GPU).
* GPU (``@pytest.mark.gpu``): parity against float64 through ``vitkern.functional.patch_embed`` (forward on CUDA,
  checked by counting calls; backward on Triton) for p = 16 and 14, NCHW and channels_last, uint8 + mean/std,
  P = 0/1/2/5, timm's no_embed_class, odd sizes; both ways of adding the position embedding; accuracy against the
  Triton forward; compute-sanitizer (slow). Tolerance: vitkern.testing's rule, err <= 2 x PyTorch's error in the same
  dtype + atol(dtype) x scale.
"""

from __future__ import annotations


import pytest
import torch

import vitkern
from test_patch_embed import FLOAT_NORM, PREFIXES, UINT8_NORM, make_inputs, reference, vitkern_embed
from vitkern import dispatch
from vitkern.backends.cuda_common import BACKWARD_REASON
from vitkern.ops.patch_embed import problem as pe_problem
from vitkern.ops.patch_embed_cuda import PatchEmbedCuda
from vitkern.testing.sanitizer import run_under_sanitizer
from vitkern.testing import check_forward_backward, materialize, poison_outputs, seed_for
from vitkern.testing.numerics import assert_close

OP = "patch_embed"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _backend() -> PatchEmbedCuda:
    return dispatch.backends(OP)["cuda"]


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


# ----------------------------------------------------------------------------------------------- CPU: status
def test_backend_registered_after_triton():
    table = dispatch.backends(OP)
    assert isinstance(table["cuda"], PatchEmbedCuda)
    assert table["cuda"].cuda_rank > table["triton"].cuda_rank  # unmeasured: not the default until numbers say so


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU status; this machine has a GPU")
def test_unavailable_without_gpu_with_reason():
    reason = _backend().availability()
    assert reason and "CUDA extension" in reason
    choice = vitkern.explain(OP, torch.randn(2, 3, 32, 32), torch.randn(48, 3, 8, 8))
    assert choice.backend_name == "reference"
    assert "cuda: rejected: " + reason in str(choice), str(choice)


def test_backward_problems_go_to_the_next_backend_with_the_reason():
    x, w = torch.randn(2, 3, 32, 32), torch.randn(48, 3, 8, 8)
    assert _backend().reject_reasons(pe_problem(dispatch.BACKWARD, x, w)) == [BACKWARD_REASON]


def _triton_device_reasons(problem):
    return dispatch.backends("patch_embed")["triton"].device_reasons(problem)


def test_rejects_what_the_kernels_cannot_run():
    x = torch.zeros(2, 3, 30, 32, dtype=torch.int32)
    w = torch.zeros(48, 3, 8, 8, dtype=torch.float64)
    norm = torch.zeros(2, 3, dtype=torch.float64)
    p = pe_problem(dispatch.FORWARD, x, w, torch.zeros(48), (None, None), (w.transpose(2, 3),), norm)
    reasons = " | ".join(_backend().reject_reasons(p))
    for part in ("device 'cpu'", "compute dtype torch.float64", "image dtype torch.int32",
                 "image 30x32 is not a multiple", "not contiguous", "bias dtype differs", "norm is not a contiguous float32"):
        assert part in reasons, reasons
    # fp32 tokens over a bf16 weight (autocast): Triton and the reference take it, the cuBLASLt GEMM does not
    w16 = torch.zeros(48, 3, 8, 8, dtype=torch.bfloat16)
    mixed = pe_problem(dispatch.FORWARD, torch.zeros(2, 3, 32, 32), w16, None, (torch.zeros(17, 48), None))
    assert "mixed precision runs on Triton" in " | ".join(_backend().op_reasons(mixed))
    assert dispatch.backends("patch_embed")["triton"].reject_reasons(mixed) == _triton_device_reasons(mixed)
    empty = pe_problem(dispatch.FORWARD, torch.zeros(0, 3, 32, 32), torch.zeros(48, 3, 8, 8))
    assert "empty input" in " | ".join(_backend().reject_reasons(empty))


# ----------------------------------------------------------------------------------------------- CPU: the built extension
def test_schema_exists(ops):
    assert {"default", "out"} <= set(ops.patch_embed_fwd.overloads())


@pytest.mark.parametrize("P, covers, pos", [(0, False, True), (1, True, True), (5, False, True), (2, True, False),
                                            (0, False, False)])
def test_meta_shapes(ops, P, covers, pos):
    B, D, p = 3, 96, 16
    np_ = (224 // p) * (160 // p)
    x = _meta(B, 3, 224, 160, dtype=torch.uint8)
    args = (x, _meta(2, 3, dtype=torch.float32), _meta(D, 3, p, p), _meta(D),
            _meta((P if covers else 0) + np_, D) if pos else None, _meta(P, D) if P else None, covers)
    out = ops.patch_embed_fwd(*args)
    assert (out.shape, out.dtype, out.device.type) == ((B, P + np_, D), torch.bfloat16, "meta")
    ops.patch_embed_fwd.out(*args, out=_meta(B, P + np_, D))


def test_meta_torch_compile(ops):
    def f(x, w, b, pos, prefix):
        return ops.patch_embed_fwd(x, None, w, b, pos, prefix, True)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(
        _meta(2, 3, 32, 32), _meta(48, 3, 8, 8), _meta(48), _meta(17, 48), _meta(1, 48))
    assert out.shape == (2, 17, 48)


def _pe_call(**over):
    """patch_embed_fwd on a valid problem with `over` replacing arguments; with out=..., the .out overload."""
    args = {"x": _meta(2, 3, 32, 32), "norm": None, "weight": _meta(48, 3, 8, 8), "bias": _meta(48),
            "pos": _meta(17, 48), "prefix": _meta(1, 48), "covers": True, "pos_impl": 0}
    out = over.pop("out", None)
    args.update(over)
    if out is None:
        return lambda o: o.patch_embed_fwd(*args.values())
    return lambda o: o.patch_embed_fwd.out(*args.values(), out=out)


@pytest.mark.parametrize(
    "call, match",
    [
        (_pe_call(x=_meta(2, 3, 32)), r"patch_embed_fwd: x must be 4-D"),
        (_pe_call(x=_meta(2, 3, 32, 32, dtype=torch.int32)), r"x must have dtype Byte, float16, bfloat16 or float32"),
        (_pe_call(weight=_meta(48, 3, 8, 8, dtype=torch.float64)),
         r"weight must have dtype float16, bfloat16 or float32"),
        (_pe_call(weight=_meta(48, 8, 8, 3).permute(0, 3, 1, 2)), r"weight must be contiguous"),
        (_pe_call(weight=_meta(48, 4, 8, 8)), r"weight \[D, C, ph, pw\] has C = 4 but x has 3 channels"),
        (_pe_call(x=_meta(2, 3, 30, 32)), r"image size 30x32 is not a multiple of the patch size 8x8"),
        (_pe_call(norm=_meta(2, 3)), r"norm must have dtype float32, got bfloat16"),
        (_pe_call(norm=_meta(3, 2, dtype=torch.float32)), r"norm must have shape \[2, 3\], got \[3, 2\]"),
        (_pe_call(bias=_meta(48, dtype=torch.float16)), r"bias must have weight's dtype bfloat16, got float16"),
        (_pe_call(bias=_meta(47)), r"bias.size\(0\) must be 48, got 47"),
        (_pe_call(pos=_meta(16, 48)), r"pos must have 17 rows \(prefix \+ patches: pos_covers_prefix\), got 16"),
        (_pe_call(covers=False), r"pos must have 16 rows \(one per patch\), got 17"),
        (_pe_call(pos=_meta(17, 40)), r"pos must have shape \[17, 48\], got \[17, 40\]"),
        (_pe_call(prefix=_meta(1, 48, dtype=torch.float32)), r"prefix must have weight's dtype bfloat16, got float32"),
        (_pe_call(prefix=_meta(1, 2, 48)), r"prefix must be 2-D"),
        (_pe_call(pos_impl=3), r"pos_impl must be 0 \(auto\), 1 \(broadcast C\) or 2 \(in place\), got 3"),
        (_pe_call(out=_meta(2, 16, 48)), r"patch_embed_fwd: out must have shape \[2, 17, 48\], got \[2, 16, 48\]"),
        (_pe_call(out=_meta(2, 17, 48, dtype=torch.float32)),
         r"patch_embed_fwd: out must have weight's dtype bfloat16, got float32"),
        (_pe_call(out=_meta(2, 48, 17).transpose(1, 2)), r"patch_embed_fwd: out must be contiguous"),
    ],
    ids=["x_3d", "x_dtype", "weight_dtype", "weight_strided", "channels", "not_divisible", "norm_dtype", "norm_shape",
         "bias_dtype", "bias_size", "pos_rows_covers", "pos_rows_patches", "pos_width", "prefix_dtype", "prefix_3d",
         "pos_impl", "out_shape", "out_dtype", "out_transposed"],
)
def test_checks_name_the_argument(ops, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(ops)


def test_no_cpu_kernel(ops):
    with pytest.raises(RuntimeError, match="CPU"):  # NotImplementedError from the dispatcher (a RuntimeError)
        ops.patch_embed_fwd(torch.zeros(2, 3, 32, 32), None, torch.zeros(48, 3, 8, 8), None, None, None, False)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.fixture
def cuda_calls(cuda_ops, monkeypatch):
    """Counts the CUDA backend's forward calls (so a silent fallback to Triton fails the test); pos_impl can be
    set per test through the backend's attribute."""
    calls = {"forward": 0}
    b = _backend()
    fwd = type(b).forward

    def counted(self, *args, **kw):
        calls["forward"] += 1
        return fwd(self, *args, **kw)

    monkeypatch.setattr(type(b), "forward", counted)
    return calls


def run_cuda_parity(calls, B, C, H, W, p, D, prefix, no_embed_class, dtype, norm=None, **kw):
    """vitkern.functional.patch_embed with the CUDA forward preferred (strict=False: the backward, which the CUDA
    backend rejects, runs on Triton) against float64, forward and every gradient."""
    seed = seed_for("pe-cuda", B, C, H, W, p, D, prefix, no_embed_class, dtype, norm, tuple(sorted(kw.items())))
    inputs = make_inputs(B, C, H, W, p, D, prefix, no_embed_class, dtype, "cuda", seed, **kw)
    names = [k for k, v in inputs.items() if v is not None and v.is_floating_point()]  # no grad for uint8 images
    norm = tuple(tuple(v[:C]) for v in norm) if norm is not None else None
    before = calls["forward"]

    def kernel(**a):
        with vitkern.use_backend("cuda", op=OP, strict=False):
            return vitkern_embed(**a, no_embed_class=no_embed_class, norm=norm)

    def ref(**a):
        return reference(**a, no_embed_class=no_embed_class, norm=norm)

    report = check_forward_backward(kernel, ref, inputs, names, seed=seed)
    assert calls["forward"] > before, "the CUDA forward did not run (the dispatcher fell back)"
    return report


@pytest.mark.gpu
@pytest.mark.parametrize("no_embed_class", [False, True], ids=["pos_all", "no_embed_class"])
@pytest.mark.parametrize("prefix", list(PREFIXES))  # P = 0, 1, 2, 5
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("p", [16, 14])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_parity(cuda_calls, dtype, p, channels_last, prefix, no_embed_class):
    if prefix == "none" and no_embed_class:
        pytest.skip("no prefix: no_embed_class changes nothing")
    run_cuda_parity(cuda_calls, 2, 3, 224, 224, p, 192, prefix, no_embed_class, dtype, channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("image", ["uint8", "fp32", "fp16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_fused_normalisation(cuda_calls, dtype, image, channels_last):
    """uint8 images with ImageNet mean/std in 8-bit units, and float images with a non-trivial normalisation; the
    image gradient (float images) comes from the Triton backward."""
    x_dtype = {"uint8": torch.uint8, "fp32": torch.float32, "fp16": torch.float16}[image]
    norm = UINT8_NORM if image == "uint8" else FLOAT_NORM
    run_cuda_parity(cuda_calls, 2, 3, 224, 224, 16, 384, "cls", False, dtype, x_dtype=x_dtype, norm=norm,
                    channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    ["vit_b16_batch", "vit_h14", "non_square", "odd_dim", "odd_dim_p14", "no_bias_no_pos", "pos_no_prefix",
     "one_channel", "batch_1"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_edge_cases(cuda_calls, dtype, case):
    args = {
        "vit_b16_batch": (8, 3, 224, 224, 16, 768, "cls", False),
        "vit_h14": (2, 3, 224, 224, 14, 1280, "cls", False),
        "non_square": (2, 3, 48, 80, 16, 64, "cls+dist", False),  # 3x5 grid: a swapped (gy, gx) fails
        "odd_dim": (2, 3, 64, 64, 16, 37, "cls+reg4", True),  # D % 8 != 0: scalar token rows, unaligned GEMM rows
        "odd_dim_p14": (2, 3, 56, 56, 14, 40, "cls", False),  # K = 588: 8-byte patch packs
        "no_bias_no_pos": (2, 3, 64, 64, 16, 64, "cls", False),
        "pos_no_prefix": (3, 3, 64, 64, 16, 64, "none", False),  # batched GEMM only for the broadcast pos
        "one_channel": (2, 1, 64, 64, 8, 48, "cls", False),
        "batch_1": (1, 3, 224, 224, 16, 768, "cls+reg4", False),
    }[case]
    kw = {"bias": False, "pos": False} if case == "no_bias_no_pos" else {}
    run_cuda_parity(cuda_calls, *args, dtype, channels_last=case == "non_square", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("pos_impl", ["broadcast_c", "in_place"])
@pytest.mark.parametrize("prefix, no_embed_class", [("none", False), ("cls", False), ("cls+reg4", True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_pos_embedding_paths(cuda_calls, monkeypatch, dtype, prefix, no_embed_class, pos_impl):
    """Both ways the position embedding reaches the GEMM: C with batch stride 0, and the pos rows written by the
    gather pass with the GEMM accumulating in place (auto's fallback)."""
    monkeypatch.setattr(_backend(), "pos_impl", pos_impl)
    run_cuda_parity(cuda_calls, 3, 3, 64, 64, 16, 96, prefix, no_embed_class, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_as_accurate_as_triton(cuda_ops, dtype):
    """Against float64, the CUDA forward's error is within the rule with the Triton forward's error as the baseline."""
    for p, D, prefix, no_embed_class, x_dtype, norm in ((16, 768, "cls", False, None, None),
                                                        (14, 384, "cls+reg4", True, torch.uint8, UINT8_NORM)):
        seed = seed_for("pe-cuda-vs-triton", dtype, p)
        inputs = make_inputs(2, 3, 224, 224, p, D, prefix, no_embed_class, dtype, "cuda", seed, x_dtype=x_dtype)
        outs = {}
        for backend in ("cuda", "triton"):
            with vitkern.use_backend(backend, op=OP), poison_outputs(backend == "cuda"), torch.no_grad():
                outs[backend] = vitkern_embed(**inputs, no_embed_class=no_embed_class, norm=norm)
        ref64 = reference(**{k: v.double() if v is not None and v.is_floating_point() else v
                             for k, v in inputs.items()}, no_embed_class=no_embed_class, norm=norm)
        assert_close("tokens", outs["cuda"].cpu(), ref64.cpu(), outs["triton"].cpu())


@pytest.mark.gpu
def test_cuda_strided_image_view(cuda_calls):
    """A crop view of a bigger image (no stride is contiguous-compatible): the gather reads any strides."""
    seed = seed_for("pe-cuda-crop")
    big = make_inputs(2, 3, 96, 96, 16, 64, "cls", False, torch.bfloat16, "cuda", seed)
    inputs = dict(big)

    def kernel(**a):
        a["x"] = a["x"][:, :, 8:72, 16:80]
        with vitkern.use_backend("cuda", op=OP, strict=False):
            return vitkern_embed(**a)

    def ref(**a):
        a["x"] = a["x"][:, :, 8:72, 16:80]
        return reference(**a)

    inputs["pos_embed"] = inputs["pos_embed"][:, :17]  # 1 + 4x4 patches of the 64x64 crop
    before = cuda_calls["forward"]
    check_forward_backward(kernel, ref, inputs, [k for k, v in inputs.items() if v is not None], seed=seed)
    assert cuda_calls["forward"] > before


@pytest.mark.gpu
def test_cuda_empty_batch_and_device_checks(cuda_ops):
    w = torch.randn(48, 3, 8, 8, device="cuda")
    out = cuda_ops.patch_embed_fwd(torch.zeros(0, 3, 32, 32, device="cuda"), None, w, None, None, None, False)
    assert out.shape == (0, 16, 48)
    with pytest.raises(RuntimeError, match="bias must be a CUDA tensor, got a tensor on cpu"):
        cuda_ops.patch_embed_fwd(torch.zeros(1, 3, 32, 32, device="cuda"), None, w, torch.zeros(48), None, None, False)


@pytest.mark.gpu
def test_cuda_op_torch_compile_and_opcheck(cuda_ops):
    x = torch.randint(0, 256, (2, 3, 64, 64), device="cuda", dtype=torch.uint8)
    norm = torch.tensor([[120.0, 110.0, 100.0], [1 / 58.0, 1 / 57.0, 1 / 57.5]], device="cuda")
    w = torch.randn(96, 3, 16, 16, device="cuda", dtype=torch.bfloat16) * 0.05
    b, pos, cls = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((96,), (17, 96), (1, 96)))

    def f(x, norm, w, b, pos, cls):
        return cuda_ops.patch_embed_fwd(x, norm, w, b, pos, cls, True)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, norm, w, b, pos, cls), f(x, norm, w, b, pos, cls),
                               atol=0, rtol=0)
    torch.library.opcheck(cuda_ops.patch_embed_fwd.default, (x, norm, w, b, pos, cls, True))
    # also float pixels with pos covering the class token, and uint8 pixels with per-channel norm, no bias, a
    # patch-only pos and pos_impl 2; on real tensors: torch.library.opcheck checks nothing on meta inputs
    for i, args in enumerate([
        (_meta(2, 3, 32, 32), None, _meta(48, 3, 8, 8), _meta(48), _meta(17, 48), _meta(1, 48), True),
        (_meta(2, 3, 28, 28, dtype=torch.uint8), _meta(2, 3, dtype=torch.float32), _meta(40, 3, 14, 14), None,
         _meta(4, 40), None, False, 2),
    ]):
        torch.library.opcheck(cuda_ops.patch_embed_fwd.default, materialize(args, device="cuda", seed=seed_for("oc", i)))


@pytest.mark.gpu
def test_gpu_dispatch_lists_cuda_after_triton(cuda_ops):
    x, w = torch.randn(2, 3, 64, 64, device="cuda"), torch.randn(48, 3, 16, 16, device="cuda")
    choice = vitkern.explain(OP, x, w)
    assert choice.backend_name == "triton", str(choice)  # until the GPU session commits numbers and flips the rank
    assert "cuda: supported, lower preference" in str(choice)


# the body of a vitkern.testing.sanitizer.workload (which loads the extension as `ops`)
SANITIZER_SCRIPT = r"""
for dtype in (torch.bfloat16, torch.float32):
    for B, p, D, P, covers, cl, x_dtype in ((2, 16, 96, 1, True, False, torch.uint8), (3, 14, 40, 5, False, True, None),
                                            (2, 8, 37, 0, False, False, None)):
        x = torch.randn(B, 3, 4 * p, 4 * p, device="cuda", dtype=dtype) if x_dtype is None else \
            torch.randint(0, 256, (B, 3, 4 * p, 4 * p), device="cuda", dtype=x_dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        norm = torch.tensor([[0.5, 0.4, 0.3], [2.0, 3.0, 4.0]], device="cuda")
        w = torch.randn(D, 3, p, p, device="cuda", dtype=dtype)
        b = torch.randn(D, device="cuda", dtype=dtype)
        pos = torch.randn((P if covers else 0) + 16, D, device="cuda", dtype=dtype)
        prefix = torch.randn(P, D, device="cuda", dtype=dtype) if P else None
        for pos_impl in (1, 2):
            ops.patch_embed_fwd(x, norm, w, b, pos, prefix, covers, pos_impl)
        ops.patch_embed_fwd(x, None, w, None, None, prefix, False, 0)
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("sanitizer_tool", ["memcheck", "initcheck"])
def test_compute_sanitizer(cuda_ops, sanitizer_tool):
    run_under_sanitizer(sanitizer_tool, SANITIZER_SCRIPT, None)
