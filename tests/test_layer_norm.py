"""LayerNorm (+ fused residual add): parity of every backend against a float64 reference, forward and gradients.

Tolerance: vitkern.testing's rule, err <= 2 x (PyTorch's error in the same dtype) + atol(dtype) x scale, both
measured against F.layer_norm in float64 on the same inputs (see vitkern/testing/numerics.py).
"""

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.ops import layer_norm as ln_op
from vitkern.testing import (
    check_compile_and_cuda_graph, check_forward_backward, poison_outputs, randn, run_every_triton_config,
    run_in_gpu_geometry, seed_for,
)

WIDTHS = [192, 384, 768, 1000, 1280]
ROWS = [1, 3, 197 * 2]


def reference(x, weight=None, bias=None, residual=None, eps=1e-5):
    """What the op computes, in plain PyTorch (run in float64 for the oracle, in x's dtype for the baseline)."""
    if residual is not None:
        s = x + residual
        return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def vitkern_ln(x, weight=None, bias=None, residual=None, eps=1e-5):
    return vitkern.functional.layer_norm(x, x.shape[-1:], weight, bias, eps, residual=residual)


def make_inputs(rows, width, dtype, device, residual, seed, affine=True, param_dtype=None, mean=0.0):
    param_dtype = param_dtype or dtype
    return {
        "x": randn((rows, width), dtype=dtype, device=device, seed=seed, mean=mean),
        "weight": randn((width,), dtype=param_dtype, device=device, seed=seed + 1, mean=1.0, scale=0.5) if affine else None,
        "bias": randn((width,), dtype=param_dtype, device=device, seed=seed + 2) if affine else None,
        "residual": randn((rows, width), dtype=dtype, device=device, seed=seed + 3) if residual else None,
    }


def grad_names(inputs):
    return [k for k, v in inputs.items() if v is not None]


def run_parity(backend, rows, width, dtype, device, residual, **kw):
    seed = seed_for("ln", backend, rows, width, dtype, residual, tuple(sorted(kw.items())))
    inputs = make_inputs(rows, width, dtype, device, residual, seed, **kw)
    with vitkern.use_backend(backend, op="layer_norm"):
        return check_forward_backward(vitkern_ln, reference, inputs, grad_names(inputs), seed=seed)


# ----------------------------------------------------------------------------------------------- CPU interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_interpreter_parity(dtype, width, rows, residual):
    run_parity("triton", rows, width, dtype, "cpu", residual)


@pytest.mark.interpreter
@pytest.mark.parametrize("affine", ["no_affine", "weight_only", "fp32_params"])
def test_triton_interpreter_param_variants(affine):
    seed = seed_for("ln-variants", affine)
    if affine == "no_affine":
        inputs = make_inputs(5, 384, torch.float16, "cpu", True, seed, affine=False)
    elif affine == "weight_only":
        inputs = make_inputs(5, 384, torch.float32, "cpu", False, seed)
        inputs["bias"] = None
    else:  # fp16 activations with fp32 parameters (mixed precision); output stays fp16
        inputs = make_inputs(5, 384, torch.float16, "cpu", True, seed, param_dtype=torch.float32)
    with vitkern.use_backend("triton", op="layer_norm"):
        check_forward_backward(vitkern_ln, reference, inputs, grad_names(inputs), seed=seed)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "3d_batch_slice"])
