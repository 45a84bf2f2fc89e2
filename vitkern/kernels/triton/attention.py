"""Launchers for the flash attention kernels (attention_fwd.py, attention_bwd.py).

Every argument is a strided [B, H, N, D] view (q/o: N_Q rows, k/v: N_K rows); outputs are preallocated by the
caller. fp32 inputs use exact fp32 dots (``input_precision="ieee"``, not tf32) so fp32 matches PyTorch's fp32
matmuls; fp16/bf16 use tensor cores with fp32 accumulation.

Launch configuration. On the GPU each kernel is autotuned per (N_Q, N_K, HEAD_DIM, dtype) (Triton caches the
choice per key); the configs include 32/64-row tiles because at ViT lengths (N=197) a 128-wide tile computes
mostly padding, and they are pruned so a tile never exceeds the next power of two of the sequence length. The
interpreter (CPU tensors) uses one fixed small config: 16×16 tiles for N <= 64 (so N=50 spans four blocks with a
partial tail), 32×32 beyond (so N=197 ends in a 5-row tail without timing the interpreter for minutes).

Grid: (query or key blocks, B·H). Axis 1 holds at most 65535 programs on CUDA, so a call with more heads in all (ViT-B
at B=8192 has B·H = 98304) is launched in pieces of whole samples (see :func:`_bh_pieces`).
"""

from __future__ import annotations

import functools

import torch
import triton

from vitkern.kernels.triton import tuning
from vitkern.kernels.triton.attention_bwd import (
    attention_bwd_delta_kernel, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
)
from vitkern.kernels.triton.attention_fwd import attention_fwd_kernel

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1)


def block_d(head_dim: int) -> int:
    return max(MIN_BLOCK, tuning.next_power_of_2(head_dim))


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head dim as one power-of-two tile, or as two when that covers less padding
    (80 -> 64 + 16, 72 -> 64 + 16, 88 / 96 -> 64 + 32, 160 -> 128 + 32; 112 stays 128). tl.dot needs >= 16."""
    whole = block_d(head_dim)
    main = max(MIN_BLOCK, tuning.next_power_of_2(head_dim) // 2)
    tail = max(MIN_BLOCK, tuning.next_power_of_2(head_dim - main)) if head_dim > main else 0
    return (main, tail) if tail and main + tail < whole else (whole, 0)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _interp_block(n: int) -> int:
    return MIN_BLOCK if n <= 64 else 32


# (BLOCK_M, BLOCK_N, num_warps, num_stages): 128-row tiles for long sequences, 64/32 for ViT lengths (N=197 pads
# to 256 with 64- or 128-tiles, 59% useful area either way, but 64-row tiles give 4x more programs), 16 for tiny N.
# Kept short: every config is compiled once per (N_Q, N_K, D, dtype) key when tuning.
_FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (32, 32, 2, 2), (16, 16, 1, 2)]
_BWD_CONFIGS = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 32, 4, 2), (16, 16, 1, 2)]


def _configs(table) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def _max_tile(bd: int, elt: int) -> int:
    """Widest BLOCK_M / BLOCK_N at this padded head dim: the register budget of a 128 x 128 tile, and at BLOCK_D 256
    in fp32 at most 32 (compiled for sm_90: its 64 x 64 tiles need 272-336 KB of shared memory, 32 x 32 100-132 KB;
    16-bit 64 x 64 tiles at BLOCK_D 256 need 192-224 KB, inside the 227 KB)."""
    return 32 if bd > 128 and elt > 2 else 128 * 128 // bd


def _prune(configs, named_args, **kwargs):
    nq, nk = named_args["N_Q"], named_args["N_K"]
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D")) + kwargs.get("BLOCK_D2", named_args.get("BLOCK_D2", 0))
    widest = _max_tile(bd, named_args["Q"].element_size())
    cap_m, cap_n = max(MIN_BLOCK, tuning.next_power_of_2(nq)), max(MIN_BLOCK, tuning.next_power_of_2(nk))
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n  # no tile wider than the sequence
            and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= widest]
    return kept or configs[-2:]


@functools.lru_cache(maxsize=None)
def _tuned(name: str):
    kernel, table = {
        "fwd": (attention_fwd_kernel, _FWD_CONFIGS),
        "dkdv": (attention_bwd_dkdv_kernel, _BWD_CONFIGS),
        "dq": (attention_bwd_dq_kernel, _BWD_CONFIGS),
    }[name]
    return tuning.autotune(kernel, _configs(table), ["N_Q", "N_K", "HEAD_DIM"], prune=_prune)


def _launch(name: str, kernel, t: torch.Tensor, grid_rows: int, b_h: int, args, **meta) -> None:
    """Interpreter: fixed config; GPU: autotuned. ``grid_rows`` is the length the grid's axis 0 tiles."""
    if tuning.interpreted(t):
        blk = _interp_block(max(meta.pop("N_TILE_HINT"), 1))
        kernel[(tuning.cdiv(grid_rows, blk), b_h)](*args, BLOCK_M=blk, BLOCK_N=blk, **meta)
    else:
        meta.pop("N_TILE_HINT")
        axis0 = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
        _tuned(name)[lambda cfg: (tuning.cdiv(grid_rows, cfg[axis0]), b_h)](*args, **meta)


