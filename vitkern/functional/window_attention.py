"""``vitkern.functional.window_attention``: Swin (shifted-)window attention on the un-partitioned qkv layout."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from vitkern import dispatch
from vitkern.functional._autocast import cast_inputs
from vitkern.ops import window_attention as wa_op
from vitkern.validation import check_tensor

__all__ = ["window_attention"]

_NAME = "vitkern.window_attention"
SWIN_MASK_VALUE = -100.0  # Swin's additive shift mask; pass float("-inf") for a true mask


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ValueError(f"{_NAME}: {name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _validate(qkv, table, num_heads, window_size, shift_size, qkv_bias, scale, mask_value):
    check_tensor(_NAME, "qkv", qkv, ndim=4)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{_NAME}: num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"{_NAME}: qkv's last dim {qkv.shape[-1]} must be 3 * num_heads * head_dim "
                         f"(a multiple of 3 * {num_heads})")
    window, shift = _pair("window_size", window_size), _pair("shift_size", shift_size)
    if min(window) < 1:
        raise ValueError(f"{_NAME}: window_size must be >= 1, got {window}")
    if any(not 0 <= s < w for s, w in zip(shift, window)):
        raise ValueError(f"{_NAME}: shift_size {shift} must satisfy 0 <= shift < window_size {window} per axis")
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    check_tensor(_NAME, "relative_position_bias_table", table, shape=(entries, num_heads), like=qkv)
    if qkv_bias is not None:
        check_tensor(_NAME, "qkv_bias", qkv_bias, shape=(qkv.shape[-1],), like=qkv)
    # comparisons, not math.isfinite / isnan: torch.compile traces float attributes as SymFloats (dynamic=True)
    if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
        raise ValueError(f"{_NAME}: scale must be a positive finite number or None, got {scale!r}")
    if not isinstance(mask_value, (int, float)) or mask_value != mask_value or mask_value > 0:  # NaN != NaN
        raise ValueError(f"{_NAME}: mask_value must be <= 0 (Swin: -100.0, or float('-inf')), got {mask_value!r}")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return window, shift, float(scale) if scale is not None else head_dim ** -0.5


def window_attention(
    qkv: Tensor,
    relative_position_bias_table: Tensor,
    num_heads: int,
    window_size: int | Sequence[int],
    shift_size: int | Sequence[int] = 0,
    qkv_bias: Tensor | None = None,
    scale: float | None = None,
    mask_value: float = SWIN_MASK_VALUE,
    pad_first: bool = False,
) -> Tensor:
    """Swin window attention of the qkv linear's output ``qkv`` [B, H, W, 3·heads·D] -> [B, H, W, heads·D].

    Equals timm's ``SwinTransformerBlock._attn`` minus its two linears: roll by -shift, zero-pad the bottom/right
    to a window multiple *after* the roll, partition, softmax(q kᵀ·scale + relative position bias + shift mask) v,
    reverse, crop, roll back. Padded tokens are zeros before the qkv linear, so pass the linear's bias as
    ``qkv_bias`` (their q/k/v; zeros if None). ``window_size``/``shift_size`` are used as given: clamp them like
    timm first (``vitkern.reference.swin.clamp_window_and_shift``) when the window may exceed the map, with a table
    for the clamped window (``vitkern.nn.ShiftedWindowAttention`` does both per call: ``window_and_shift_for``,
    ``table_for``).
    ``mask_value`` is added between tokens of different shift regions (Swin's -100, or float('-inf')).
    ``scale`` defaults to head_dim ** -0.5. Gradients flow to qkv, the table and qkv_bias.
    ``pad_first=True`` gives torchvision's and HF's order instead: pad, then roll the padded map (they differ from
    timm only when the map is padded and shifted).
    """
    qkv, relative_position_bias_table, qkv_bias = cast_inputs(qkv, relative_position_bias_table, qkv_bias)
    window, shift, scale = _validate(qkv, relative_position_bias_table, num_heads, window_size, shift_size,
                                     qkv_bias, scale, mask_value)
    if qkv.shape[1] % window[0] == 0 and qkv.shape[2] % window[1] == 0:
        qkv_bias = None  # no padded tokens: the bias is not an input of this op (its gradient comes via the linear)
    bias = qkv_bias.contiguous() if qkv_bias is not None else None
    out, _ = wa_op.window_attention_fwd(qkv.contiguous(), bias, relative_position_bias_table.contiguous(),
                                                    num_heads, list(window), list(shift), scale, float(mask_value),
                                                    bool(pad_first))
    return out


window_attention.__vitkern_op__ = wa_op.OP  # type: ignore[attr-defined]


def _describe(qkv, relative_position_bias_table, num_heads, window_size, shift_size=0, qkv_bias=None, scale=None,
              mask_value=SWIN_MASK_VALUE, pad_first=False) -> dispatch.Problem:
    window, shift, _ = _validate(qkv, relative_position_bias_table, num_heads, window_size, shift_size, qkv_bias,
                                 scale, mask_value)
    return wa_op.problem(dispatch.FORWARD, qkv.contiguous(), relative_position_bias_table.contiguous(), num_heads,
                         window, shift)


dispatch.register_describer(wa_op.OP, _describe)
