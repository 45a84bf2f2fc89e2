"""The CUDA C++ backend of the shifted-window attention op family (kernel: csrc/ops/window_attention.cu(h), op
``torch.ops.vitkern_C.window_attention_fwd``).

Forward only: one CTA per (image, window, head) keeps the whole window (N = wh·ww <= 256 tokens) on chip, with the
roll / pad / partition / reverse index math, the relative-position-bias gather and the shift mask computed in-kernel
(timm's roll-then-pad order, or torchvision/HF's pad-then-roll with ``pad_first``). It writes the contract's
``out`` and ``lse`` [B·nW, heads, N] fp32, which the Triton backward consumes (it recomputes P from the lse).
Backward problems are rejected with a reason, so after a CUDA forward the dispatcher runs the Triton backward and
``dispatch.select`` on the backward problem says so; force ``cuda`` with ``strict=False`` to train with it.
"""

from __future__ import annotations

import functools

import torch

from vitkern import dispatch, memory
from vitkern.backends.cuda_common import CudaBackend
from vitkern.ops.attention_cuda import CUDA_HEAD_DIMS
from vitkern.ops.window_attention import MAX_TOKENS, OP, input_reasons, num_windows

__all__ = ["WindowAttentionCuda"]

CUDA_MAX_TOKENS = 256  # csrc/ops/window_attention.cuh kWinMaxTokens
assert CUDA_MAX_TOKENS == MAX_TOKENS  # same window limit as the Triton backend


def window_smem_bytes(window: tuple[int, int], head_dim: int, itemsize: int = 2) -> int:
    """Shared memory of one CTA: mirror of window_smem_bytes in csrc/ops/window_attention.cuh (the C++ launch check is
    the backstop). Q, K, V rows (N rounded up to 16) of D + 8 elements, the table column (fp32), 3 ints per token."""
    wh, ww = window
    n16 = -(-wh * ww // 16) * 16
    return 3 * n16 * (head_dim + 8) * itemsize + (2 * wh - 1) * (2 * ww - 1) * 4 + 3 * n16 * 4


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """The kernel reads 16-byte vectors: a contiguous tensor whose data starts misaligned (a storage offset) is
    copied (rare; allocations are aligned)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


class WindowAttentionCuda(CudaBackend):
    """Hand-written CUDA window attention forward: one (image, window, head) per CTA, mma.sync tensor cores, fp32
    exp2 softmax, no roll/partition/mask tensors."""

    op_name = "window_attention_fwd"  # ranked after Triton until measured: vitkern/backends/cuda_common.py

    def op_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = input_reasons(problem, CUDA_MAX_TOKENS)
        d = problem.attr("head_dim")
        if d not in CUDA_HEAD_DIMS:
            reasons.append(f"head_dim {d} not in {CUDA_HEAD_DIMS} (one kernel per head dim)")
        return reasons

    def device_reasons(self, problem: dispatch.Problem, index: int) -> list[str]:
        window, d = tuple(problem.attr("window")), problem.attr("head_dim")
        need, have = window_smem_bytes(window, d), _smem_optin(index)
        if need > have:
            return [f"a {window[0]}x{window[1]} window at head_dim {d} needs {need} bytes of shared memory > {have} "
                    f"on cuda:{index}"]
        return []

    def forward(self, qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first):
        B, H, W, three_c = qkv.shape
        n = window[0] * window[1]
        out = memory.empty((B, H, W, three_c // 3), qkv.dtype, qkv.device)
        lse = memory.empty((B * num_windows(H, W, window), heads, n), torch.float32, qkv.device)
        # the kernel takes the bias in qkv's dtype (padded q/k/v rounded like the linear's output, as the Triton
        # kernel does) and the table in fp32 (exact upcast; [T, heads] is tiny)
        bias = _aligned_copy(qkv_bias.to(qkv.dtype).contiguous()) if qkv_bias is not None else None
        torch.ops.vitkern_C.window_attention_fwd.out(
            _aligned_copy(qkv), bias, table.float().contiguous(), heads, list(window), list(shift), float(scale),
            float(mask_value), bool(pad_first), out=out, lse=lse)
        return out, lse


dispatch.register_backend(OP, WindowAttentionCuda())
