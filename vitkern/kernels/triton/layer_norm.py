"""Triton LayerNorm over the last dimension, with an optional fused residual add.

Forward:  s = x + residual (rounded to x's dtype, exactly what the unfused ``x + r`` gives),
          y = (s - mean) * rstd * weight + bias, with mean/rstd in fp32 (saved for backward).
Backward: dx = rstd * (w*dy - mean(w*dy) - x̂ * mean(w*dy*x̂)) (+ d(sum) when the sum was an output),
          dweight/dbias reduced per program into fp32 partials [G, N] and summed by torch: deterministic,
          no atomics.

ViT widths (192-1280) are short rows: one row per program leaves the memory system idle, so each program
normalises BLOCK_M rows at once (a [BLOCK_M, BLOCK_N] tile).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import tuning
from vitkern.validation import dense_vector


@triton.jit
def layer_norm_fwd_kernel(
    X, RES, W, B,  # X, RES: [M, N] (row strides given, unit column stride); W, B: [N]
    Y, SUM, MEAN, RSTD,  # Y, SUM: [M, N]; MEAN, RSTD: [M] fp32
    M, N, stride_xm, stride_rm, stride_ym, stride_sm, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # M*N can exceed 2^31 at large batch

    x = tl.load(X + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        # round the sum to the storage dtype first so y matches LN(x + r) computed unfused
        r = tl.load(RES + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(SUM + rows64 * stride_sm + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)

    # two-pass statistics in registers: the centred variance avoids E[x²]-E[x]² cancellation
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def layer_norm_bwd_kernel(
    DY, DSUM, XS, W, MEAN, RSTD,  # DY, DSUM, XS: [M, N]; W: [N]; MEAN, RSTD: [M] fp32
    DX, DW_PART, DB_PART,  # DX: [M, N]; DW_PART, DB_PART: [G, N] fp32, G = number of programs
    M, N, stride_dym, stride_dsm, stride_xm, stride_dxm, rows_per_program_min,  # = cdiv(M, G)
    HAS_DSUM: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    # each program owns one contiguous chunk of rows (a multiple of BLOCK_M) and one row of partials
    rows_per_program = tl.cdiv(rows_per_program_min, BLOCK_M) * BLOCK_M
    row_start = pid * rows_per_program
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for m0 in range(row_start, row_start + rows_per_program, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(XS + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DSUM:
            dx += tl.load(DSUM + rows64 * stride_dsm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(dy, axis=0)

    if NEED_DW:
        tl.store(DW_PART + pid * N + cols, dw_acc, mask=col_ok)
    if NEED_DB:
        tl.store(DB_PART + pid * N + cols, db_acc, mask=col_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration. On the GPU the forward and backward are autotuned per (N, dtype, flags); the interpreter
# gets one fixed config (autotuning there would time the interpreter).

MAX_TILE = 16384  # elements per program: beyond this the tile spills registers at 8 warps


def _block_n(n: int) -> int:
    return tuning.next_power_of_2(n)


def _gpu_configs() -> list[triton.Config]:
    out = []
    for block_m in (1, 2, 4, 8, 16):
        for warps in (2, 4, 8):
            out.append(triton.Config({"BLOCK_M": block_m}, num_warps=warps))
    return out


# Tile elements per thread beyond which ptxas spilled on sm_90 (tests/test_sm90_compile.py tooling, bf16, N 384-1280):
# the forward at 256 (0.4-1 KB), the backward (dy, x̂ and dx live together) at 128 (0.5-0.8 KB; 7-9 KB at 256).
MAX_PER_THREAD = {"fwd": 128, "bwd": 64}


def _prune_for(kernel_name: str):
    def prune(configs, named_args, **kwargs):
        bn = named_args.get("BLOCK_N", kwargs.get("BLOCK_N"))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * bn <= MAX_TILE
                and c.kwargs["BLOCK_M"] * bn <= MAX_PER_THREAD[kernel_name] * 32 * c.num_warps]
        return kept or configs[:1]

    return prune


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    kernel = {"fwd": layer_norm_fwd_kernel, "bwd": layer_norm_bwd_kernel}[kernel_name]
    key = ["N", "HAS_RES", "HAS_W", "HAS_B"] if kernel_name == "fwd" else ["N", "HAS_DSUM", "HAS_W", "NEED_DW", "NEED_DB"]
    # cache_results: the choice per (N, dtype, flags) persists in Triton's cache across processes
    return tuning.autotune(kernel, _gpu_configs(), key, prune=_prune_for(kernel_name), do_bench=_quick_bench,
                           cache_results=True)


def _quick_bench(kernel_call, quantiles):
    # a memory-bound kernel of microseconds: 5 ms warm-up / 25 ms of reps separates configs well, and keeps the
    # first call per shape (up to 15 configs) well under a second
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _interp_block_m(block_n: int) -> int:
    # small tiles but still several rows per program, so the row masking and the multi-row reductions are exercised
    return max(1, min(4, 4096 // block_n))


def layer_norm_fwd(
    x: torch.Tensor,  # [M, N], stride(1) == 1
    weight: torch.Tensor | None,  # [N]
    bias: torch.Tensor | None,  # [N]
    residual: torch.Tensor | None,  # [M, N], stride(1) == 1
    eps: float,
    y: torch.Tensor,  # [M, N] out
    sum_out: torch.Tensor | None,  # [M, N] out (when residual)
    mean: torch.Tensor,  # [M] fp32 out
    rstd: torch.Tensor,  # [M] fp32 out
) -> None:
    M, N = x.shape
    block_n = _block_n(N)
    weight, bias = dense_vector(weight), dense_vector(bias)
    args = (
        x, residual if residual is not None else x, weight if weight is not None else x, bias if bias is not None else x,
        y, sum_out if sum_out is not None else y, mean, rstd,
        M, N, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        sum_out.stride(0) if sum_out is not None else 0, eps,
    )
    flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=block_n)
    if tuning.interpreted(x):
        block_m = _interp_block_m(block_n)
        layer_norm_fwd_kernel[(tuning.cdiv(M, block_m),)](*args, **flags, BLOCK_M=block_m)
    else:
        _tuned("fwd")[lambda meta: (tuning.cdiv(M, meta["BLOCK_M"]),)](*args, **flags)


def layer_norm_bwd(
    dy: torch.Tensor,  # [M, N], stride(1) == 1
    dsum: torch.Tensor | None,  # [M, N] gradient flowing into the residual sum output, if any
    xs: torch.Tensor,  # [M, N] the normalised input (x, or x + residual)
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dx: torch.Tensor,  # [M, N] out
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Writes dx; returns (dweight, dbias) as fp32 [N] (None where not needed)."""
    from vitkern import memory

    M, N = xs.shape
    block_n = _block_n(N)
    weight = dense_vector(weight)
    if tuning.interpreted(xs):
        block_m = _interp_block_m(block_n)
        programs = max(1, min(3, tuning.cdiv(M, block_m)))  # several programs: exercises the partial reduction
    else:
        programs = max(1, min(2 * tuning.num_sms(xs.device.index), tuning.cdiv(M, 1)))
    dw_part = memory.empty((programs, N), torch.float32, xs.device) if need_dw else mean
    db_part = memory.empty((programs, N), torch.float32, xs.device) if need_db else mean
    args = (
        dy, dsum if dsum is not None else dy, xs, weight if weight is not None else xs, mean, rstd,
        dx, dw_part, db_part,
        M, N, dy.stride(0), dsum.stride(0) if dsum is not None else 0, xs.stride(0), dx.stride(0),
        tuning.cdiv(M, programs),
    )
    flags = dict(HAS_DSUM=dsum is not None, HAS_W=weight is not None, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=block_n)
    if tuning.interpreted(xs):
        layer_norm_bwd_kernel[(programs,)](*args, **flags, BLOCK_M=block_m)
    else:
        _tuned("bwd")[(programs,)](*args, **flags)
    return (dw_part.sum(0) if need_dw else None), (db_part.sum(0) if need_db else None)