def test_triton_interpreter_non_contiguous(layout):
    """Strided inputs: views are built inside the function so the gradient lands on the leaf."""
    width, seed = 192, seed_for("ln-strided", layout)
    big = randn((6, 2 * width) if layout != "transposed" else (width, 6), dtype=torch.float32, device="cpu", seed=seed)
    if layout == "3d_batch_slice":
        big = randn((4, 3, width), dtype=torch.float32, device="cpu", seed=seed)
    view = {
        "column_slice": lambda t: t[:, ::2],
        "transposed": lambda t: t.t(),
        "3d_batch_slice": lambda t: t[::2],
    }[layout]
    params = make_inputs(1, width, torch.float32, "cpu", False, seed + 7)
    inputs = {"x": big, "weight": params["weight"], "bias": params["bias"], "residual": torch.randn_like(big)}

    def kernel(x, weight, bias, residual):
        return vitkern_ln(view(x), weight, bias, view(residual))

    def ref(x, weight, bias, residual):
        return reference(view(x), weight, bias, view(residual))

    with vitkern.use_backend("triton", op="layer_norm"):
        check_forward_backward(kernel, ref, inputs, ["x", "weight", "bias", "residual"], seed=seed)


@pytest.mark.interpreter
def test_triton_interpreter_large_mean_is_stable():
    """|mean|/std = 100: a one-pass E[x^2]-E[x]^2 variance would lose most digits here; the two-pass one does not."""
    run_parity("triton", 7, 768, torch.float32, "cpu", False, mean=100.0)


