"""The CUDA C++ backend of the attention op family (kernels: csrc/ops/attention.cu, attention.cuh, attention_mma.cuh;
op ``torch.ops.vitkern_C.attention_fwd``).

Forward only. The kernel writes exactly what the backend contract of :mod:`vitkern.ops.attention` asks of a forward
(``o`` through its strides, ``lse`` = fp32 natural-log logsumexp [B, H, N_Q]), which is the input of the Triton and
reference backwards. Backward problems are rejected with a reason, so the dispatcher runs the Triton backward (on a
GPU) after a CUDA forward and ``vitkern.explain`` / ``dispatch.select`` on the backward problem say so. Forcing
``cuda`` strictly therefore fails in the backward with that reason; use ``use_backend("cuda", strict=False)`` to
train with the CUDA forward.

Kernels: the op picks between the mma.sync kernels (resident K/V at ViT lengths, streaming otherwise; sm_80+) by
itself. The sm_90a warpgroup-MMA kernels (``wgmma``: 2 warpgroups = 128 query rows per CTA, ``wgmma1``: one) are
chosen explicitly, with ``VITKERN_CUDA_ATTENTION_KERNEL=wgmma`` or :func:`use_kernel`, until GPU parity tests and
benchmarks have validated them (csrc/ops/attention_wgmma.cuh). A device or build that cannot run the chosen kernel is
rejected with the reason, and the dispatcher falls back to the next backend.

Needs the optional extension ``vitkern._C`` (``bash scripts/build_csrc.sh --inplace`` or
``vitkern._extension.load_jit()``) and a GPU it was compiled for; otherwise :meth:`AttentionCuda.availability` says
why.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from vitkern import dispatch, memory
from vitkern._extension import extension_status
from vitkern.backends.cuda_common import CudaBackend
from vitkern.ops.attention import OP

__all__ = ["AttentionCuda", "KERNELS", "kernel_choice", "use_kernel"]

CUDA_HEAD_DIMS = (32, 64, 80, 96, 128)  # csrc/common/dispatch.h VITKERN_HEADDIM_SWITCH
CUDA_DTYPES = (torch.float16, torch.bfloat16)  # mma.sync m16n8k16 inputs
_MAX_GRID = 2**31 - 1
KERNEL_ENV = "VITKERN_CUDA_ATTENTION_KERNEL"
# name -> kernel_path of vitkern_C::attention_fwd (csrc/ops/attention.cu)
KERNELS = {"auto": 0, "resident": 1, "streaming": 2, "wgmma": 3, "wgmma1": 4}
WGMMA_KERNELS = ("wgmma", "wgmma1")
_kernel_override: Optional[str] = None


def kernel_choice() -> str:
    """The CUDA attention kernel calls use: :func:`use_kernel`'s, else ``$VITKERN_CUDA_ATTENTION_KERNEL``, else
    ``auto`` (the op's own resident / streaming choice)."""
    name = _kernel_override or os.environ.get(KERNEL_ENV, "").strip() or "auto"
    if name not in KERNELS:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(KERNELS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Run the CUDA attention forward with kernel ``name`` (a key of :data:`KERNELS`) inside the block."""
    global _kernel_override
    if name not in KERNELS:
        raise ValueError(f"use_kernel: name must be one of {', '.join(KERNELS)}; got {name!r}")
    previous, _kernel_override = _kernel_override, name
    try:
        yield
    finally:
        _kernel_override = previous


def vector_ready(t: torch.Tensor) -> bool:
    """The layout the kernels read and write with 16-byte vectors: unit stride in the last dim, every other stride a
    multiple of 8 elements (or its dim of size 1), 16-byte aligned data (the C++ op's own checks, mirrored)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(s % 8 == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1]))


class AttentionCuda(CudaBackend):
    """Hand-written CUDA flash-attention forward: mma.sync m16n8k16 tensor cores, fp32 online softmax in exp2, any
    N; at ViT lengths one CTA keeps a head's whole K/V in shared memory and walks several query tiles against it."""

    op_name = "attention_fwd"  # ranked after Triton until measured: vitkern/backends/cuda_common.py

    def op_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = []
        B, H, nq, d = problem.shape("q")
        nk = problem.shape("k")[2]
        if d not in CUDA_HEAD_DIMS:
            reasons.append(f"head_dim {d} not in {CUDA_HEAD_DIMS} (one kernel per head dim)")
        if min(B, H, nq, nk) == 0:
            reasons.append(f"empty input (B, H, N_Q, N_K) = {(B, H, nq, nk)}")
        if B * H * -(-nq // 16) > _MAX_GRID:
            reasons.append(f"B*H*ceil(N_Q/16) = {B * H * -(-nq // 16)} CTAs > the grid limit {_MAX_GRID}")
        if problem.attr("dropout_p", 0.0) > 0:
            reasons.append(f"dropout on the attention probabilities (dropout_p={problem.attr('dropout_p')}) is not fused")
        if not problem.attr("same_dtype", True):
            reasons.append("q, k, v have different dtypes")
        return reasons

    def settings(self) -> tuple[tuple[str, str], ...]:
        name = kernel_choice()
        return () if name == "auto" else (("kernel", name),)

    def device_reasons(self, problem: dispatch.Problem, index: int) -> list[str]:
        name = kernel_choice()
        if name not in WGMMA_KERNELS:
            return []
        reasons = []
        cap = torch.cuda.get_device_capability(index)
        if cap != (9, 0):
            reasons.append(f"{KERNEL_ENV}={name} needs an sm_90 GPU (H100/H200); cuda:{index} is sm_{cap[0]}{cap[1]}")
        archs = extension_status().info().get("cuda_archs", "")
        if "sm_90a" not in archs.split(","):
            reasons.append(f"{KERNEL_ENV}={name} needs vitkern._C built for sm_90a; it was built for [{archs}]")
        return reasons

    def forward(self, q, k, v, scale, o):
        # The Problem carries no strides, so layouts the kernel cannot vector-load (a strided head dim, odd row
        # strides, a misaligned slice) are copied here instead of being rejected; the packed qkv linear output and
        # every contiguous [B,H,N,D] / [B,N,H,D] tensor go through untouched.
        q, k, v = (t if vector_ready(t) else t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))
        lse = memory.empty(q.shape[:3], torch.float32, q.device)
        out = o if vector_ready(o) else memory.empty(o.shape, o.dtype, o.device)
        torch.ops.vitkern_C.attention_fwd.out(q, k, v, float(scale), KERNELS[kernel_choice()], out=out, lse=lse)
        if out is not o:
            o.copy_(out)
        return lse


dispatch.register_backend(OP, AttentionCuda())
