"""Host time per call of vitkern's GPU path, measured without a GPU:

    python -m benchmarks.cpu.launch_overhead [--calls N] [--repeats R] [--json FILE]
    TRITON_CACHE_DIR=$(mktemp -d) python -m benchmarks.cpu.launch_overhead --first-call   # compile time instead

Each op (and a whole timm model after ``vitkern.optimize``) runs at batch 1 in fp16 under inference mode (and two
ops forward + backward) inside
``vitkern.testing.standin_driver.standin_sm90``: functional → custom op → dispatch → launcher → Triton's autotuner and
JIT run for real, the driver's launch is a no-op and nothing is computed. What is timed is the Python and torch work
the host does per call before the GPU could start, the cost that decides eager speed at small batch, where a block's
kernels take less time on an H100 than the host needs to launch them. Not included: the driver's launch call (a few
us per kernel) and the CUDA caching allocator (CPU allocations stand in). The numbers are this CPU's; a GPU
machine's host CPU is another one.

Keys are tuned on the first call (``VITKERN_AUTOTUNE=0`` here: one config per key, the per-call path of a tuned key
is the same) and compiled for sm_90 then (seconds, once). Median over R repeats of N calls, ``time.perf_counter``.
Needs real Triton JITFunctions: run it without ``TRITON_INTERPRET=1``.

``--first-call`` times instead each model's first forward with autotuning on (every config of every new key is
compiled for sm_90; the autotuner's timer is stubbed: it runs each config once and calls them equal), the cost
``VITKERN_COMPILE_THREADS`` spreads over threads. Give it an empty ``TRITON_CACHE_DIR`` or it times cache hits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import unittest.mock
from typing import Callable

os.environ.setdefault("VITKERN_AUTOTUNE", "0")
os.environ.setdefault("VITKERN_BACKEND", "triton")  # the GPU path: the CPU reference backend would otherwise win
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("launch_overhead: unset TRITON_INTERPRET (it needs the compiled launch path, not the interpreter)")

import torch  # noqa: E402

import vitkern  # noqa: E402
import vitkern.functional as F  # noqa: E402
from vitkern.testing.standin_driver import standin_sm90  # noqa: E402

DTYPE = torch.float16
C, HEADS, N = 384, 6, 197  # ViT-S/16 at 224 px, batch 1


def _r(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE)


def op_cases() -> dict[str, Callable[[], object]]:
    x, w, b = _r(1, N, C), _r(C), _r(C)
    qkv_w, qkv_b, qkv = _r(3 * C, C), _r(3 * C), _r(1, N, 3 * C)
    fc1_w, fc1_b, fc2_w, fc2_b = _r(4 * C, C), _r(4 * C), _r(C, 4 * C), _r(C)
    proj_w = _r(C, C)
    win_qkv, table = _r(1, 56, 56, 3 * 96), _r(13 * 13, 3)  # Swin-T stage 1: 56 x 56 tokens, 3 heads of 32
    image, pe_w, pe_b, pos, cls = _r(1, 3, 224, 224), _r(C, 3, 16, 16), _r(C), _r(1, N, C), _r(1, 1, C)
    return {
        "layer_norm": lambda: F.layer_norm(x, C, w, b, 1e-6),
        "ln_linear (norm1 + qkv)": lambda: F.ln_linear(x, w, b, qkv_w, qkv_b, 1e-6),
        "attention (packed qkv)": lambda: F.attention(qkv=qkv, num_heads=HEADS),
        "linear_residual (proj)": lambda: F.linear_residual(x, proj_w, b, x),
        "ln_mlp (norm2 + mlp)": lambda: F.ln_mlp(x, w, b, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6),
        "window_attention (ws 7, shift 3)": lambda: F.window_attention(win_qkv, table, 3, 7, 3),
        "patch_embed (p16 + pos + cls)": lambda: F.patch_embed(image, pe_w, pe_b, pos, cls),
    }


def training_cases() -> dict[str, Callable[[], object]]:
    """Forward + backward (``torch.autograd.grad``) of the ops whose backward has no torch GEMM (which would compute
    here): the training path's autograd nodes, saved tensors and backward launches. LayerNorm's backward also sums
    its per-program dγ/dβ partials with torch ([197, 384] fp32, computed here: a few us of the row)."""
    x, w, b = (_r(*s).requires_grad_() for s in ((1, N, C), (C,), (C,)))
    qkv = _r(1, N, 3 * C).requires_grad_()
    dy = _r(1, N, C)

    def ln():
        return torch.autograd.grad(F.layer_norm(x, C, w, b, 1e-6), (x, w, b), dy)

    def attention():
        return torch.autograd.grad(F.attention(qkv=qkv, num_heads=HEADS), (qkv,), dy)

    return {"layer_norm fwd+bwd": ln, "attention fwd+bwd (packed qkv)": attention}


def _output_of_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def model_cases() -> dict[str, Callable[[], object]]:
    """Whole models after ``vitkern.optimize``. The torch GEMMs left in them (the head; Swin's patch merging) would
    compute here, on the CPU, in fp16 (~15 ms per Swin-T forward): inside these rows ``F.linear`` only allocates its
    output, so the rows count their host work as one allocation (a GPU launch of a torch GEMM costs a few us more)."""
    import timm

    out = {}
    for name in ("vit_small_patch16_224", "swin_tiny_patch4_window7_224"):
        model = timm.create_model(name).to(DTYPE).eval()
        vitkern.optimize(model)
        images = _r(1, 3, 224, 224)

        def forward(model=model, images=images):
            with unittest.mock.patch.object(torch.nn.functional, "linear", _output_of_linear):
                return model(images)

        out[f"{name} forward"] = forward
    return out


def first_calls() -> dict:
    """Seconds of each model's first forward with autotuning on (compiles), and the sm_90 compiles it started."""
    import triton.testing
    from triton.runtime.jit import JITFunction

    from vitkern.kernels.triton import tuning

    def untimed(kernel_call, quantiles=None, **_):  # no device to time on: run once, all configs equal
        kernel_call()
        return [1.0] * len(quantiles or (0.5,))

    compiles = []
    do_compile = JITFunction._do_compile

    def counting(self, *args, **kwargs):
        compiles.append(self.fn.__name__)
        return do_compile(self, *args, **kwargs)

    os.environ["VITKERN_AUTOTUNE"] = "1"
    rows = {}
    with unittest.mock.patch.object(triton.testing, "do_bench", untimed), \
            unittest.mock.patch.object(JITFunction, "_do_compile", counting):
        for name, forward in model_cases().items():
            compiles.clear()
            start = time.perf_counter()
            forward()
            rows[name] = {"first_call_s": time.perf_counter() - start, "compiles": len(compiles),
                          "compile_threads": tuning.compile_threads()}
            print(f"{name:40s} first call {rows[name]['first_call_s']:7.1f} s  {len(compiles)} compiles  "
                  f"on {rows[name]['compile_threads']} threads", flush=True)
    return rows


def measure(fn: Callable[[], object], calls: int, repeats: int, fake) -> dict:
    for _ in range(3):  # first call: dispatch caches, tuning choice, sm_90 compile; then warm
        fn()
    before = len(fake.launched)
    fn()
    launches = len(fake.launched) - before
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return {"us_per_call": statistics.median(per_call), "launches_per_call": launches,
            "us_per_launch": statistics.median(per_call) / max(launches, 1)}


def _row(name: str, fn: Callable[[], object], args, fake) -> dict:
    row = measure(fn, args.calls if "forward" not in name else max(1, args.calls // 30), args.repeats, fake)
    print(f"{name:40s} {row['us_per_call']:9.1f} us/call  {row['launches_per_call']:4d} launches  "
          f"{row['us_per_launch']:6.1f} us/launch", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--models", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--first-call", action="store_true", help="time the models' first calls (compiles) instead")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with standin_sm90() as fake:
        with torch.inference_mode():
            rows = first_calls() if args.first_call else {}
            cases = {} if args.first_call else {**op_cases(), **(model_cases() if args.models else {})}
            for name, fn in cases.items():
                rows[name] = _row(name, fn, args, fake)
        for name, fn in ({} if args.first_call else training_cases()).items():
            rows[name] = _row(name, fn, args, fake)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": str(DTYPE), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