def _bh_pieces(*ts: torch.Tensor):
    """The [B, H, ...] tensors ``ts`` as they are, or, when B·H > MAX_GRID_Y, in pieces along B (then H) of at most
    MAX_GRID_Y heads each, so B·H can stay on grid axis 1.

    Why pieces and not a 1-D grid: the kernels, their grid order (the blocks of one head run back to back and share
    its K/V in L2) and their compiled variants stay exactly as tested; it costs one launch per 65535 heads (2 at
    ViT-B B=8192, against milliseconds of work each). A piece is a view: torch moves the base pointer (64-bit), the
    strides are unchanged, and the kernels already form b·stride_b and bh·N_Q in int64 (b·stride_b passes 2^31 at
    these batch sizes). A single sample with more than MAX_GRID_Y heads is cut along H, one sample per piece: the
    kernels' bh·N_Q row of the contiguous lse/delta then stays inside the piece's sample.
    """
    B, H = ts[0].shape[:2]
    if B * H <= MAX_GRID_Y:
        yield ts
        return
    if H > MAX_GRID_Y:
        cuts = [(slice(b, b + 1), slice(h, h + MAX_GRID_Y)) for b in range(B) for h in range(0, H, MAX_GRID_Y)]
    else:
        step = MAX_GRID_Y // H
        cuts = [(slice(b, b + step), slice(None)) for b in range(0, B, step)]
    for bs, hs in cuts:
        yield tuple(t[bs, hs] for t in ts)


def attention_fwd(
    q: torch.Tensor,  # [B, H, N_Q, D] view
    k: torch.Tensor,  # [B, H, N_K, D] view
    v: torch.Tensor,  # [B, H, N_K, D] view
    scale: float,
    o: torch.Tensor,  # [B, H, N_Q, D] view, out
    lse: torch.Tensor,  # [B, H, N_Q] fp32 contiguous, out (natural-log logsumexp of the scaled logits)
) -> None:
    nq, D, nk = q.shape[2], q.shape[3], k.shape[2]
    for q, k, v, o, lse in _bh_pieces(q, k, v, o, lse):
        B, H = q.shape[:2]
        args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, nq, nk, scale * LOG2E)
        bd, bd2 = head_dim_blocks(D)
        _launch("fwd", attention_fwd_kernel, q, nq, B * H, args, HEAD_DIM=D, BLOCK_D=bd, BLOCK_D2=bd2,
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

    nq, D, nk = q.shape[2], q.shape[3], k.shape[2]
    bd, bd2 = head_dim_blocks(D)
    delta = memory.empty(q.shape[:3], torch.float32, q.device)
    delta_block = MIN_BLOCK if tuning.interpreted(q) else 64
    meta = dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_D2=bd2, PRECISION=_precision(q.dtype), N_TILE_HINT=max(nq, nk))
    for do, q, k, v, o, lse, delta, dq, dk, dv in _bh_pieces(do, q, k, v, o, lse, delta, dq, dk, dv):
        B, H = q.shape[:2]
        attention_bwd_delta_kernel[(tuning.cdiv(nq, delta_block), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, nq, HEAD_DIM=D, BLOCK_M=delta_block, BLOCK_D=block_d(D))
        common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        _launch("dkdv", attention_bwd_dkdv_kernel, q, nk, B * H,
                (q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), H, nq, nk, scale), **meta)
        _launch("dq", attention_bwd_dq_kernel, q, nq, B * H,
                (q, k, v, do, lse, delta, dq, *common, *dq.stride(), H, nq, nk, scale), **meta)
