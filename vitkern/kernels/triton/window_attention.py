"""Triton shifted-window attention (Swin) on the un-partitioned layout, forward and backward.

One program owns BLOCK_M queries of one (image, window, head) against the N <= 256 keys of the window in the forward
(online softmax over 64-key blocks; BLOCK_M and BLOCK_N = the whole window up to ws 8), and a chunk of windows of one
head in the backward (64 × 64 blocks of the scores).
Token t = (r, c) of window (wy, wx) sits at (py, px) = (wy·WH + r, wx·WW + c) of timm's rolled-then-padded map, so
its q/k/v are read straight from the packed qkv rows of image position ((py + sh) mod H, (px + sw) mod W) and its
output is written back to that same position: no roll, partition, reverse, crop or mask tensor in memory.
timm semantics kept exactly (see vitkern/reference/swin.py):
  - padded tokens (py >= H or px >= W) are zeros before the qkv linear, so their q/k/v are the qkv bias; they are
    attended to, never masked, and never written;
  - the shift-mask regions are laid out on the *padded* size: per axis [0, Lp-w), [Lp-w, Lp-s), [Lp-s, Lp);
    tokens of different regions get ``mask_value`` (-100 in Swin, or -inf) added;
  - the relative position bias of (t1, t2) is table[(r1-r2+WH-1)·(2WW-1) + (c1-c2+WW-1), head].

Scores live in the log2 domain (scale and bias pre-multiplied by log2 e) so the softmax is an exp2; the forward
saves the natural-log logsumexp per query for the backward. Backward (recomputes P from the LSE):
dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K·scale, dK = dSᵀ Q·scale. Each program keeps the sum of dS
over its windows in registers, block by block, and writes one [N, N] fp32 partial per (chunk, head); torch sums the
partials and folds them onto the table entries in a fixed order: bitwise repeatable, no atomics. The gradient
reaching the padded tokens' q/k/v is the qkv bias's (partials [chunks, 3·heads·D], summed likewise).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import tuning

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _window_tokens(t, win, nwx, H, W, Hp, Wp, sh, sw, WH: tl.constexpr, WW: tl.constexpr, PAD_FIRST: tl.constexpr):
    """In-window (r, c), validity, image position and shift-mask region of tokens t of one window."""
    r = t // WW
    c = t % WW
    py = (win // nwx) * WH + r  # position on the rolled, padded map
    px = (win % nwx) * WW + c
    valid = t < WH * WW
    if PAD_FIRST:  # torchvision / HF: the roll wraps around the padded map
        sy = (py + sh) % Hp
        sx = (px + sw) % Wp
        real = valid & (sy < H) & (sx < W)
    else:  # timm: roll the image, then pad
        sy = (py + sh) % H
        sx = (px + sw) % W
        real = valid & (py < H) & (px < W)  # not a padded token
    pos = sy * W + sx  # where the roll took it from: the token's row in the image
    region_y = tl.where(py < Hp - WH, 0, tl.where(py < Hp - sh, 1, 2))
    region_x = tl.where(px < Wp - WW, 0, tl.where(px < Wp - sw, 1, 2))
    return r, c, valid, real, pos, region_y * 3 + region_x


@triton.jit
def _load_head(base, rows, real, BIAS, col0, HAS_QKV_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """[rows, BLOCK_D] slice (columns col0 .. col0+HEAD_DIM) of the given token rows; padded tokens get the bias."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    x = tl.load(base + rows[:, None] + col0 + d[None, :], mask=real[:, None] & d_ok[None, :], other=0.0)
    if HAS_QKV_BIAS:
        bias = tl.load(BIAS + col0 + d, mask=d_ok, other=0.0).to(x.dtype)
        x = tl.where(real[:, None], x, bias[None, :])
    return x


