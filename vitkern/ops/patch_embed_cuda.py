"""The CUDA C++ backend of the patch-embedding op family (csrc/ops/patch_embed.cu: one gather kernel writing the
patch rows and the prefix tokens, then a cuBLASLt GEMM whose output lands at its final offset in the token buffer,
bias through the epilogue, position embedding through a batch-stride-0 C; op ``torch.ops.vitkern_C.patch_embed_fwd``).

Forward only. It returns exactly the forward contract of :mod:`vitkern.ops.patch_embed` (``out [B, P + Np, D]``),
and the backward needs only the op's inputs (x, norm, weight), so backward problems are rejected with a reason and
run on the next backend in order (Triton on a GPU). Ranked after Triton until GPU measurements are committed.
"""

from __future__ import annotations

import torch

from vitkern import dispatch, memory
from vitkern.backends.cuda_common import CudaBackend
from vitkern.ops.patch_embed import OP, input_reasons
from vitkern.validation import dense_vector

__all__ = ["PatchEmbedCuda"]

CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # compute (weight) dtypes
IMAGE_DTYPES = CUDA_DTYPES + (torch.uint8,)
POS_IMPLS = {"auto": 0, "broadcast_c": 1, "in_place": 2}  # csrc/ops/patch_embed.cu PosImpl


class PatchEmbedCuda(CudaBackend):
    """Gather kernel (any image strides, uint8/fp16/bf16/fp32, optional mean/std) + one strided-batched cuBLASLt GEMM
    writing the patch tokens in place in [B, P + Np, D] with bias and position embedding fused."""

    op_name = "patch_embed_fwd"  # ranked after Triton until measured: vitkern/backends/cuda_common.py
    dtypes, dtype_label = CUDA_DTYPES, "compute dtype"  # the weight's; the image may also be uint8
    # How the position embedding reaches the GEMM (csrc/ops/patch_embed.cu pos_impl); auto tries the
    # batch-stride-0 C and falls back to writing the pos rows first and accumulating in place.
    pos_impl = "auto"

    def op_reasons(self, problem: dispatch.Problem) -> list[str]:
        mixed = ["pos/prefix in float32 over a 16-bit weight (mixed precision runs on Triton or the reference)"]
        return input_reasons(problem, IMAGE_DTYPES) + (mixed if problem.attr("mixed") else [])

    def forward(self, x, norm, weight, bias, pos, prefix, pos_covers_prefix, *, pos_impl: str | None = None):
        B, _, H, W = x.shape
        D, _, ph, pw = weight.shape
        num_prefix = prefix.shape[0] if prefix is not None else 0
        out = memory.empty((B, num_prefix + (H // ph) * (W // pw), D), weight.dtype, x.device)
        bias = dense_vector(bias)
        torch.ops.vitkern_C.patch_embed_fwd.out(x, norm, weight, bias, pos, prefix, bool(pos_covers_prefix),
                                                POS_IMPLS[pos_impl or self.pos_impl], out=out)
        return out


dispatch.register_backend(OP, PatchEmbedCuda())
