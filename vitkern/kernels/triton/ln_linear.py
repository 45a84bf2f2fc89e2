"""Triton GEMMs with a LayerNorm prologue and bias / GELU / residual + layer-scale epilogues.

One kernel family serves LayerNorm+Linear (qkv) and both GEMMs of LayerNorm+MLP, forward and backward:

    C[M, N] = epilogue(prologue(A)[M, K] @ B[K, N])        (general strides: B = Wᵀ, or W itself in backward)

    prologue (LN_A):  a ← (a − mean[m]) · rstd[m] · γ[k] + β[k], in fp32, rounded to B's dtype
                      (exactly the tensor an unfused LayerNorm would have written), then tl.dot.
             (SCALE_A): a ← a · s[k] in fp32, rounded to B's dtype (fp16's dy·γ of a layer-scaled output: the
                      tensor the unfused graph multiplies out, without its pass over memory).
                      Otherwise a is rounded to B's dtype on load (no-op when they agree: A may be wider, e.g. fp32
                      under bf16 B).
    C, RES, PRE and the vectors may each have their own dtype (all epilogue math is fp32; C is rounded once).
    epilogue:         + bias[n]; store the pre-activation (STORE_PRE); GELU (ACT: 1 erf, 2 tanh);
                      or × GELU'(PRE) (ACT_BWD: backward through the activation); C = RES + LS[n] · acc (HAS_RES).

Why a prologue and not the folded form (γ into W, β into b, acc = rstd·(x·W′ − μ·colsum W′)): the folded epilogue
subtracts two large numbers when |mean| ≫ std (fp32 acc of x·W′ carries |mean|·‖W′‖ and loses the digits of the
centred part), so it needs a guard or a fallback; the prologue normalises each tile before the dot, so it is exactly
as accurate as LayerNorm followed by a GEMM, at the cost of routing A through registers (no direct smem → wgmma).
Per-row statistics come from ``ln_rows_kernel``, a light pre-pass (reads x once, writes 8 bytes per row).

Tile order is grouped (GROUP_M rows of tiles share B columns in L2). GPU launches are autotuned over a few
Hopper-friendly configs; the interpreter uses one small fixed config (32×64×32: rows like 5 or 394 and odd
hidden sizes leave partial tiles in M, N and K; smaller tiles made the CPU tests several times slower).
fp32 operands use ``input_precision="ieee"`` unless torch allows tf32 matmuls (torch.backends.cuda.matmul).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import tuning
from vitkern.kernels.triton.tiles import column_halves
from vitkern.validation import dense_vector

ACT_NONE, ACT_GELU_ERF, ACT_GELU_TANH = 0, 1, 2
GELU_CODES = {"none": ACT_GELU_ERF, "tanh": ACT_GELU_TANH}  # keyed by F.gelu's ``approximate``


@triton.jit
def ln_rows_kernel(
    X, MEAN, RSTD, W, B, Y,  # X, Y: [M, N] (row strides, unit column stride); MEAN, RSTD: [M] fp32; W, B: [N]
    M, N, stride_xm, stride_ym, eps,
    STATS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """STATS: write per-row mean/rstd (the forward pre-pass). Else: Y = (X − mean)·rstd·W + B from the saved
    statistics (the backward's recomputed LN(x), bit-identical to what the forward GEMM's prologue produced)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STATS:
        # two-pass (centred) variance: no E[x²] − E[x]² cancellation at large |mean|; the mean gets one correction
        # step from the centred sum (at |mean| ≫ std the first sum's rounding, ~ulp(|mean|·N)/N, would otherwise
        # shift every x̂ = (x − mean)·rstd)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        mean += tl.sum(xc, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)
    else:
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows64 * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu(x, ACT: tl.constexpr):
    if ACT == 1:  # exact: x · Φ(x)
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:  # tanh approximation: 0.5·x·(1 + tanh(u)) = x · sigmoid(2u), u = √(2/π)·(x + 0.044715·x³)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * u)


