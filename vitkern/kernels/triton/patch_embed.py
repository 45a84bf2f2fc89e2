"""Triton patch embedding: an implicit GEMM over (B·Np, K = C·ph·pw) × (K, D) with no im2col copy.

Forward (one launch):  out[b, P + n, :] = patch(b, n) · Wᵀ + bias + pos[pos_row0 + n]       (patch programs)
                       out[b, t, :]     = prefix[t] (+ pos[t] when the position embedding covers the prefix)
                                                                                      (the extra prefix programs)
  The A tiles are gathered straight from the image through its strides (NCHW or channels_last): row m = b·Np + n
  is patch (gy, gx) = divmod(n, Gw) of image b; column k = c·ph·pw + i·pw + j is pixel (c, gy·ph + i, gx·pw + j).
  That is Conv2d's [D, C, ph, pw] weight order, so W is the Conv2d weight viewed as [D, K] (read by strides; see
  _weight_matrix). The patch size is a compile-time constant, so the gather's div/mod fold away. The image may be
  uint8 or float; with NORM the per-channel (x - mean) / std is applied in fp32 in the A-tile load, then the tile
  is cast to the compute (weight) dtype.
Backward:
  dX (image):  dA = dY · W (· 1/std with NORM), scattered back to the image through the same gather offsets
               (patches do not overlap, so every pixel gets exactly one value: no atomics).
  dW:          dWᵀ-GEMM over the gathered patches, dW = dYᵀ · A, split over M into S fp32 partials [S, D, K]
               summed by torch: deterministic.
  dbias / dpos / dprefix are row sums of dOut; the op layer does them with torch reductions.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import tuning
from vitkern.kernels.triton.tiles import column_halves
from vitkern.validation import dense_vector


@triton.jit
def patch_row_offsets(rows, NP, GW, PH, PW, s_b, s_h, s_w):
    """Image offset (int64) of the top-left pixel of patch row m = b·NP + n, n = gy·GW + gx."""
    n = rows % NP
    return (rows // NP).to(tl.int64) * s_b + ((n // GW) * PH).to(tl.int64) * s_h + ((n % GW) * PW).to(tl.int64) * s_w


@triton.jit
def patch_col_offsets(ks, PH, PW, s_c, s_h, s_w):
    """Image offset (int64) of patch column k = c·PH·PW + i·PW + j (Conv2d's weight order) within a patch."""
    r = ks % (PH * PW)
    return (ks // (PH * PW)).to(tl.int64) * s_c + (r // PW).to(tl.int64) * s_h + (r % PW).to(tl.int64) * s_w


@triton.jit
def load_patches(X, NORM, row_off, rows_ok, ks, K, C, PH, PW, s_c, s_h, s_w, NORMALIZE: tl.constexpr):
    """Gathered A tile [BM, BK] of the image (any dtype, uint8 included) in fp32, optionally normalised per
    channel: (x - NORM[0, c]) · NORM[1, c] (NORM: [2, C] fp32 mean and 1/std)."""
    k_ok = ks < K
    k_off = patch_col_offsets(ks, PH, PW, s_c, s_h, s_w)
    a = tl.load(X + row_off[:, None] + k_off[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
    if NORMALIZE:
        c = ks // (PH * PW)
        mean = tl.load(NORM + c, mask=k_ok, other=0.0)
        istd = tl.load(NORM + C + c, mask=k_ok, other=0.0)
        a = tl.where(rows_ok[:, None] & k_ok[None, :], (a - mean[None, :]) * istd[None, :], 0.0)
    return a


@triton.jit
def patch_embed_fwd_kernel(
    X, NORM, W, BIAS,  # X: image [B, C, H, W] (strides s_*); NORM: [2, C] fp32; W: [D, K] (s_wd, s_wk); BIAS: [D]
    POS, PREFIX, OUT,  # POS: [L, D]; PREFIX: [P, D]; OUT: [B, P + NP, D] contiguous
    M, D, K, C, NP, GW, s_b, s_c, s_h, s_w, s_wd, s_wk,  # M = B·NP patch rows
    pos_row0,  # POS row of patch 0: P when the position embedding covers the prefix, else 0
    PH: tl.constexpr, PW: tl.constexpr,  # the patch size
    NUM_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, POS_PREFIX: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    T = NUM_PREFIX + NP
    num_patch_tiles = tl.cdiv(M, BLOCK_M)  # programs past the patch tiles write the B·P prefix rows
    if pid_m < num_patch_tiles:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        row_off = patch_row_offsets(rows, NP, GW, PH, PW, s_b, s_h, s_w)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            # A tile gathered from the image (normalised, cast to the compute dtype = the weight's); B tile = Wᵀ
            a = load_patches(X, NORM, row_off, row_ok, ks, K, C, PH, PW, s_c, s_h, s_w, NORMALIZE)
            w_mask = (ks < K)[:, None] & col_ok[None, :]
            w = tl.load(W + cols[None, :].to(tl.int64) * s_wd + ks[:, None] * s_wk, mask=w_mask, other=0.0)
            acc = tl.dot(a.to(W.dtype.element_ty), w, acc, input_precision=DOT_PRECISION)
        # epilogue: bias + position embedding, rows written at their final offset b·T + P + n; by column halves of
        # the accumulator (fewer live registers: spilled up to 0.9 KB per thread on sm_90 over the whole tile)
        out_rows = (rows // NP).to(tl.int64) * T + NUM_PREFIX + rows % NP
        acc_lo, acc_hi = column_halves(acc)
        n0 = tl.program_id(1) * BLOCK_N
        _patch_epilogue(acc_lo, rows, row_ok, out_rows, n0, BIAS, POS, OUT, D, NP, pos_row0, HAS_BIAS, HAS_POS)
        _patch_epilogue(acc_hi, rows, row_ok, out_rows, n0 + BLOCK_N // 2, BIAS, POS, OUT, D, NP, pos_row0,
                        HAS_BIAS, HAS_POS)
    elif NUM_PREFIX > 0:
        # prefix programs: row r = b·P + t gets prefix[t] (+ pos[t])
        rows = (pid_m - num_patch_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        t = rows % NUM_PREFIX
        mask = (rows < (M // NP) * NUM_PREFIX)[:, None] & col_ok[None, :]
        val = tl.load(PREFIX + t[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if POS_PREFIX:
            val += tl.load(POS + t[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out_rows = (rows // NUM_PREFIX).to(tl.int64) * T + t
        tl.store(OUT + out_rows[:, None] * D + cols[None, :], val.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _patch_epilogue(acc, rows, row_ok, out_rows, n0, BIAS, POS, OUT, D, NP, pos_row0, HAS_BIAS: tl.constexpr,
                    HAS_POS: tl.constexpr):
    """acc [BLOCK_M, W] fp32: columns [n0, n0 + W) of a patch tile. + bias, + pos[pos_row0 + n]; store."""
    cols = n0 + tl.arange(0, acc.shape[1])
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        acc += tl.load(POS + (pos_row0 + rows % NP)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + out_rows[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def patch_embed_dx_kernel(
    DOUT, W, NORM,  # DOUT: [B, P + NP, D] contiguous; W: [D, K] (strides s_wd, s_wk); NORM: [2, C] fp32
    DX,  # image grad [B, C, H, W] (strides s_*)
    M, D, K, C, NP, GW, s_b, s_c, s_h, s_w, s_wd, s_wk,
    PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_N tiles D (the reduction here)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    dout_rows = (rows // NP).to(tl.int64) * (NUM_PREFIX + NP) + NUM_PREFIX + rows % NP
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_N):
        ds = d0 + tl.arange(0, BLOCK_N)
        d_ok = ds < D
        dy = tl.load(DOUT + dout_rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w_mask = d_ok[:, None] & k_ok[None, :]
        w = tl.load(W + ds[:, None].to(tl.int64) * s_wd + ks[None, :] * s_wk, mask=w_mask, other=0.0)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=DOT_PRECISION)
    if NORMALIZE:  # d/dx of (x - mean) / std
        acc *= tl.load(NORM + C + ks // (PH * PW), mask=k_ok, other=0.0)[None, :]
    # scatter: patches tile the image, so each pixel is written exactly once
    row_off = patch_row_offsets(rows, NP, GW, PH, PW, s_b, s_h, s_w)
    k_off = patch_col_offsets(ks, PH, PW, s_c, s_h, s_w)
    tl.store(DX + row_off[:, None] + k_off[None, :], acc.to(DX.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def patch_embed_dw_kernel(
    DOUT, X, NORM,  # DOUT: [B, P + NP, D] contiguous; X: image [B, C, H, W] (strides s_*); NORM: [2, C] fp32
    DW_PART,  # [S, D, K] fp32 partials
    M, D, K, C, NP, GW, s_b, s_c, s_h, s_w,
    rows_per_split,  # a multiple of BLOCK_M; split s reduces rows [s·rows_per_split, (s + 1)·rows_per_split)
    PH: tl.constexpr, PW: tl.constexpr, NUM_PREFIX: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_N tiles D, BLOCK_M the reduction
):
    ds = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    d_ok = ds < D
    k_ok = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(split * rows_per_split, (split + 1) * rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        dout_rows = (rows // NP).to(tl.int64) * (NUM_PREFIX + NP) + NUM_PREFIX + rows % NP
        dyt = tl.load(DOUT + dout_rows[None, :] * D + ds[:, None], mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        row_off = patch_row_offsets(rows, NP, GW, PH, PW, s_b, s_h, s_w)
        a = load_patches(X, NORM, row_off, row_ok, ks, K, C, PH, PW, s_c, s_h, s_w, NORMALIZE)
        acc = tl.dot(dyt, a.to(dyt.dtype), acc, input_precision=DOT_PRECISION)
    out = DW_PART + split.to(tl.int64) * D * K + ds[:, None].to(tl.int64) * K + ks[None, :]
    tl.store(out, acc, mask=d_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration. GPU launches are autotuned per (D, K, flags); the interpreter gets one fixed small config
# (the same kernel code; only the tile sizes differ).

_INTERP = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)


def _gpu_configs() -> list[triton.Config]:
    out = []
    for bm, bn, bk, warps, stages in (
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    ):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return out


@functools.lru_cache(maxsize=None)
def _tuned(name: str):
    kernel = {"fwd": patch_embed_fwd_kernel, "dx": patch_embed_dx_kernel, "dw": patch_embed_dw_kernel}[name]
    key = ["D", "K", "NP", "PW", "NUM_PREFIX", "NORMALIZE"]
    return tuning.autotune(kernel, _gpu_configs(), key)


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (no silent TF32); 16-bit operands ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


def _geometry(x: torch.Tensor, weight: torch.Tensor) -> tuple[tuple[int, ...], dict[str, int]]:
    """((M, D, K, C, NP, GW, s_b, s_c, s_h, s_w), {PH, PW}): the shape arguments every kernel takes."""
    B, C, H, Wd = x.shape
    D, _, ph, pw = weight.shape
    gw = Wd // pw
    np_ = (H // ph) * gw
    return (B * np_, D, C * ph * pw, C, np_, gw, *x.stride()), dict(PH=ph, PW=pw)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The Conv2d weight as the GEMM's [D, K] matrix. When K·e is not a multiple of 16 bytes (p = 14: K = 588) the
    rows of W are misaligned for 16-byte (cp.async) loads, so a [K, D]-major copy is made (D·K elements, ~1 µs):
    the tile loads then run along D, which is aligned, and the compiler can pipeline them."""
    D = weight.shape[0]
    w = weight.reshape(D, -1)
    if (w.shape[1] * w.element_size()) % 16 == 0:
        return w
    return w.t().contiguous().t()  # same [D, K] values, strides (1, D)


def patch_embed_fwd(
    x: torch.Tensor,  # [B, C, H, W], any strides, float or uint8
    norm: torch.Tensor | None,  # [2, C] fp32: per-channel mean and 1/std applied to the pixels, or None
    weight: torch.Tensor,  # [D, C, ph, pw] contiguous (the compute dtype)
    bias: torch.Tensor | None,  # [D]
    pos: torch.Tensor | None,  # [L, D] contiguous, L = NP or P + NP
    prefix: torch.Tensor | None,  # [P, D] contiguous
    pos_covers_prefix: bool,
    out: torch.Tensor,  # [B, P + NP, D] contiguous, out
) -> None:
    geo, patch = _geometry(x, weight)
    M, D, num_prefix = geo[0], geo[1], (prefix.shape[0] if prefix is not None else 0)
    B = x.shape[0]
    flags = dict(
        **patch, NUM_PREFIX=num_prefix, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        POS_PREFIX=pos is not None and pos_covers_prefix, NORMALIZE=norm is not None,
        DOT_PRECISION=_precision(weight.dtype),
    )
    pos_row0 = num_prefix if flags["POS_PREFIX"] else 0

    def grid(meta):  # patch tiles, then the prefix-row tiles
        rows = tuning.cdiv(M, meta["BLOCK_M"]) + tuning.cdiv(B * num_prefix, meta["BLOCK_M"])
        return rows, tuning.cdiv(D, meta["BLOCK_N"])

    w, bias = _weight_matrix(weight), dense_vector(bias)
    args = (
        x, norm if norm is not None else weight, w, bias if bias is not None else weight,
        pos if pos is not None else weight, prefix if prefix is not None else weight, out, *geo, *w.stride(), pos_row0,
    )
    if tuning.interpreted(x):
        patch_embed_fwd_kernel[grid(_INTERP)](*args, **flags, **_INTERP)
    else:
        _tuned("fwd")[grid](*args, **flags)


def patch_embed_dx(
    dout: torch.Tensor,  # [B, P + NP, D] contiguous
    weight: torch.Tensor,  # [D, C, ph, pw] contiguous
    norm: torch.Tensor | None,  # [2, C] fp32 or None (as in the forward)
    dx: torch.Tensor,  # [B, C, H, W] out (any strides)
    num_prefix: int,
) -> None:
    geo, patch = _geometry(dx, weight)
    w = _weight_matrix(weight)
    args = (dout, w, norm if norm is not None else weight, dx, *geo, *w.stride())
    flags = dict(**patch, NUM_PREFIX=num_prefix, NORMALIZE=norm is not None, DOT_PRECISION=_precision(dout.dtype))

    def grid(meta):
        return tuning.cdiv(geo[0], meta["BLOCK_M"]), tuning.cdiv(geo[2], meta["BLOCK_K"])

    if tuning.interpreted(dout):
        patch_embed_dx_kernel[grid(_INTERP)](*args, **flags, **_INTERP)
    else:
        _tuned("dx")[grid](*args, **flags)


def patch_embed_dw(
    dout: torch.Tensor,  # [B, P + NP, D] contiguous
    x: torch.Tensor,  # [B, C, H, W] any strides
    norm: torch.Tensor | None,  # [2, C] fp32 or None (as in the forward)
    weight: torch.Tensor,  # [D, C, ph, pw] (shape only)
    num_prefix: int,
) -> torch.Tensor:
    """Returns dW as fp32 [D, K] (the sum of the per-split partials, in a fixed order)."""
    from vitkern import memory

    geo, patch = _geometry(x, weight)
    M, D, K = geo[0], geo[1], geo[2]
    if tuning.interpreted(dout):
        blocks, extra = _INTERP, {}
        splits = max(1, min(3, tuning.cdiv(M, blocks["BLOCK_M"])))  # several splits: exercises the partial sum
    else:  # split M until the (D, K) tiles x splits fill the SMs twice (a fixed count per shape: deterministic)
        blocks = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)
        extra = dict(num_warps=8, num_stages=3 if dout.dtype != torch.float32 else 2)
        tiles = tuning.cdiv(D, blocks["BLOCK_N"]) * tuning.cdiv(K, blocks["BLOCK_K"])
        splits = max(1, min(tuning.cdiv(2 * tuning.num_sms(dout.device.index), tiles), tuning.cdiv(M, 1024)))
    rows_per_split = tuning.cdiv(tuning.cdiv(M, splits), blocks["BLOCK_M"]) * blocks["BLOCK_M"]
    part = memory.empty((splits, D, K), torch.float32, dout.device)
    grid = (tuning.cdiv(D, blocks["BLOCK_N"]), tuning.cdiv(K, blocks["BLOCK_K"]), splits)
    patch_embed_dw_kernel[grid](
        dout, x, norm if norm is not None else part, part, *geo, rows_per_split, **patch, NUM_PREFIX=num_prefix,
        NORMALIZE=norm is not None, DOT_PRECISION=_precision(dout.dtype), **blocks, **extra,
    )
    return part.sum(0)
