"""Host-side benchmarks with pytest-benchmark: what vitkern costs on the CPU, measured on the machine at hand.

- the CPU fallback: a timm model after ``vitkern.optimize`` (the reference backends) beside the same model in eager,
  inference and a training step;
- the swap: ``vitkern.optimize`` + ``vitkern.restore`` on ViT-B/16 and Swin-T;
- the per-call overhead: one op at a tiny shape (custom op + dispatch + validation + the reference computation)
  beside the torch call it replaces;
- the GPU path's host time, without a GPU (``python -m benchmarks.cpu.launch_overhead``, in a process of its own):
  here only run once, checking the launches each op and model makes.

    pytest benchmarks/cpu --benchmark-only                  # timings (--benchmark-json FILE to keep them)
    pytest benchmarks/cpu --benchmark-disable               # smoke: each function once (CI runs this)

Every number here is CPU wall-clock on this machine: none says anything about GPU speed, which only
benchmarks/run_all.py measures, on a GPU. Groups put each vitkern row beside its eager row.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")
timm = pytest.importorskip("timm")

import vitkern  # noqa: E402

MODELS = {  # small enough for CI's smoke run (each timed function once)
    "vit_tiny_patch16_224": 4,
    "deit_tiny_distilled_patch16_224": 4,
    "swin_tiny_patch4_window7_224": 2,
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_images(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param)
    return request.param, model, torch.randn(MODELS[request.param], 3, 224, 224)


def _loss(out) -> torch.Tensor:
    return sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("provider", ["eager", "vitkern"])
@pytest.mark.parametrize("mode", ["inference", "train-step"])
def test_cpu_fallback(benchmark, model_and_images, mode, provider):
    name, model, images = model_and_images
    model = copy.deepcopy(model).train(mode != "inference")
    if provider == "vitkern":
        vitkern.optimize(model)
    benchmark.group = f"cpu fallback: {name} B={images.shape[0]} {mode}"

    def run():
        if mode == "inference":
            with torch.inference_mode():
                return model(images)
        model.zero_grad(set_to_none=True)
        _loss(model(images)).backward()

    benchmark(run)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_optimize_and_restore(benchmark, name):
    model = timm.create_model(name)
    benchmark.group = "swap: optimize + restore"

    def swap(m):
        vitkern.optimize(m)
        vitkern.restore(m)

    benchmark.pedantic(swap, setup=lambda: ((copy.deepcopy(model),), {}), rounds=3)


def _tiny_calls(x=None, qkv=None):
    """op -> (vitkern call, the torch call it replaces), on tiny inputs where the host work dominates (x [1, 4, 64]
    and qkv [1, 4, 192] may be given, e.g. requiring gradients)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w, b = r(64), r(64)
    x = r(1, 4, 64) if x is None else x
    qkv = r(1, 4, 3 * 64) if qkv is None else qkv
    w1, b1, w2, b2 = r(256, 64), r(256), r(64, 256), r(64)

    def sdpa(t):
        q, k, v = t.view(1, 4, 3, 2, 32).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 4, 64)

    return {
        "layer_norm": (lambda: vitkern.functional.layer_norm(x, (64,), w, b), lambda: F.layer_norm(x, (64,), w, b)),
        "attention": (lambda: vitkern.functional.attention(qkv=qkv, num_heads=2), lambda: sdpa(qkv)),
        "ln_mlp": (lambda: vitkern.functional.ln_mlp(x, w, b, w1, b1, w2, b2),
                   lambda: x + F.linear(F.gelu(F.linear(F.layer_norm(x, (64,), w, b), w1, b1)), w2, b2)),
    }


@pytest.mark.parametrize("provider", ["torch", "vitkern"])
@pytest.mark.parametrize("op", ["layer_norm", "attention", "ln_mlp"])
@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])  # no_grad: the op's autograd key is live
def test_per_call_overhead(benchmark, grad_mode, op, provider):
    mine, theirs = _tiny_calls()[op]
    torch.testing.assert_close(mine(), theirs(), rtol=1e-4, atol=1e-5)  # the rows time the same computation
    benchmark.group = f"per call, tiny input, {grad_mode}: {op}"
    with getattr(torch, grad_mode)():
        benchmark(mine if provider == "vitkern" else theirs)


@pytest.mark.parametrize("provider", ["torch", "vitkern"])
@pytest.mark.parametrize("op", ["layer_norm", "attention"])
def test_per_call_overhead_forward_backward(benchmark, op, provider):
    """Forward and backward of one op whose input needs a gradient (the training path: autograd nodes, saved
    tensors, the backward op)."""
    g = torch.Generator().manual_seed(1)
    width = 64 if op == "layer_norm" else 3 * 64
    x = torch.randn(1, 4, width, generator=g).requires_grad_()
    mine, theirs = _tiny_calls(x if op == "layer_norm" else None, x if op == "attention" else None)[op]
    benchmark.group = f"per call, tiny input, forward + backward: {op}"
    benchmark(lambda: (mine if provider == "vitkern" else theirs)().sum().backward())


# launches each call makes on the GPU path (benchmarks/cpu/launch_overhead.py): ViT-S is 12 blocks of ln_linear (LN
# statistics + GEMM), attention, linear_residual and ln_mlp (3 GEMMs with the LN prologue), plus the patch embedding
# and the final LayerNorm; Swin-T adds the window attention per block and LN + GEMM per patch merging
GPU_PATH_LAUNCHES = {
    "layer_norm": 1, "ln_linear (norm1 + qkv)": 2, "attention (packed qkv)": 1, "linear_residual (proj)": 1,
    "ln_mlp (norm2 + mlp)": 3, "window_attention (ws 7, shift 3)": 1, "patch_embed (p16 + pos + cls)": 1,
    "vit_small_patch16_224 forward": 86, "swin_tiny_patch4_window7_224 forward": 90,
    # training: LayerNorm's backward is one kernel (dx and per-program dγ/dβ partials, summed by torch); attention's
    # is three (delta, dk/dv, dq)
    "layer_norm fwd+bwd": 2, "attention fwd+bwd (packed qkv)": 4,
}


def test_gpu_path_host_time_runs_and_launches_what_it_should(tmp_path):
    """The GPU-path host-time script (a process of its own: it needs compiled kernels, not the interpreter) runs
    every row once here, and each row makes the launches the GPU path makes."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.cpu.launch_overhead", "--calls", "2", "--repeats", "1",
                        "--json", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {name: row["launches_per_call"] for name, row in rows.items()} == GPU_PATH_LAUNCHES
    assert all(row["us_per_call"] > 0 for row in rows.values())
    # --first-call: the models' first forwards with autotuning on compile every config of every new key (an empty
    # Triton cache, so that they do compile)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    r = subprocess.run([sys.executable, "-m", "benchmarks.cpu.launch_overhead", "--first-call", "--json", str(out)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = json.loads(out.read_text())["rows"]
    assert set(first) == {name for name in GPU_PATH_LAUNCHES if name.endswith("forward")}
    # more compiles than a forward's distinct launch keys (each autotuned key compiles its whole config list)
    assert all(row["compiles"] > 40 and row["first_call_s"] > 0 for row in first.values()), first
