"""Flash attention forward (online softmax, FA2 order) over strided [B, H, N, D] views.

Every tensor is addressed by its four strides, so one kernel serves the packed qkv linear output ([B, N, 3·H·D]
viewed per head without a copy), [B, H, N, D] and [B, N, H, D]; the output is written through its own strides
(e.g. straight into the [B, N, H·D] layout the proj linear reads). The softmax runs in the log2 domain with the
scale folded in (``qk_scale = scale · log2 e``), fp32 statistics; only the [B, H, N] logsumexp is saved.

Tails: key columns >= N_K are set to -inf before the row max; query rows >= N_Q are loaded as 0 and not stored;
head-dim columns >= HEAD_DIM (BLOCK_D = next power of two) are loaded as 0 and not stored.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE,  # Q, O: [B, H, N_Q, D]; K, V: [B, H, N_K, D] (any strides); LSE: [B, H, N_Q] fp32 contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N_Q, N_K, qk_scale,  # qk_scale = softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: batch offsets exceed 2^31 elements at large B
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N_Q
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        keys = start_n + cols
        key_ok = keys < N_K
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        # k and v tiles [BLOCK_N, BLOCK_D]
        k = tl.load(K + keys[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + keys[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))  # every block has >= 1 valid key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_on + dims[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * LN2  # natural-log logsumexp of the scaled logits
    tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=row_ok)
