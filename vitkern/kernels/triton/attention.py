"""Launchers for the flash attention kernels (attention_fwd.py, attention_bwd.py).

Every argument is a strided [B, H, N, D] view (q/o: N_Q rows, k/v: N_K rows); outputs are preallocated by the
caller. fp32 inputs use exact fp32 dots (``input_precision="ieee"``, not tf32) so fp32 matches PyTorch's fp32
matmuls; fp16/bf16 use tensor cores with fp32 accumulation.

Launch configuration. On the GPU each kernel is autotuned per (N_Q, N_K, HEAD_DIM, dtype) (Triton caches the
choice per key); the configs include 32/64-row tiles because at ViT lengths (N=197) a 128-wide tile computes
mostly padding, and they are pruned so a tile never exceeds the next power of two of the sequence length. The
interpreter (CPU tensors) uses one fixed small config: 16×16 tiles for N <= 64 (so N=50 spans four blocks with a
partial tail), 32×32 beyond (so N=197 ends in a 5-row tail without timing the interpreter for minutes).
"""

from __future__ import annotations

import functools

import torch
import triton

from vitkern.kernels.triton.attention_bwd import (
    attention_bwd_delta_kernel, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
)
from vitkern.kernels.triton.attention_fwd import attention_fwd_kernel

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16


def block_d(head_dim: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _interp_block(n: int) -> int:
    return MIN_BLOCK if n <= 64 else 32


# (BLOCK_M, BLOCK_N, num_warps, num_stages): 128-row tiles for long sequences, 64/32 for ViT lengths (N=197 pads
# to 256 with 64- or 128-tiles, 59% useful area either way, but 64-row tiles give 4x more programs), 16 for tiny N.
# Kept short: every config is compiled once per (N_Q, N_K, D, dtype) key when tuning.
_FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (32, 32, 2, 2), (16, 16, 1, 2)]
_BWD_CONFIGS = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 32, 4, 2), (16, 16, 1, 2)]


def _configs(table) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def _prune(configs, named_args, **kwargs):
    nq, nk = named_args["N_Q"], named_args["N_K"]
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    cap_m, cap_n = max(MIN_BLOCK, triton.next_power_of_2(nq)), max(MIN_BLOCK, triton.next_power_of_2(nk))
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n  # no tile wider than the sequence
            and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * bd <= 128 * 128]  # register budget at D=128
    return kept or configs[-2:]


@functools.lru_cache(maxsize=None)
def _tuned(name: str):
    kernel, table = {
        "fwd": (attention_fwd_kernel, _FWD_CONFIGS),
        "dkdv": (attention_bwd_dkdv_kernel, _BWD_CONFIGS),
        "dq": (attention_bwd_dq_kernel, _BWD_CONFIGS),
    }[name]
    return triton.autotune(configs=_configs(table), key=["N_Q", "N_K", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": _prune})(kernel)


def _launch(name: str, kernel, t: torch.Tensor, grid_rows: int, b_h: int, args, **meta) -> None:
    """Interpreter: fixed config; GPU: autotuned. ``grid_rows`` is the length the grid's axis 0 tiles."""
    if _interpreted(t):
        blk = _interp_block(max(meta.pop("N_TILE_HINT"), 1))
        kernel[(triton.cdiv(grid_rows, blk), b_h)](*args, BLOCK_M=blk, BLOCK_N=blk, **meta)
    else:
        meta.pop("N_TILE_HINT")
        axis0 = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
        _tuned(name)[lambda cfg: (triton.cdiv(grid_rows, cfg[axis0]), b_h)](*args, **meta)


def attention_fwd(
    q: torch.Tensor,  # [B, H, N_Q, D] view
    k: torch.Tensor,  # [B, H, N_K, D] view
    v: torch.Tensor,  # [B, H, N_K, D] view
    scale: float,
    o: torch.Tensor,  # [B, H, N_Q, D] view, out
    lse: torch.Tensor,  # [B, H, N_Q] fp32 contiguous, out (natural-log logsumexp of the scaled logits)
) -> None:
    B, H, nq, D = q.shape
    nk = k.shape[2]
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, nq, nk, scale * LOG2E)
    _launch("fwd", attention_fwd_kernel, q, nq, B * H, args, HEAD_DIM=D, BLOCK_D=block_d(D),
            PRECISION=_precision(q.dtype), N_TILE_HINT=max(nq, nk))


def attention_bwd(
    do: torch.Tensor,  # [B, H, N_Q, D] view (any strides, stride 0 included)
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # forward inputs (views)
    o: torch.Tensor,  # [B, H, N_Q, D] forward output
    lse: torch.Tensor,  # [B, H, N_Q] fp32 from the forward
    scale: float,
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,  # views, out (may be slices of one packed buffer)
) -> None:
    from vitkern import memory

    B, H, nq, D = q.shape
    nk = k.shape[2]
    bd = block_d(D)
    delta = memory.empty((B, H, nq), torch.float32, q.device)
    delta_block = MIN_BLOCK if _interpreted(q) else 64
    attention_bwd_delta_kernel[(triton.cdiv(nq, delta_block), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, nq, HEAD_DIM=D, BLOCK_M=delta_block, BLOCK_D=bd)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    meta = dict(HEAD_DIM=D, BLOCK_D=bd, PRECISION=_precision(q.dtype), N_TILE_HINT=max(nq, nk))
    _launch("dkdv", attention_bwd_dkdv_kernel, q, nk, B * H,
            (q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), H, nq, nk, scale), **meta)
    _launch("dq", attention_bwd_dq_kernel, q, nq, B * H,
            (q, k, v, do, lse, delta, dq, *common, *dq.stride(), H, nq, nk, scale), **meta)
