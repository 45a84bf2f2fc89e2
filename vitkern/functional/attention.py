"""``vitkern.functional.attention``: softmax(q kᵀ · scale) v, reading q/k/v straight from the packed qkv output.

Two ways to call it:

    attention(qkv=x_qkv, num_heads=H)            # x_qkv [B, N, 3·H·D] from the qkv linear -> [B, N, H·D]
    attention(q, k, v)                           # [B, H, N, D] each, like SDPA            -> [B, H, N_Q, D]
    attention(q, k, v, layout="bnhd")            # [B, N, H, D] each                       -> [B, N_Q, H, D]

The packed form reads each head through strides (no permute / contiguous copy) and returns the layout the
output projection consumes. k and v may have a different length than q (cross-attention, N_K != N_Q).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitkern import dispatch
from vitkern.functional._autocast import cast_inputs
from vitkern.ops import attention as attn_op
from vitkern.validation import FLOAT_DTYPES, check_tensor

__all__ = ["attention"]

_NAME = "vitkern.attention"
_SEPARATE_LAYOUTS = ("bhnd", "bnhd")


def _check_layout(q, k, v, qkv, num_heads, layout) -> str:
    """Validate the arguments; returns the op layout ("packed", "bhnd" or "bnhd")."""
    if qkv is not None:
        if any(t is not None for t in (q, k, v)):
            raise ValueError(f"{_NAME}: pass either qkv= (packed) or q, k, v, not both")
        if layout not in (None, "packed"):
            raise ValueError(f"{_NAME}: layout must be None or 'packed' with qkv=, got {layout!r}")
        check_tensor(_NAME, "qkv", qkv, dtypes=FLOAT_DTYPES, ndim=3)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"{_NAME}: num_heads must be a positive int with qkv=, got {num_heads!r}")
        if qkv.shape[2] % (3 * num_heads) or qkv.shape[2] == 0:
            raise ValueError(f"{_NAME}: qkv has {qkv.shape[2]} features; expected a positive multiple of "
                             f"3 * num_heads = {3 * num_heads}")
        return "packed"
    if q is None or k is None or v is None:
        raise ValueError(f"{_NAME}: pass q, k and v (each [B, H, N, D] or [B, N, H, D]) or qkv= with num_heads=")
    layout = "bhnd" if layout is None else layout
    if layout not in _SEPARATE_LAYOUTS:
        raise ValueError(f"{_NAME}: layout must be one of {_SEPARATE_LAYOUTS} for separate q, k, v, got {layout!r}")
    check_tensor(_NAME, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(_NAME, "k", k, dtypes=FLOAT_DTYPES, ndim=4, like=q, same_dtype=True)
    check_tensor(_NAME, "v", v, dtypes=FLOAT_DTYPES, ndim=4, like=q, same_dtype=True)
    if k.shape != v.shape:
        raise ValueError(f"{_NAME}: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; expected equal shapes")
    seq = 2 if layout == "bhnd" else 1
    expect = list(q.shape)
    expect[seq] = k.shape[seq]
    if list(k.shape) != expect:
        what = "[B, H, N, D]" if layout == "bhnd" else "[B, N, H, D]"
        raise ValueError(
            f"{_NAME}: q {tuple(q.shape)} and k {tuple(k.shape)} ({layout}: {what}) must agree in every dim but N"
        )
    if num_heads is not None and num_heads != q.shape[1 if layout == "bhnd" else 2]:
        raise ValueError(f"{_NAME}: num_heads={num_heads} disagrees with q's head dim ({layout}: {tuple(q.shape)})")
    return layout


def _prepare(q, k, v, qkv, num_heads, layout, scale, dropout_p):
    layout = _check_layout(q, k, v, qkv, num_heads, layout)
    if not (isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{_NAME}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if layout == "packed":
        first, k, v, heads = qkv, None, None, num_heads
    else:
        first, heads = q, q.shape[1 if layout == "bhnd" else 2]
    head_dim = first.shape[-1] // (3 * heads) if layout == "packed" else first.shape[-1]
    if head_dim == 0:
        raise ValueError(f"{_NAME}: head_dim is 0 (shape {tuple(first.shape)})")
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{_NAME}: scale must be a float or None, got {type(scale).__name__}")
    return layout, first, k, v, heads, float(scale), float(dropout_p)


def attention(
    q: Tensor | None = None,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    qkv: Tensor | None = None,
    num_heads: int | None = None,
    layout: str | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Multi-head attention softmax(q kᵀ · scale) v, no N×N matrix in memory on the Triton path.

    Args:
        q, k, v: separate inputs, ``layout="bhnd"`` (default: [B, H, N, D], as SDPA) or ``"bnhd"`` ([B, N, H, D]);
            k/v may be longer or shorter than q. Any strides. Same dtype and device.
        qkv: instead of q, k, v: the packed qkv linear output [B, N, 3·H·D] (columns (3, H, D), as timm,
            torchvision and HF produce it); needs ``num_heads``.
        num_heads: H for ``qkv=`` (optional cross-check otherwise).
        scale: softmax scale, default head_dim ** -0.5.
        dropout_p: dropout on the attention probabilities (pass 0 in eval). > 0 runs the eager reference path
            (``vitkern.explain`` says so; a strict ``use_backend`` of another backend raises, except under
            torch.compile, where it is not consulted); the fused kernels never drop.
    Returns:
        packed: [B, N, H·D] (proj-ready); bhnd: [B, H, N_Q, D]; bnhd: [B, N_Q, H, D]. Same dtype as the input.
    """
    q, k, v, qkv = cast_inputs(q, k, v, qkv)
    layout, first, k, v, heads, scale, dropout_p = _prepare(q, k, v, qkv, num_heads, layout, scale, dropout_p)
    if dropout_p > 0:
        views = attn_op.qkv_views(first, k, v, layout, heads)
        # Only the eager reference path drops. Eager asks the dispatcher anyway, so a strict use_backend("triton")
        # raises with its reason. That reads a ContextVar, which dynamo cannot trace (a graph break), and its only
        # answer that is not an error is this path: compiled code skips the question (whatever is forced).
        if not torch.compiler.is_compiling():
            dispatch.select(attn_op.problem(dispatch.FORWARD, *views, layout, dropout_p))
        o4 = attn_op.attention_eager(*views, scale, dropout_p)
        if layout == "packed":
            return o4.transpose(1, 2).reshape(first.shape[0], first.shape[1], -1)
        return o4 if layout == "bhnd" else o4.transpose(1, 2)
    out, _ = attn_op.attention_fwd(first, k, v, heads, layout, scale)
    return out


attention.__vitkern_op__ = attn_op.OP  # type: ignore[attr-defined]


def _describe(q=None, k=None, v=None, *, qkv=None, num_heads=None, layout=None, scale=None, dropout_p=0.0):
    layout, first, k, v, heads, _, dropout_p = _prepare(q, k, v, qkv, num_heads, layout, scale, dropout_p)
    return attn_op.problem(dispatch.FORWARD, *attn_op.qkv_views(first, k, v, layout, heads), layout, dropout_p)


dispatch.register_describer(attn_op.OP, _describe)
