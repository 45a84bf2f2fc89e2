"""Flash attention forward (online softmax, FA2 order) over strided [B, H, N, D] views.

Every tensor is addressed by its four strides, so one kernel serves the packed qkv linear output ([B, N, 3·H·D]
viewed per head without a copy), [B, H, N, D] and [B, N, H, D]; the output is written through its own strides
(e.g. straight into the [B, N, H·D] layout the proj linear reads). The softmax runs in the log2 domain with the
scale folded in (``qk_scale = scale · log2 e``), fp32 statistics; only the [B, H, N] logsumexp is saved.

Head dims that are not a power of two are two column chunks, [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2)
(BLOCK_D2 = 0: one chunk): D = 80 is 64 + 16 rather than one 128-wide tile, so the dots do 80/128 of the padded
work (72: 64 + 16, 96: 64 + 32, 160: 128 + 32). Q·Kᵀ sums the chunks' dots; P·V and the output are per chunk.

Tails: key columns >= N_K are set to -inf before the row max; query rows >= N_Q are loaded as 0 and not stored;
head-dim columns >= HEAD_DIM are loaded as 0 and not stored.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def load_cols(ptr, rows, row_ok, stride_n, stride_d, D0: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[rows, BLOCK] tile of head-dim columns D0 .. D0 + BLOCK (zero past HEAD_DIM and for rows not ok)."""
    dims = D0 + tl.arange(0, BLOCK)
    return tl.load(ptr + rows[:, None] * stride_n + dims[None, :] * stride_d,
                   mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def store_cols(ptr, x, rows, row_ok, stride_n, stride_d, D0: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store x [rows, BLOCK] (cast to ptr's dtype) as head-dim columns D0 .. D0 + BLOCK, masked like load_cols."""
    dims = D0 + tl.arange(0, x.shape[1])
    tl.store(ptr + rows[:, None] * stride_n + dims[None, :] * stride_d, x.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE,  # Q, O: [B, H, N_Q, D]; K, V: [B, H, N_K, D] (any strides); LSE: [B, H, N_Q] fp32 contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N_Q, N_K, qk_scale,  # qk_scale = softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
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
    row_ok = rows < N_Q
    q = load_cols(Q, rows, row_ok, stride_qn, stride_qd, 0, BLOCK_D, HEAD_DIM)  # [BLOCK_M, BLOCK_D]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's second chunk
        q2 = load_cols(Q, rows, row_ok, stride_qn, stride_qd, BLOCK_D, BLOCK_D2, HEAD_DIM)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    for start_n in range(0, N_K, BLOCK_N):
        keys = start_n + cols
        key_ok = keys < N_K
        # k and v tiles [BLOCK_N, BLOCK_D] (and [BLOCK_N, BLOCK_D2])
        k = load_cols(K, keys, key_ok, stride_kn, stride_kd, 0, BLOCK_D, HEAD_DIM)
        v = load_cols(V, keys, key_ok, stride_vn, stride_vd, 0, BLOCK_D, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            k2 = load_cols(K, keys, key_ok, stride_kn, stride_kd, BLOCK_D, BLOCK_D2, HEAD_DIM)
            v2 = load_cols(V, keys, key_ok, stride_vn, stride_vd, BLOCK_D, BLOCK_D2, HEAD_DIM)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
        s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))  # every block has >= 1 valid key: m_new finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=PRECISION)
        m_i = m_new

    store_cols(O, acc / l_i[:, None], rows, row_ok, stride_on, stride_od, 0, HEAD_DIM)
    if BLOCK_D2 > 0:
        store_cols(O, acc2 / l_i[:, None], rows, row_ok, stride_on, stride_od, BLOCK_D, HEAD_DIM)
    lse = (m_i + tl.math.log2(l_i)) * LN2  # natural-log logsumexp of the scaled logits
    tl.store(LSE + bh.to(tl.int64) * N_Q + rows, lse, mask=row_ok)
