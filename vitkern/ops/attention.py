"""Attention op family: backends, the ``vitkern::attention_fwd/bwd`` custom ops and their autograd.

Layouts (the ``layout`` argument of the ops):
  "packed": q is the qkv linear output [B, N, 3·H·D], columns ordered (3, H, D) as timm / torchvision / HF produce
            it (q = cols [0, HD), k = [HD, 2HD), v = [2HD, 3HD), head h at h·D); k = v = None. Output [B, N, H·D].
  "bhnd":   q [B, H, N_Q, D], k, v [B, H, N_K, D] (as F.scaled_dot_product_attention). Output [B, H, N_Q, D].
  "bnhd":   q [B, N_Q, H, D], k, v [B, N_K, H, D]. Output [B, N_Q, H, D].
Inputs may have any strides (the kernels take all four strides of every tensor): no layout is ever copied.

Contract shared by every backend (all tensors are strided [B, H, N, D] *views* made by :func:`head_views`, so the
forward and backward may be served by different backends and no backend ever sees a layout):
  forward(q, k, v, scale, o)  writes o = softmax(q kᵀ · scale) v; returns lse [B, H, N_Q] (fp32; fp64 for fp64
                              input), the natural-log logsumexp of the scaled logits.
  backward(do, q, k, v, o, lse, scale, dq, dk, dv)  writes the three gradients (views, possibly of one packed
                              [B, N, 3·H·D] buffer).
Dropout on the attention probabilities is not part of the contract: the functional runs it on the eager
reference path (:func:`attention_eager`), after asking the dispatcher in eager (so ``vitkern.explain`` shows why
and a strict forced backend raises; not under torch.compile, which cannot read the forcing's ContextVar).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern import dispatch, memory
from vitkern.backends import ReferenceBackend, TritonBackend

OP = "attention"
LAYOUTS = ("packed", "bhnd", "bnhd")
TRITON_MAX_HEAD_DIM = 256  # one [BLOCK, next_pow2(D)] q/k/v tile per program lives in registers
_REF_CHUNK = 1 << 26  # reference backend: logits elements materialised at once


# ----------------------------------------------------------------------------------------------------- layouts
def head_views(t: Tensor, layout: str, num_heads: int) -> tuple[Tensor, ...]:
    """Strided [B, H, N, D] views (no copies): (q, k, v) of a packed tensor, or the one tensor of another layout."""
    if layout == "packed":
        B, N, C = t.shape
        return t.view(B, N, 3, num_heads, C // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "bnhd":
        return (t.transpose(1, 2),)
    return (t,)


def qkv_views(q: Tensor, k: Optional[Tensor], v: Optional[Tensor], layout: str, num_heads: int):
    """(q, k, v) as strided [B, H, N, D] views of the op's inputs."""
    if layout not in LAYOUTS:
        raise ValueError(f"vitkern::attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "packed":
        return head_views(q, layout, num_heads)
    return head_views(q, layout, num_heads)[0], head_views(k, layout, num_heads)[0], head_views(v, layout, num_heads)[0]


def out_shape(q: Tensor, layout: str) -> tuple[int, ...]:
    if layout == "packed":
        B, N, C = q.shape
        return (B, N, C // 3)
    return tuple(q.shape)


def _out_views(out: Tensor, layout: str, num_heads: int) -> Tensor:
    """The output (or its gradient) as a [B, H, N_Q, D] view."""
    if layout == "packed":
        B, N, C = out.shape
        return out.view(B, N, num_heads, C // num_heads).transpose(1, 2)
    return head_views(out, layout, num_heads)[0]


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------- backends
@dispatch.without_autocast  # its fp32 logits stay fp32 under the caller's autocast, as in the custom ops
def attention_eager(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Differentiable plain-PyTorch attention on [B, H, N, D] views (fp32 softmax; fp64 for fp64), with dropout
    on the probabilities as timm's explicit path (``F.dropout``, scaled by 1/(1-p)). Returns [B, H, N_Q, D]."""
    acc = _lse_dtype(q)
    probs = ((q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale).softmax(-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return (probs @ v.to(acc)).to(q.dtype)


def _cpu_flash(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether aten's CPU flash-attention kernels serve the reference backend: CPU, one dtype, non-empty. They
    keep the contract (online softmax accumulated in fp32, fp64 for fp64; the same lse) without materialising
    the logits, at 2-4x the explicit path's speed (fp32/bf16; fp16 about equal), forward and backward."""
    return q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.numel() > 0 and k.numel() > 0


class AttentionReference(ReferenceBackend):
    """Plain PyTorch in fp32 (fp64 for fp64): aten's flash kernels on CPU; elsewhere (the fallback on CUDA) the
    explicit softmax, batch-chunked so the logits never exceed ~2^26 elements."""

    @staticmethod
    def _chunks(q: Tensor, k: Tensor):
        B, H, nq, _ = q.shape
        step = max(1, _REF_CHUNK // max(1, H * nq * k.shape[2]))
        return [slice(i, min(B, i + step)) for i in range(0, B, step)]

    def forward(self, q, k, v, scale, o):
        if _cpu_flash(q, k, v):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
            o.copy_(out)
            return lse.contiguous()  # aten's is [B, H, N] with head-minor strides; the fake's is contiguous
        acc = _lse_dtype(q)
        lse = memory.empty(q.shape[:3], acc, q.device)
        for c in self._chunks(q, k):
            s = (q[c].to(acc) @ k[c].to(acc).transpose(-1, -2)) * scale
            lse[c] = torch.logsumexp(s, -1)
            o[c] = (torch.exp(s - lse[c][..., None]) @ v[c].to(acc)).to(o.dtype)
        return lse

    def backward(self, do, q, k, v, o, lse, scale, dq, dk, dv):
        if _cpu_flash(q, k, v) and do.dtype == o.dtype == q.dtype and lse.dtype == _lse_dtype(q):
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, o, lse, 0.0, False, scale=scale)
            for dst, g in zip((dq, dk, dv), grads):
                dst.copy_(g)
            return
        acc = lse.dtype
        for c in self._chunks(q, k):
            qc, kc, vc, doc = q[c].to(acc), k[c].to(acc), v[c].to(acc), do[c].to(acc)
            p = torch.exp((qc @ kc.transpose(-1, -2)) * scale - lse[c][..., None])
            delta = (doc * o[c].to(acc)).sum(-1, keepdim=True)
            ds = p * (doc @ vc.transpose(-1, -2) - delta)
            dv[c] = (p.transpose(-1, -2) @ doc).to(dv.dtype)
            dq[c] = (ds @ kc * scale).to(dq.dtype)
            dk[c] = (ds.transpose(-1, -2) @ qc * scale).to(dk.dtype)


class AttentionTriton(TritonBackend):
    """Flash attention (online softmax, FA2 backward), strided access to every layout, any N, D <= 256, any B·H
    (the launchers split B·H past CUDA's 65535 limit on grid axis 1 into several launches)."""

    def reject_reasons(self, problem: dispatch.Problem) -> list[str]:
        reasons = self.device_reasons(problem)
        B, H, nq, d = problem.shape("q")
        nk = problem.shape("k")[2]
        if d > TRITON_MAX_HEAD_DIM:
            reasons.append(f"head_dim {d} > {TRITON_MAX_HEAD_DIM} (q/k/v tiles are held in registers)")
        if min(B, H, nq, nk, d) == 0:
            reasons.append(f"empty input (B, H, N_Q, N_K, D) = {(B, H, nq, nk, d)}")
        if problem.attr("dropout_p", 0.0) > 0:
            p = problem.attr("dropout_p")
            reasons.append(f"dropout on the attention probabilities (dropout_p={p}) is not fused")
        if not problem.attr("same_dtype", True):
            reasons.append("q, k, v have different dtypes")
        offset = problem.attr("max_head_offset", 0)
        if offset >= INT32_ROW_OFFSETS:
            reasons.append(f"offsets within one (batch, head) of q/k/v/out reach {offset}, past 2^31 - 1 (the kernels "
                           "form row offsets in int32; batch and head offsets are int64)")
        return reasons

    def forward(self, q, k, v, scale, o):
        from vitkern.kernels.triton import attention as kernels

        lse = memory.empty(q.shape[:3], torch.float32, q.device)
        kernels.attention_fwd(q, k, v, scale, o, lse)
        return lse

    def backward(self, do, q, k, v, o, lse, scale, dq, dk, dv):
        from vitkern.kernels.triton import attention as kernels

        kernels.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv)


dispatch.register_backend(OP, AttentionReference())
dispatch.register_backend(OP, AttentionTriton())


INT32_ROW_OFFSETS = 2**31  # the Triton kernels' row offsets within one (batch, head) are int32


def _last_head_offset(t4: Tensor) -> int:
    """The largest element offset within one (batch, head) of a [B, H, N, D] view (0 when empty)."""
    return (t4.shape[2] - 1) * t4.stride(2) + (t4.shape[3] - 1) * t4.stride(3) if t4.numel() else 0


def _max_head_offset(q4: Tensor, k4: Tensor, v4: Tensor) -> int:
    """The largest element offset a kernel forms within one (batch, head) of q, k, v or the output. The output's
    rows are at most H·D apart in every layout, and so are the gradients' that vitkern allocates; the incoming
    dout, whose strides autograd chooses, is made to fit in attention_bwd."""
    B, H, nq, d = q4.shape
    return max([_last_head_offset(t) for t in (q4, k4, v4)] + [nq * H * d - 1])


def problem(
    direction: str, q4: Tensor, k4: Tensor, v4: Tensor, layout: str, dropout_p: float = 0.0
) -> dispatch.Problem:
    """From the [B, H, N, D] views."""
    return dispatch.tensor_problem(
        OP, direction, [("q", q4), ("k", k4)],
        attrs=[("layout", layout), ("dropout_p", float(dropout_p)),
               ("same_dtype", q4.dtype == k4.dtype == v4.dtype), ("max_head_offset", _max_head_offset(q4, k4, v4))],
    )


# ----------------------------------------------------------------------------------------------------- custom ops
@dispatch.custom_op("vitkern::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Optional[Tensor], v: Optional[Tensor], num_heads: int, layout: str, scale: float
) -> tuple[Tensor, Tensor]:
    """(out in the layout's output shape, lse [B, H, N_Q]); q is the packed qkv when layout == "packed"."""
    q4, k4, v4 = qkv_views(q, k, v, layout, num_heads)
    backend = dispatch.select(problem(dispatch.FORWARD, q4, k4, v4, layout)).backend
    out = memory.empty(out_shape(q, layout), q.dtype, q.device)
    lse = backend.forward(q4, k4, v4, scale, _out_views(out, layout, num_heads))
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, num_heads, layout, scale):
    q4 = qkv_views(q, k, v, layout, num_heads)[0]
    return q.new_empty(out_shape(q, layout)), q.new_empty(q4.shape[:3], dtype=_lse_dtype(q))


@dispatch.custom_op("vitkern::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], out: Tensor, lse: Tensor,
    num_heads: int, layout: str, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the inputs' layouts; for "packed" (dqkv [B, N, 3·H·D], empty, empty)."""
    q4, k4, v4 = qkv_views(q, k, v, layout, num_heads)
    backend = dispatch.select(problem(dispatch.BACKWARD, q4, k4, v4, layout)).backend
    do4 = _out_views(dout, layout, num_heads)
    if _last_head_offset(do4) >= INT32_ROW_OFFSETS:
        # autograd's strides (e.g. a [N, B, C] buffer seen as [B, N, C]) past int32 rows: a contiguous copy fits
        do4 = _out_views(dout.contiguous(), layout, num_heads)
    if layout == "packed":
        dqkv = memory.empty(q.shape, q.dtype, q.device)
        grads, views = (dqkv, q.new_empty(0), q.new_empty(0)), head_views(dqkv, layout, num_heads)
    else:
        grads = tuple(memory.empty(t.shape, t.dtype, t.device) for t in (q, k, v))
        views = tuple(head_views(g, layout, num_heads)[0] for g in grads)
    backend.backward(do4, q4, k4, v4, _out_views(out, layout, num_heads), lse, scale, *views)
    return grads


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, num_heads, layout, scale):
    if layout == "packed":
        return q.new_empty(q.shape), q.new_empty(0), q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, layout, scale = inputs
    out, lse = output
    ctx.num_heads, ctx.layout, ctx.scale = num_heads, layout, scale
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitkern.attention_bwd(dout, q, k, v, out, lse, ctx.num_heads, ctx.layout, ctx.scale)
    if ctx.layout == "packed":
        return dq, None, None, None, None, None
    return dq, dk, dv, None, None, None


dispatch.register_autograd(attention_fwd, _backward, setup_context=_setup_context)