@triton.jit
def _scores_log2(q, k, rq, cq, valid_q, region_q, rk, ck, valid_k, region_k, TABLE, h, heads, scale_log2,
                 mask_log2, WH: tl.constexpr, WW: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """(q kᵀ·scale + relative bias + shift mask)·log2 e, [BLOCK_M, BLOCK_N] fp32; key columns past N are -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    rel = (rq[:, None] - rk[None, :] + WH - 1) * (2 * WW - 1) + (cq[:, None] - ck[None, :] + WW - 1)
    both = valid_q[:, None] & valid_k[None, :]
    s += tl.load(TABLE + rel * heads + h, mask=both, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_MASK:
        s += tl.where(region_q[:, None] != region_k[None, :], mask_log2, 0.0)
    return tl.where(valid_k[None, :], s, float("-inf"))


@triton.jit
def window_attention_fwd_kernel(
    QKV, QKV_BIAS, TABLE,  # QKV: [B, H, W, 3·heads·D] contiguous; QKV_BIAS: [3·heads·D]; TABLE: [(2WH-1)(2WW-1), heads]
    OUT, LSE,  # OUT: [B, H, W, heads·D]; LSE: [B·nW, heads, N] fp32 natural-log logsumexp per query
    H, W, Hp, Wp, sh, sw, nwx, nw, heads, scale_log2, mask_log2,
    WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, PAD_FIRST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_M queries of one (image, window, head) against the window's keys, BLOCK_N at a time
    NUM_M: tl.constexpr = (WH * WW + BLOCK_M - 1) // BLOCK_M
    NUM_N: tl.constexpr = (WH * WW + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)  # ((image, window), head, query block), query block fastest
    m0 = (pid % NUM_M) * BLOCK_M
    h = (pid // NUM_M) % heads
    bw = pid // (NUM_M * heads)
    win, image = bw % nw, (bw // nw).to(tl.int64)  # int64: B·H·W·3·heads·D can exceed 2^31
    tq = m0 + tl.arange(0, BLOCK_M)
    rq, cq, valid_q, real_q, pos_q, region_q = _window_tokens(tq, win, nwx, H, W, Hp, Wp, sh, sw, WH, WW, PAD_FIRST)
    rows_q = (image * H * W + pos_q) * (3 * heads * HEAD_DIM)
    q = _load_head(QKV, rows_q, real_q, QKV_BIAS, h * HEAD_DIM, HAS_QKV_BIAS, HEAD_DIM, BLOCK_D)

    # online softmax over the key blocks (one block up to ws 8: N <= 64)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for nb in range(NUM_N):
        tk = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        rk, ck, valid_k, real_k, pos_k, region_k = _window_tokens(tk, win, nwx, H, W, Hp, Wp, sh, sw, WH, WW,
                                                                  PAD_FIRST)
        rows_k = (image * H * W + pos_k) * (3 * heads * HEAD_DIM)
        k = _load_head(QKV, rows_k, real_k, QKV_BIAS, (heads + h) * HEAD_DIM, HAS_QKV_BIAS, HEAD_DIM, BLOCK_D)
        v = _load_head(QKV, rows_k, real_k, QKV_BIAS, (2 * heads + h) * HEAD_DIM, HAS_QKV_BIAS, HEAD_DIM, BLOCK_D)
        s = _scores_log2(q, k, rq, cq, valid_q, region_q, rk, ck, valid_k, region_k, TABLE, h, heads, scale_log2,
                         mask_log2, WH, WW, HAS_MASK, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a -inf shift mask can hide a whole key block from a query: keep exp2's argument finite (-inf - -inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]  # every query sees its own key (same region, unmasked): l_i > 0

    d = tl.arange(0, BLOCK_D)
    out_ptrs = OUT + ((image * H * W + pos_q) * (heads * HEAD_DIM) + h * HEAD_DIM)[:, None] + d[None, :]
    tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=real_q[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(LSE + (bw * heads + h) * (WH * WW) + tq, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=valid_q)


@triton.jit
def window_attention_bwd_kernel(
    QKV, QKV_BIAS, TABLE, OUT, DOUT, LSE,  # as in the forward; DOUT like OUT
    DQKV, DTABLE_PART, DBIAS_PART,  # DQKV like QKV; DTABLE_PART: [G, heads, N, N] fp32; DBIAS_PART: [G, 3·heads·D] fp32
    H, W, Hp, Wp, sh, sw, nwx, nw, heads, num_windows, windows_per_program, scale, scale_log2, mask_log2,
    WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr, PAD_FIRST: tl.constexpr, NEED_DTABLE: tl.constexpr, NEED_DBIAS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program: a chunk of windows of one head, block by block of the [N, N] scores: for each (query block, key
    # block) the window loop runs innermost, so that block's dS sum over windows (the bias gradient) stays in
    # registers. dQ of later key blocks and dK/dV of later query blocks add onto what earlier blocks stored (this
    # program owns those rows: no race). Key blocks of 64 keep every [BLOCK_M, BLOCK_N] fp32 tile at <= 32 registers
    # per thread at 4 warps: one [64, 256] tile per window at ws 12/16 spilled 3-17 KB per thread.
    N: tl.constexpr = WH * WW
    NUM_M: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    NUM_N: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)  # (chunk g of windows, head), head fastest
    h = pid % heads
    g = pid // heads
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < HEAD_DIM)[None, :]
    C = heads * HEAD_DIM
    ty = DQKV.dtype.element_ty
    dq_pad = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dk_pad = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dv_pad = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bw_start = g * windows_per_program
    bw_end = tl.minimum(bw_start + windows_per_program, num_windows)

    for mb in range(NUM_M):
        tq = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        for nb in range(NUM_N):
            tk = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            ds_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if mb + nb > 0:  # make the earlier blocks' stores (other threads') visible before adding onto them
                tl.debug_barrier()
            for bw in range(bw_start, bw_end):
                win, image = bw % nw, (bw // nw).to(tl.int64)
                rq, cq, valid_q, real_q, pos_q, region_q = _window_tokens(tq, win, nwx, H, W, Hp, Wp, sh, sw, WH,
                                                                          WW, PAD_FIRST)
                rk, ck, valid_k, real_k, pos_k, region_k = _window_tokens(tk, win, nwx, H, W, Hp, Wp, sh, sw, WH,
                                                                          WW, PAD_FIRST)
                rows_q = (image * H * W + pos_q) * (3 * C)
                rows_k = (image * H * W + pos_k) * (3 * C)
                q = _load_head(QKV, rows_q, real_q, QKV_BIAS, h * HEAD_DIM, HAS_QKV_BIAS, HEAD_DIM, BLOCK_D)
                k = _load_head(QKV, rows_k, real_k, QKV_BIAS, (heads + h) * HEAD_DIM, HAS_QKV_BIAS, HEAD_DIM,
                               BLOCK_D)
                v = _load_head(QKV, rows_k, real_k, QKV_BIAS, (2 * heads + h) * HEAD_DIM, HAS_QKV_BIAS, HEAD_DIM,
                               BLOCK_D)
                # padded queries were cropped away: their dO is zero, so their rows of dS vanish
                out_offs = ((image * H * W + pos_q) * C + h * HEAD_DIM)[:, None] + d[None, :]
                o = tl.load(OUT + out_offs, mask=real_q[:, None] & d_ok, other=0.0)
                do = tl.load(DOUT + out_offs, mask=real_q[:, None] & d_ok, other=0.0)
                lse = tl.load(LSE + (bw * heads + h) * N + tq, mask=valid_q, other=0.0)

                s = _scores_log2(q, k, rq, cq, valid_q, region_q, rk, ck, valid_k, region_k, TABLE, h, heads,
                                 scale_log2, mask_log2, WH, WW, HAS_MASK, PRECISION)
                p = tl.where(valid_q[:, None], tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
                ds = p * (dp - delta[:, None])  # d loss / d (pre-softmax score) = d loss / d bias entry
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
                if NEED_DBIAS:
                    # padded tokens are never stored, so these are this block's parts alone: sum them up
                    pad_k = (valid_k & ~real_k)[:, None]
                    dq_pad += tl.sum(tl.where((valid_q & ~real_q)[:, None], dq, 0.0), axis=0)
                    dk_pad += tl.sum(tl.where(pad_k, dk, 0.0), axis=0)
                    dv_pad += tl.sum(tl.where(pad_k, dv, 0.0), axis=0)

                dq_ptrs = DQKV + rows_q[:, None] + h * HEAD_DIM + d[None, :]
                dk_ptrs = DQKV + rows_k[:, None] + (heads + h) * HEAD_DIM + d[None, :]
                dv_ptrs = dk_ptrs + C
                q_mask = real_q[:, None] & d_ok
                kv_mask = real_k[:, None] & d_ok
                if nb > 0:
                    dq += tl.load(dq_ptrs, mask=q_mask, other=0.0).to(tl.float32)
                if mb > 0:
                    dk += tl.load(dk_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
                    dv += tl.load(dv_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
                tl.store(dq_ptrs, dq.to(ty), mask=q_mask)
                tl.store(dk_ptrs, dk.to(ty), mask=kv_mask)
                tl.store(dv_ptrs, dv.to(ty), mask=kv_mask)
                if NEED_DTABLE:
                    ds_sum += ds
            if NEED_DTABLE:
                both = (tq < N)[:, None] & (tk < N)[None, :]
                tl.store(DTABLE_PART + ((g * heads + h) * N + tq[:, None]) * N + tk[None, :], ds_sum, mask=both)

    if NEED_DBIAS:
        part = DBIAS_PART + g * (3 * C) + h * HEAD_DIM + d
        tl.store(part, dq_pad, mask=d < HEAD_DIM)
        tl.store(part + C, dk_pad, mask=d < HEAD_DIM)
        tl.store(part + 2 * C, dv_pad, mask=d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------------
# Launchers. On the GPU the warp count / pipelining are autotuned per (window, head_dim, flags); the interpreter
# runs one fixed config (autotuning there would time the interpreter).


def _block_n(n: int) -> int:
    return max(16, tuning.next_power_of_2(n))  # tl.dot needs every tile side >= 16


def _block_d(d: int) -> int:
    return max(16, tuning.next_power_of_2(d))


def _block_m(n: int, interpreted: bool) -> int:
    """Queries per tile. GPU: the whole window up to 64 tokens (ws <= 8: one block), else 64-query blocks so the
    [BLOCK_M, BLOCK_N] score tiles stay in registers at ws 12/16. Interpreter: 16, so tests cover several blocks."""
    return 16 if interpreted else min(64, _block_n(n))


def _block_kv(n: int, interpreted: bool) -> int:
    """Keys per tile. GPU: as _block_m (ws 12's 144 keys are 3 blocks of 64, not one padded to 256); the
    interpreter: 32, so tests cover several key blocks and a partial last one (ws 7: 49 = 32 + 17)."""
    return min(32 if interpreted else 64, _block_n(n))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 must not silently drop to tf32; ignored for 16-bit


def _gpu_configs() -> list[triton.Config]:
    # 4 warps first: a whole warpgroup (wgmma) that compiles without spills at ws 7 and is what VITKERN_AUTOTUNE=0 runs
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8, 2) for s in (1, 2)]


MAX_FP32_PER_THREAD = 144  # live fp32 tile elements per thread (_fp32_live / threads) that compile without spills


def _fp32_live(kernel_name: str, m: int, n: int, d: int) -> int:
    """fp32 tile elements live at once: forward scores/probabilities and the output; backward s/p, dp/dS, the dS sum
    over windows, dQ, dK and dV."""
    return m * n + m * d if kernel_name == "fwd" else 3 * m * n + m * d + 2 * n * d


def _prune_for(kernel_name: str):
    # ptxas -v on sm_90 (tests/test_sm90_compile.py tooling), backward at D 32: 144 per thread spills 0-8 B (ws 7-12,
    # 4 warps), 288 spills 0.4-1.5 KB (2 warps); the forward over all 256 keys of ws 16 at 4 warps: 144 spilled
    # 0.5 KB (D 32), 192 2.5 KB (D 128). Configs over the bound are dropped; if none is left, the most warps run.
    def prune(configs, named_args, **kwargs):
        live = _fp32_live(kernel_name, kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_D"])
        kept = [c for c in configs if live <= MAX_FP32_PER_THREAD * 32 * c.num_warps]
        return kept or [max(configs, key=lambda c: c.num_warps)]

    return prune


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    kernel = {"fwd": window_attention_fwd_kernel, "bwd": window_attention_bwd_kernel}[kernel_name]
    key = ["WH", "WW", "HEAD_DIM", "HAS_QKV_BIAS", "HAS_MASK", "PAD_FIRST", "PRECISION", "BLOCK_M"]
    if kernel_name == "bwd":
        key += ["NEED_DTABLE", "NEED_DBIAS"]
    return tuning.autotune(kernel, _gpu_configs(), key, prune=_prune_for(kernel_name))


def _geometry(qkv: torch.Tensor, heads: int, window: tuple[int, int], shift: tuple[int, int]) -> dict:
    B, H, W, three_c = qkv.shape
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = tuning.cdiv(H, wh) * wh, tuning.cdiv(W, ww) * ww
    return dict(B=B, H=H, W=W, Hp=Hp, Wp=Wp, sh=sh, sw=sw, nwx=Wp // ww, nw=(Hp // wh) * (Wp // ww),
                D=three_c // (3 * heads))


def window_attention_fwd(
    qkv: torch.Tensor,  # [B, H, W, 3·heads·D] contiguous
    qkv_bias: torch.Tensor | None,  # [3·heads·D]: the q/k/v of padded tokens
    table: torch.Tensor,  # [(2wh-1)(2ww-1), heads] contiguous
    heads: int, window: tuple[int, int], shift: tuple[int, int], scale: float, mask_value: float, pad_first: bool,
    out: torch.Tensor,  # [B, H, W, heads·D] out
    lse: torch.Tensor,  # [B·nW, heads, N] fp32 out
) -> None:
    g = _geometry(qkv, heads, window, shift)
    args = (
        qkv, qkv_bias if qkv_bias is not None else qkv, table, out, lse,
        g["H"], g["W"], g["Hp"], g["Wp"], g["sh"], g["sw"], g["nwx"], g["nw"], heads,
        scale * LOG2E, mask_value * LOG2E,
    )
    n, interpreted = window[0] * window[1], tuning.interpreted(qkv)
    block_m = _block_m(n, interpreted)
    flags = dict(WH=window[0], WW=window[1], HEAD_DIM=g["D"], HAS_QKV_BIAS=qkv_bias is not None,
                 HAS_MASK=any(shift), PAD_FIRST=pad_first, PRECISION=_precision(qkv.dtype),
                 BLOCK_M=block_m, BLOCK_N=_block_kv(n, interpreted), BLOCK_D=_block_d(g["D"]))
    grid = (g["B"] * g["nw"] * heads * tuning.cdiv(n, block_m),)
    if interpreted:
        window_attention_fwd_kernel[grid](*args, **flags, num_warps=4)
    else:
        _tuned("fwd")[grid](*args, **flags)


def window_attention_bwd(
    dout: torch.Tensor,  # [B, H, W, heads·D] contiguous
    qkv: torch.Tensor, qkv_bias: torch.Tensor | None, table: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,  # the forward's outputs
    heads: int, window: tuple[int, int], shift: tuple[int, int], scale: float, mask_value: float, pad_first: bool,
    dqkv: torch.Tensor,  # [B, H, W, 3·heads·D] out (every element written)
    need_dtable: bool, need_dbias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Writes dqkv; returns (the bias gradient [heads, N, N] fp32 summed over windows, dqkv_bias [3·heads·D] fp32
    from padded tokens), None where not needed. The caller folds the first onto the table entries."""
    from vitkern import memory

    g = _geometry(qkv, heads, window, shift)
    n = window[0] * window[1]
    num_windows = g["B"] * g["nw"]
    interpreted = tuning.interpreted(qkv)
    if interpreted:
        chunks = min(3, num_windows)  # several chunks even in tests: exercises the partial reduction
    else:
        chunks = max(1, min(num_windows, tuning.cdiv(4 * tuning.num_sms(qkv.device.index), heads)))
    per_chunk = tuning.cdiv(num_windows, chunks)
    chunks = tuning.cdiv(num_windows, per_chunk)
    need_dbias = need_dbias and qkv_bias is not None
    dtable_part = memory.empty((chunks, heads, n, n), torch.float32, qkv.device) if need_dtable else lse
    dbias_part = memory.empty((chunks, qkv.shape[-1]), torch.float32, qkv.device) if need_dbias else lse
    args = (
        qkv, qkv_bias if qkv_bias is not None else qkv, table, out, dout, lse, dqkv, dtable_part, dbias_part,
        g["H"], g["W"], g["Hp"], g["Wp"], g["sh"], g["sw"], g["nwx"], g["nw"], heads, num_windows, per_chunk,
        scale, scale * LOG2E, mask_value * LOG2E,
    )
    flags = dict(WH=window[0], WW=window[1], HEAD_DIM=g["D"], HAS_QKV_BIAS=qkv_bias is not None,
                 HAS_MASK=any(shift), PAD_FIRST=pad_first, NEED_DTABLE=need_dtable, NEED_DBIAS=need_dbias,
                 PRECISION=_precision(qkv.dtype), BLOCK_M=_block_m(n, interpreted),
                 BLOCK_N=_block_kv(n, interpreted), BLOCK_D=_block_d(g["D"]))
    grid = (chunks * heads,)
    if interpreted:
        window_attention_bwd_kernel[grid](*args, **flags, num_warps=4)
    else:
        _tuned("bwd")[grid](*args, **flags)
    return (dtable_part.sum(0) if need_dtable else None), (dbias_part.sum(0) if need_dbias else None)
