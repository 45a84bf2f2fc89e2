"""Flash attention backward, FA2 style, deterministic (no atomics).

1. ``attention_bwd_delta_kernel``: delta = rowsum(dO · O) in fp32 ([B, H, N_Q]).
2. ``attention_bwd_dkdv_kernel``: one program per key block; loops over query blocks, recomputing
   P^T = exp(K Q^T · scale - lse) from the saved logsumexp: dV += P^T dO, dS^T = P^T ∘ (V dO^T - delta),
   dK += dS^T Q.
3. ``attention_bwd_dq_kernel``: one program per query block; loops over key blocks: dQ += dS K.

All tensors are strided [B, H, N, D] views (see attention_fwd.py), so dq/dk/dv land straight in a packed
[B, N, 3·H·D] gradient when the input was packed. Query rows >= N_Q get P = 0; key rows >= N_K are never stored.
Head dims that are not a power of two run as two column chunks (BLOCK_D + BLOCK_D2, see attention_fwd.py): the
score-shaped products sum the chunks' dots, the gradients are per chunk.
"""

import triton
import triton.language as tl

from vitkern.kernels.triton.attention_fwd import load_cols, store_cols

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)


@triton.jit
def attention_bwd_delta_kernel(
    O, DO, DELTA,  # O, DO: [B, H, N_Q, D] (any strides); DELTA: [B, H, N_Q] fp32 contiguous
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_Q
    o = load_cols(O + b * stride_ob + h * stride_oh, rows, row_ok, stride_on, stride_od, 0, BLOCK_D, HEAD_DIM)
    do = load_cols(DO + b * stride_gb + h * stride_gh, rows, row_ok, stride_gn, stride_gd, 0, BLOCK_D, HEAD_DIM)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # Q, DO: [B, H, N_Q, D]; K, V, DK, DV: [B, H, N_K, D]; LSE, DELTA: [B, H, N_Q]
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,  # DO
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_gb + h * stride_gh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += bh.to(tl.int64) * N_Q
    DELTA += bh.to(tl.int64) * N_Q

    keys = start_n + tl.arange(0, BLOCK_N)
    key_ok = keys < N_K
    k = load_cols(K, keys, key_ok, stride_kn, stride_kd, 0, BLOCK_D, HEAD_DIM)  # [BLOCK_N, BLOCK_D]
    v = load_cols(V, keys, key_ok, stride_vn, stride_vd, 0, BLOCK_D, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's second chunk
        k2 = load_cols(K, keys, key_ok, stride_kn, stride_kd, BLOCK_D, BLOCK_D2, HEAD_DIM)
        v2 = load_cols(V, keys, key_ok, stride_vn, stride_vd, BLOCK_D, BLOCK_D2, HEAD_DIM)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < N_Q
        q = load_cols(Q, rows, row_ok, stride_qn, stride_qd, 0, BLOCK_D, HEAD_DIM)
        do = load_cols(DO, rows, row_ok, stride_gn, stride_gd, 0, BLOCK_D, HEAD_DIM)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        # transposed scores and dP: [BLOCK_N, BLOCK_M], summed over the head-dim chunks
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            q2 = load_cols(Q, rows, row_ok, stride_qn, stride_qd, BLOCK_D, BLOCK_D2, HEAD_DIM)
            do2 = load_cols(DO, rows, row_ok, stride_gn, stride_gd, BLOCK_D, BLOCK_D2, HEAD_DIM)
            st = tl.dot(k2, tl.trans(q2), st, input_precision=PRECISION)
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=PRECISION)
        # P^T, zero for padded query rows
        pt = tl.where(row_ok[None, :], tl.math.exp2(st * qk_scale - lse2[None, :]), 0.0)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)  # from the fp32 P^T
        pt = pt.to(do.dtype)
        dv += tl.dot(pt, do, input_precision=PRECISION)
        dk += tl.dot(dst, q, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dv2 += tl.dot(pt, do2, input_precision=PRECISION)
            dk2 += tl.dot(dst, q2, input_precision=PRECISION)

    store_cols(DK, dk * sm_scale, keys, key_ok, stride_dkn, stride_dkd, 0, HEAD_DIM)
    store_cols(DV, dv, keys, key_ok, stride_dvn, stride_dvd, 0, HEAD_DIM)
    if BLOCK_D2 > 0:
        store_cols(DK, dk2 * sm_scale, keys, key_ok, stride_dkn, stride_dkd, BLOCK_D, HEAD_DIM)
        store_cols(DV, dv2, keys, key_ok, stride_dvn, stride_dvd, BLOCK_D, HEAD_DIM)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,  # Q, DO, DQ: [B, H, N_Q, D]; K, V: [B, H, N_K, D]; LSE, DELTA: [B, H, N_Q]
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,  # DO
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N_Q, N_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_gb + h * stride_gh
    DQ += b * stride_dqb + h * stride_dqh

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < N_Q
    q = load_cols(Q, rows, row_ok, stride_qn, stride_qd, 0, BLOCK_D, HEAD_DIM)
    do = load_cols(DO, rows, row_ok, stride_gn, stride_gd, 0, BLOCK_D, HEAD_DIM)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's second chunk
        q2 = load_cols(Q, rows, row_ok, stride_qn, stride_qd, BLOCK_D, BLOCK_D2, HEAD_DIM)
        do2 = load_cols(DO, rows, row_ok, stride_gn, stride_gd, BLOCK_D, BLOCK_D2, HEAD_DIM)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    lse2 = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0)
    qk_scale = sm_scale * LOG2E
    for start_n in range(0, N_K, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < N_K
        k = load_cols(K, keys, key_ok, stride_kn, stride_kd, 0, BLOCK_D, HEAD_DIM)
        v = load_cols(V, keys, key_ok, stride_vn, stride_vd, 0, BLOCK_D, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            k2 = load_cols(K, keys, key_ok, stride_kn, stride_kd, BLOCK_D, BLOCK_D2, HEAD_DIM)
            v2 = load_cols(V, keys, key_ok, stride_vn, stride_vd, BLOCK_D, BLOCK_D2, HEAD_DIM)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=PRECISION)
        p = tl.where(key_ok[None, :], tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)  # padded keys: no probability
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dq2 += tl.dot(ds, k2, input_precision=PRECISION)

    store_cols(DQ, dq * sm_scale, rows, row_ok, stride_dqn, stride_dqd, 0, HEAD_DIM)
    if BLOCK_D2 > 0:
        store_cols(DQ, dq2 * sm_scale, rows, row_ok, stride_dqn, stride_dqd, BLOCK_D, HEAD_DIM)