@triton.jit
def _gelu_grad(x, ACT: tl.constexpr):
    if ACT == 1:  # Φ(x) + x·φ(x)
        return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:  # s + x · 2s(1 − s) · u′, s = sigmoid(2u); 1 − s as sigmoid(−2u) (no cancellation near s = 1)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        return s + x * 2.0 * s * tl.sigmoid(-2.0 * u) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)


@triton.jit(do_not_specialize=["M_TUNE", "K_TUNE"])
def fused_linear_kernel(
    A, B, C,  # A: [M, K] (strides stride_am, stride_ak); B: [K, N] (stride_bk, stride_bn); C: [M, N] (stride_cm, 1)
    MEAN, RSTD, LN_W, LN_B,  # LayerNorm of A's rows (LN_A): MEAN, RSTD [M] fp32; LN_W, LN_B [K]
    A_SCALE,  # [K]: A's column scales (SCALE_A)
    BIAS,  # [N]
    PRE,  # [M, N] (stride_pm, 1): pre-activation written (STORE_PRE) or read (ACT_BWD)
    RES, LS,  # RES: [M, N] (stride_rm, 1) residual; LS: [N] layer scale. C = RES + LS · acc
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_pm, stride_rm,
    M_TUNE, K_TUNE,  # unused by the kernel: the autotune key's size classes of M and K (see _tuned_linear)
    LN_A: tl.constexpr, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, SCALE_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, STORE_PRE: tl.constexpr, ACT_BWD: tl.constexpr, HAS_RES: tl.constexpr, HAS_LS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped tile order: consecutive programs walk GROUP_M row-tiles down one column of tiles (L2 reuse of B)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    rm64 = rm.to(tl.int64)  # M·K can exceed 2^31 at large batch
    if LN_A:
        mean = tl.load(MEAN + rm, mask=m_ok, other=0.0)
        rstd = tl.load(RSTD + rm, mask=m_ok, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < K
        a = tl.load(A + rm64[:, None] * stride_am + ks[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if LN_A:  # normalise the A tile: the LayerNorm output never touches memory
            an = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if HAS_LN_W:
                an = an * tl.load(LN_W + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_LN_B:
                an = an + tl.load(LN_B + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            a = tl.where(k_ok[None, :], an, 0.0).to(B.dtype.element_ty)
        elif SCALE_A:  # masked-out columns are 0 already (other=0.0 on both loads)
            a = (a.to(tl.float32) * tl.load(A_SCALE + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(
                B.dtype.element_ty)
        else:  # B's dtype is the GEMM's: a wider A (an fp32 residual-stream gradient) is rounded to it
            a = a.to(B.dtype.element_ty)
        b = tl.load(B + ks[:, None] * stride_bk + rn[None, :] * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # epilogue by column slices of the fp32 accumulator: each slice's loads, math and store finish before the next
    # starts, so fewer registers are live than for the whole tile (whole-tile epilogues spilled at 128×128 per
    # warpgroup: ~0.3 KB with GELU, ~1.3 KB with GELU'; sm_90 ptxas, tests/test_sm90_compile.py). Halves suffice
    # except for GELU' (ACT_BWD), which also holds the loaded pre-activation and its exp/erf: quarters.
    rn0 = pid_n * BLOCK_N
    acc_lo, acc_hi = column_halves(acc)
    _epilogue_slice(acc_lo, rm64, m_ok, rn0, C, BIAS, PRE, RES, LS, N, stride_cm, stride_pm, stride_rm,
                    HAS_BIAS, ACT, STORE_PRE, ACT_BWD, HAS_RES, HAS_LS, SPLIT_AGAIN=ACT_BWD)
    _epilogue_slice(acc_hi, rm64, m_ok, rn0 + BLOCK_N // 2, C, BIAS, PRE, RES, LS, N, stride_cm, stride_pm,
                    stride_rm, HAS_BIAS, ACT, STORE_PRE, ACT_BWD, HAS_RES, HAS_LS, SPLIT_AGAIN=ACT_BWD)


@triton.jit
def _epilogue_slice(acc, rm64, m_ok, n0, C, BIAS, PRE, RES, LS, N, stride_cm, stride_pm, stride_rm,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, ACT_BWD: tl.constexpr,
                    HAS_RES: tl.constexpr, HAS_LS: tl.constexpr, SPLIT_AGAIN: tl.constexpr):
    """The epilogue of acc = columns [n0, n0 + W) of the tile, or of its two halves one after the other."""
    if SPLIT_AGAIN:
        W: tl.constexpr = acc.shape[1]
        lo, hi = column_halves(acc)
        _epilogue(lo, rm64, m_ok, n0, C, BIAS, PRE, RES, LS, N, stride_cm, stride_pm, stride_rm,
                  HAS_BIAS, ACT, STORE_PRE, ACT_BWD, HAS_RES, HAS_LS)
        _epilogue(hi, rm64, m_ok, n0 + W // 2, C, BIAS, PRE, RES, LS, N, stride_cm, stride_pm, stride_rm,
                  HAS_BIAS, ACT, STORE_PRE, ACT_BWD, HAS_RES, HAS_LS)
    else:
        _epilogue(acc, rm64, m_ok, n0, C, BIAS, PRE, RES, LS, N, stride_cm, stride_pm, stride_rm,
                  HAS_BIAS, ACT, STORE_PRE, ACT_BWD, HAS_RES, HAS_LS)


@triton.jit
def _epilogue(acc, rm64, m_ok, n0, C, BIAS, PRE, RES, LS, N, stride_cm, stride_pm, stride_rm,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, ACT_BWD: tl.constexpr,
              HAS_RES: tl.constexpr, HAS_LS: tl.constexpr):
    """acc [BLOCK_M, W] fp32: columns [n0, n0 + W) of the tile. + bias; store pre / GELU / × GELU'(pre); residual."""
    rn = n0 + tl.arange(0, acc.shape[1])
    n_ok = rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(PRE + rm64[:, None] * stride_pm + rn[None, :], acc.to(PRE.dtype.element_ty), mask=mask)
    if ACT_BWD:  # acc is dL/dh: dL/dpre = dL/dh · GELU'(pre)
        pre = tl.load(PRE + rm64[:, None] * stride_pm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_grad(pre, ACT)
    elif ACT != 0:
        acc = _gelu(acc, ACT)
    if HAS_RES:
        if HAS_LS:
            acc = acc * tl.load(LS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(RES + rm64[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(C + rm64[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration. GPU: autotuned per (size class of M, N, size class of K, flags, dtypes) over
# Hopper/Ampere-friendly tiles (tl.dot → wgmma on sm90). Interpreter: one fixed small config (autotuning there would
# time the interpreter).

INTERP_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2)
_FLAGS = ["LN_A", "HAS_LN_W", "HAS_LN_B", "SCALE_A", "HAS_BIAS", "ACT", "STORE_PRE", "ACT_BWD", "HAS_RES", "HAS_LS",
          "DOT_PRECISION"]


def _gpu_configs() -> list[triton.Config]:
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); the first fits fp32 too (what VITKERN_AUTOTUNE=0 runs)
        (128, 128, 32, 4, 4), (128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (256, 128, 64, 3, 8),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in tiles
    ]


@functools.lru_cache(maxsize=None)
def _tuned_linear():
    # M (tokens: batch × sequence) and K (tokens too, in the weight-gradient GEMM) change with the batch size: keyed
    # on their power-of-two class, a new batch size reuses its class's tuning instead of timing every config again
    # (a serving process sees many batch sizes). N is a layer's width: exact.
    return tuning.autotune(fused_linear_kernel, _gpu_configs(), ["M_TUNE", "N", "K_TUNE"] + _FLAGS)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"  # match torch's fp32 matmul setting


def _ln_rows(x, mean, rstd, eps, w=None, b=None, y=None) -> None:
    M, N = x.shape
    w, b = dense_vector(w), dense_vector(b)
    block_n = tuning.next_power_of_2(N)
    block_m = max(1, min(4 if tuning.interpreted(x) else 16, 8192 // block_n))
    ln_rows_kernel[(tuning.cdiv(M, block_m),)](
        x, mean, rstd, w if w is not None else x, b if b is not None else x, y if y is not None else x,
        M, N, x.stride(0), y.stride(0) if y is not None else 0, eps,
        STATS=y is None, HAS_W=w is not None, HAS_B=b is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )


def ln_stats(x: torch.Tensor, eps: float, mean: torch.Tensor, rstd: torch.Tensor) -> None:
    """mean/rstd [M] fp32 (out) of the rows of x [M, N] (stride(1) == 1)."""
    _ln_rows(x, mean, rstd, eps)


def ln_apply(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, w, b, y: torch.Tensor) -> None:
    """y [M, N] (out, stride(1) == 1) = (x − mean)·rstd·w + b with the saved statistics."""
    _ln_rows(x, mean, rstd, 0.0, w, b, y)


def fused_linear(
    a: torch.Tensor,  # [M, K], any strides
    b: torch.Tensor,  # [K, N], any strides (pass w.t() for a Linear weight w [N, K])
    out: torch.Tensor,  # [M, N], stride(1) == 1
    *,
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,  # mean, rstd, γ, β
    a_scale: torch.Tensor | None = None,  # [K]: A's columns scaled in the prologue (not with ln)
    bias: torch.Tensor | None = None,  # [N]
    act: int = ACT_NONE,
    pre: torch.Tensor | None = None,  # [M, N], stride(1) == 1: written (act forward) or read (act_bwd)
    act_bwd: bool = False,
    residual: torch.Tensor | None = None,  # [M, N], stride(1) == 1
    layer_scale: torch.Tensor | None = None,  # [N] (with residual)
) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[1]
    mean, rstd, ln_w, ln_b = ln if ln is not None else (None, None, None, None)
    ln_w, ln_b, a_scale, bias, layer_scale = (dense_vector(t) for t in (ln_w, ln_b, a_scale, bias, layer_scale))
    if ln is not None and a_scale is not None:
        raise ValueError("fused_linear: ln and a_scale are exclusive prologues (fold the scale into ln's γ)")
    dummy = out
    args = (
        a, b, out,
        mean if mean is not None else dummy, rstd if rstd is not None else dummy,
        ln_w if ln_w is not None else dummy, ln_b if ln_b is not None else dummy,
        a_scale if a_scale is not None else dummy, bias if bias is not None else dummy,
        pre if pre is not None else dummy,
        residual if residual is not None else dummy, layer_scale if layer_scale is not None else dummy,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        pre.stride(0) if pre is not None else 0, residual.stride(0) if residual is not None else 0,
        tuning.size_class(M), tuning.size_class(K),
    )
    flags = dict(
        LN_A=ln is not None, HAS_LN_W=ln_w is not None, HAS_LN_B=ln_b is not None, SCALE_A=a_scale is not None,
        HAS_BIAS=bias is not None, ACT=act, STORE_PRE=pre is not None and not act_bwd, ACT_BWD=act_bwd,
        HAS_RES=residual is not None, HAS_LS=layer_scale is not None, DOT_PRECISION=_dot_precision(b.dtype),
    )
    if tuning.interpreted(a):
        cfg = INTERP_CONFIG
        grid = (tuning.cdiv(M, cfg["BLOCK_M"]) * tuning.cdiv(N, cfg["BLOCK_N"]),)
        fused_linear_kernel[grid](*args, **flags, **cfg)
    else:
        _tuned_linear()[lambda meta: (tuning.cdiv(M, meta["BLOCK_M"]) * tuning.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return out