@pytest.mark.interpreter
def test_triton_weight_grad_is_deterministic():
    seed = seed_for("ln-det")
    x = randn((394, 768), dtype=torch.float32, device="cpu", seed=seed).requires_grad_()
    w = randn((768,), dtype=torch.float32, device="cpu", seed=seed + 1).requires_grad_()
    dy = randn((394, 768), dtype=torch.float32, device="cpu", seed=seed + 2)
    with vitkern.use_backend("triton", op="layer_norm"):
        grads = [torch.autograd.grad(vitkern_ln(x, w), (x, w), dy) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("affine", ["affine", "weight_only", "no_affine"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("path", ["aten", "explicit"])
def test_reference_backend_parity(monkeypatch, path, dtype, residual, affine):
    """Both paths of the reference backend: aten's LayerNorm (fp32/fp64 with parameters of the input's dtype) and
    the explicit formulas (16-bit inputs, mixed parameters), forward and gradients."""
    if path == "explicit":
        monkeypatch.setattr(ln_op, "aten_keeps_contract", lambda *t: False)
    seed = seed_for("ln-ref", path, dtype, residual, affine)
    inputs = make_inputs(394, 768, dtype, "cpu", residual, seed, affine=affine != "no_affine")
    if affine == "weight_only":
        inputs["bias"] = None
    with vitkern.use_backend("reference", op="layer_norm"):
        check_forward_backward(vitkern_ln, reference, inputs, grad_names(inputs), seed=seed)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", [1, 3, 394, 256 * 197])
@pytest.mark.parametrize("width", WIDTHS + [1024, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_triton_gpu_parity(dtype, width, rows, residual):
    run_parity("triton", rows, width, dtype, "cuda", residual)


@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiles every autotune config: over the suite's 120 s per test on a cold cache
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])  # tiling differs per config, not per dtype
def test_triton_gpu_every_config(dtype):
    """Every rows-per-program / warps config of the forward (with residual) and backward at ViT-B width, with a row
    count (394) that leaves a partial last block for every BLOCK_M."""
    run_every_triton_config(lambda: run_parity("triton", 394 + 3, 768, dtype, "cuda", True))


@pytest.mark.interpreter
@pytest.mark.parametrize("rows, width, dtype, residual, num_sms", [
    (61, 768, torch.float32, True, 2), (37, 1280, torch.bfloat16, False, 132)], ids=["w768-fp32-res", "w1280-bf16"])
def test_interpreter_gpu_geometry_every_config(rows, width, dtype, residual, num_sms):
    """Every rows-per-program config of the forward and backward, in the interpreter with the GPU path's tiles and
    persistent grids (2 SMs: each program walks several row blocks; vitkern.testing.gpu_geometry): parity, bounds
    and races of what test_triton_gpu_every_config runs, before a GPU does. 61 / 37 rows: a partial last block for
    every BLOCK_M."""
    run_in_gpu_geometry(lambda: run_parity("triton", rows, width, dtype, "cpu", residual), num_sms=num_sms)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gpu_mixed_params_and_large_mean(dtype):
    run_parity("triton", 4096, 768, dtype, "cuda", True, param_dtype=torch.float32)
    run_parity("triton", 4096, 1280, dtype, "cuda", False, mean=100.0)


@pytest.mark.gpu
def test_gpu_default_dispatch_is_triton_and_wide_rows_fall_back():
    x = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16)
    assert vitkern.explain("layer_norm", x, 768).backend_name in ("triton", "cuda")
    wide = torch.randn(4, 16384, device="cuda", dtype=torch.bfloat16)
    choice = vitkern.explain("layer_norm", wide, 16384)
    assert choice.backend_name == "reference" and "16384" in str(choice)
    torch.testing.assert_close(vitkern_ln(wide), F.layer_norm(wide, (16384,)), atol=3e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_gpu_fuzz():
    g = torch.Generator().manual_seed(1234)
    for _ in range(40):
        rows = int(torch.randint(1, 5000, (1,), generator=g))
        width = int(torch.randint(1, 8193, (1,), generator=g))
        dtype = [torch.bfloat16, torch.float16, torch.float32][int(torch.randint(0, 3, (1,), generator=g))]
        residual = bool(torch.randint(0, 2, (1,), generator=g))
        run_parity("triton", rows, width, dtype, "cuda", residual)


@pytest.mark.gpu
def test_gpu_torch_compile_and_cuda_graph():
    m = vitkern.nn.LayerNorm(768, device="cuda", dtype=torch.bfloat16)
    check_compile_and_cuda_graph(m, torch.randn(394, 768, device="cuda", dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------- dispatch, modules
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("width", [384, 768, 1280, 8192])
def test_gpu_configs_are_pruned_by_elements_per_thread(kernel, width):
    """The autotune prune drops the configs whose row tile holds more elements per thread than compiled without
    spills on sm_90 (ln_k.MAX_PER_THREAD) and keeps the rest, in list order (the first is what VITKERN_AUTOTUNE=0
    runs)."""
    from vitkern.kernels.triton import layer_norm as ln_k

    bn = ln_k._block_n(width)
    configs = ln_k._gpu_configs()
    kept = ln_k._prune_for(kernel)(configs, {"BLOCK_N": bn})
    per_thread = {id(c): c.kwargs["BLOCK_M"] * bn / (32 * c.num_warps) for c in configs}
    fits = [c for c in configs if per_thread[id(c)] <= ln_k.MAX_PER_THREAD[kernel]
            and c.kwargs["BLOCK_M"] * bn <= ln_k.MAX_TILE]
    assert kept == fits and kept


def test_cpu_default_is_reference_and_explain_lists_triton():
    x = torch.randn(3, 192)
    choice = vitkern.explain(vitkern.functional.layer_norm, x, 192)
    assert choice.backend_name == "reference"
    assert "triton" in str(choice)


def test_forced_backend_that_rejects_raises_with_reason():
    x = torch.randn(2, 3, dtype=torch.float64)  # fp64: reference only
    with vitkern.use_backend("triton", op="layer_norm"), pytest.raises(vitkern.BackendError, match="dtype"):
        vitkern_ln(x)
    with vitkern.use_backend("triton", op="layer_norm", strict=False):
        assert vitkern.explain("layer_norm", x, 3).backend_name == "reference"
    with pytest.raises(ValueError, match="no backend 'nope'"):
        with vitkern.use_backend("nope", op="layer_norm"):
            pass


def test_env_var_forces_backend(monkeypatch):
    x = torch.randn(2, 8, dtype=torch.float64)
    monkeypatch.setenv("VITKERN_BACKEND", "layer_norm=triton")
    with pytest.raises(vitkern.BackendError, match=r"\$VITKERN_BACKEND"):
        vitkern_ln(x)
    monkeypatch.setenv("VITKERN_BACKEND", "attention=triton")  # another op: layer_norm dispatches as usual
    assert vitkern.explain("layer_norm", x, 8).backend_name == "reference"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: vitkern_ln(torch.arange(6).view(2, 3)), TypeError, "x has dtype torch.int64"),
        (lambda: vitkern.functional.layer_norm(torch.randn(2, 3), 4), ValueError, "trailing dims"),
        (lambda: vitkern.functional.layer_norm(torch.randn(2, 3), (0,)), ValueError, "normalized_shape"),
        (lambda: vitkern.functional.layer_norm(torch.randn(2, 3), 3, torch.randn(4)), ValueError, "weight has shape"),
        (lambda: vitkern.functional.layer_norm(torch.randn(2, 3), 3, torch.randn(3, device="meta")), ValueError,
         "weight is on meta"),
        (lambda: vitkern_ln(torch.randn(2, 3), residual=torch.randn(2, 3, dtype=torch.float64)), TypeError,
         "residual has dtype"),
        (lambda: vitkern_ln(torch.randn(2, 3), residual=torch.randn(3, 3)), ValueError, "residual has shape"),
        (lambda: vitkern_ln(torch.randn(2, 3), eps=-1.0), ValueError, "eps must be a positive"),
        (lambda: vitkern.functional.layer_norm([1.0, 2.0], 2), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_module_is_drop_in_for_torch_layernorm(affine, bias):
    ref = torch.nn.LayerNorm((4, 48), eps=1e-6, elementwise_affine=affine, bias=bias)
    if affine:
        torch.nn.init.normal_(ref.weight)
        if bias:
            torch.nn.init.normal_(ref.bias)
    mine = vitkern.nn.LayerNorm((4, 48), eps=1e-6, elementwise_affine=affine, bias=bias)
    assert isinstance(mine, torch.nn.LayerNorm)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    mine.load_state_dict(ref.state_dict())
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(2, 5, 4, 48)
    torch.testing.assert_close(mine(x), ref(x))
    shared = vitkern.nn.LayerNorm.from_torch(ref)
    torch.testing.assert_close(shared(x), ref(x))
    if affine:
        assert shared.weight is ref.weight
    y, s = mine(x, residual=x)
    torch.testing.assert_close(s, 2 * x)
    torch.testing.assert_close(y, ref(2 * x))


def _autocast_dtypes_match_torch(device):
    """Under autocast the module returns torch's dtype for a bf16 x (on CUDA fp32: LayerNorm is on autocast's fp32
    list). Where that is fp32, a bf16 x may also meet an fp32 residual stream, as ``x + stream`` may in torch.
    Values: the same LayerNorm in torch, to the output dtype's rounding."""
    ref = torch.nn.LayerNorm(64, device=device)
    torch.nn.init.normal_(ref.weight), torch.nn.init.normal_(ref.bias)
    mine = vitkern.nn.LayerNorm.from_torch(ref)
    x = torch.randn(5, 64, device=device, dtype=torch.bfloat16)
    stream = torch.randn(5, 64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected, out = ref(x), mine(x)
        assert out.dtype == expected.dtype
        torch.testing.assert_close(out, expected)
        if out.dtype == torch.float32:
            y, s = mine(x, residual=stream)
            torch.testing.assert_close(s, x.float() + stream, rtol=0, atol=0)
            torch.testing.assert_close(y, ref(x + stream))
    return out.dtype


def test_autocast_follows_torchs_per_device_layer_norm_policy(monkeypatch):
    """CPU autocast leaves LayerNorm in the input dtype; CUDA autocast (emulated here by putting "cpu" on vitkern's
    list of devices whose autocast runs layer_norm in fp32) computes and returns fp32."""
    assert _autocast_dtypes_match_torch("cpu") == torch.bfloat16
    from vitkern.functional import _autocast

    monkeypatch.setattr(_autocast, "LAYER_NORM_FP32_DEVICES", ("cpu",))
    x, w = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = vitkern_ln(x, w, None, residual=torch.randn(5, 64))
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(y, F.layer_norm(s, (64,), w))


@pytest.mark.gpu
def test_gpu_autocast_returns_fp32_as_torch_does():
    assert _autocast_dtypes_match_torch("cuda") == torch.float32


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration and dispatch consistency."""
    x, r = torch.randn(5, 64), torch.randn(5, 64)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_fwd.default, (x.requires_grad_(), w, b, r, 1e-5))
    y, s, mean, rstd = torch.ops.vitkern.layer_norm_fwd(x.detach(), w.detach(), b.detach(), r, 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.vitkern.layer_norm_bwd.default, (dy, dy, s, w.detach(), mean, rstd, True, True))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_torch_compile_fullgraph_no_graph_breaks(backend):
    """The module traces as one graph (custom op + fake impl + autograd), forward and backward."""

    class PreNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = vitkern.nn.LayerNorm(64)
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x, r):
            y, s = self.norm(x, residual=r)
            return self.fc(y) + s

    torch._dynamo.reset()
    model = PreNorm()
    x, r = torch.randn(3, 5, 64, requires_grad=True), torch.randn(3, 5, 64)
    with vitkern.use_backend(backend, op="layer_norm"):
        eager = model(x, r)
        (gx_eager,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x, r)
        (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gx, gx_eager)


@pytest.mark.interpreter
def test_poisoned_outputs_are_all_written():
    x = randn((13, 1000), dtype=torch.float16, device="cpu", seed=seed_for("poison"))
    with vitkern.use_backend("triton", op="layer_norm"), poison_outputs():
        y, s = vitkern_ln(x, residual=x)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


@pytest.mark.interpreter
def test_direct_op_call_with_strided_columns_falls_back_to_reference():
    """torch.ops.vitkern.layer_norm_fwd called directly with non-unit column stride: the Triton backend says why it
    declines and the reference computes the right answer."""
    x = randn((8, 128), dtype=torch.float32, device="cpu", seed=seed_for("strided-op"))[:, ::2]
    from vitkern.ops import layer_norm as ln

    reasons = ln.LayerNormTriton().reject_reasons(ln.problem("forward", x, None, None))
    assert any("stride(1) != 1" in r for r in reasons)
    with vitkern.use_backend("triton", op="layer_norm", strict=False):
        y = torch.ops.vitkern.layer_norm_fwd(x, None, None, None, 1e-5)[0]
    torch.testing.assert_close(y, F.layer_norm(x, (64,)))


@pytest.mark.interpreter
@pytest.mark.parametrize("entry", ["vitkern.ops", "torch.ops"])
def test_forced_backend_reaches_a_backward_run_on_another_thread(monkeypatch, entry):
    """CUDA backwards run on autograd device threads, which start with an empty contextvars context: the forward's
    forcing must travel with the graph (dispatch.register_autograd). Simulated here with a plain thread, through
    both autograd paths: the op object's that the functionals call (an autograd.Function) and torch.ops' (the op's
    Autograd kernel, what torch.compile traces)."""
    import threading

    from vitkern.ops import layer_norm as ln

    calls = []
    original = ln.LayerNormTriton.backward
    monkeypatch.setattr(ln.LayerNormTriton, "backward", lambda self, *a: calls.append(1) or original(self, *a))
    x = randn((5, 64), dtype=torch.float32, device="cpu", seed=seed_for("thread")).requires_grad_()
    with vitkern.use_backend("triton", op="layer_norm"):
        op = ln.layer_norm_fwd if entry == "vitkern.ops" else torch.ops.vitkern.layer_norm_fwd
        y = op(x, None, None, None, 1e-5)[0]
    node = type(y.grad_fn).__name__
    assert node == "vitkern_layer_norm_fwdBackward" if entry == "vitkern.ops" else node.startswith("GeneratedBackward")
    worker = threading.Thread(target=lambda: y.sum().backward())
    worker.start()
    worker.join()
    assert calls == [1] and x.grad is not None
