"""Flash attention backward, FA2 style, deterministic (no atomics).

1. ``attention_bwd_delta_kernel``: delta = rowsum(dO · O) in fp32 ([B, H, N_Q]).
2. ``attention_bwd_dkdv_kernel``: one program per key block; loops over query blocks, recomputing
   P^T = exp(K Q^T · scale - lse) from the saved logsumexp: dV += P^T dO, dS^T = P^T ∘ (V dO^T - delta),
   dK += dS^T Q.
3. ``attention_bwd_dq_kernel``: one program per query block; loops over key blocks: dQ += dS K.

All tensors are strided [B, H, N, D] views (see attention_fwd.py), so dq/dk/dv land straight in a packed
[B, N, 3·H·D] gradient when the input was packed. Query rows >= N_Q get P = 0; key rows >= N_K are never stored.
"""

import triton
import triton.language as tl

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
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < N_Q)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + dims[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + rows, tl.sum(o * do, 1), mask=rows < N_Q)


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
    PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_gb + h * stride_gh
    LSE += bh.to(tl.int64) * N_Q
    DELTA += bh.to(tl.int64) * N_Q

    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_mask = (keys < N_K)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kn + dims[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < N_Q
        q_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
        q = tl.load(Q + rows[:, None] * stride_qn + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_gn + dims[None, :] * stride_gd, mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        # transposed probabilities P^T [BLOCK_N, BLOCK_M], zero for padded query rows
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
        pt = tl.where(row_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + keys[:, None] * stride_dkn + dims[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + keys[:, None] * stride_dvn + dims[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


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
    PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + dims[None, :] * stride_gd,
                 mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + rows, mask=row_ok, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < N_K
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + keys[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + keys[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)  # padded keys carry no probability
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn + dims[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)
