"""Swin window-attention modules with timm's parameter names and state_dict keys.

- :class:`WindowAttention`: drop-in for timm's ``WindowAttention`` (input already partitioned, [B·nW, N, C]).
- :class:`ShiftedWindowAttention`: the fused module for a Swin block, [B, H, W, C] -> [B, H, W, C]; replaces
  timm's ``SwinTransformerBlock._attn`` (pad + roll + partition + attn + reverse + unroll + crop) with one kernel
  between the qkv and proj linears.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from vitkern.functional.window_attention import SWIN_MASK_VALUE, window_attention
from vitkern.nn._hooks import share_hooks
from vitkern.nn.attention_maps import RecordsAttentionMaps
from vitkern.reference import swin as ref_swin
from vitkern.reference.layers import attention_probs, merge_heads, split_heads_qkv

__all__ = ["WindowAttention", "ShiftedWindowAttention"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class _WindowAttentionBase(nn.Module):
    """timm's parameters: ``qkv``, ``proj``, ``relative_position_bias_table`` and the ``relative_position_index``
    buffer (non-persistent, as in timm; the kernel computes the same index arithmetically)."""

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int], window_size, qkv_bias: bool,
                 attn_drop: float, proj_drop: float, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = wh, ww = _pair(window_size)
        self.window_area = wh * ww
        head_dim = head_dim or dim // num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads, **kw))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index",
                             ref_swin.relative_position_index((wh, ww), device=device), persistent=False)
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias, **kw)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim, dim, **kw)
        self.proj_drop = nn.Dropout(proj_drop)

    def _share(self, attn: nn.Module) -> None:
        """Take ``attn``'s parameters (timm WindowAttention or another of ours) by reference: no copy."""
        self.qkv, self.proj = attn.qkv, attn.proj
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.attn_drop = getattr(attn, "attn_drop", None) or nn.Dropout(0.0)  # the reference has no dropout
        self.proj_drop = getattr(attn, "proj_drop", None) or nn.Dropout(0.0)
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.scale = attn.scale
        self.train(attn.training)


class WindowAttention(RecordsAttentionMaps, _WindowAttentionBase):
    """Drop-in for ``timm.models.swin_transformer.WindowAttention``: same constructor, names and state_dict.

    ``forward(x [B·nW, N, C], mask [nW, N, N] or None)``. Without a mask the fused kernel runs (each window is an
    image of one window, no padding, no shift). A mask tensor is an arbitrary additive mask the kernel cannot
    derive from geometry, so that call runs the plain PyTorch path; use :class:`ShiftedWindowAttention` to get the
    shift mask computed in-kernel.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size=7,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__(dim, num_heads, head_dim, window_size, qkv_bias, attn_drop, proj_drop, device, dtype)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.window_size[0] * self.window_size[1]:
            raise ValueError(f"{type(self).__name__}: x has shape {tuple(x.shape)}; expected [B·num_windows, "
                             f"{self.window_size[0] * self.window_size[1]}, C] (the tokens of one "
                             f"{self.window_size[0]}x{self.window_size[1]} window per row)")
        bw, n, _ = x.shape
        if mask is not None or (self.training and self.attn_drop.p > 0) or self._vitkern_attn_maps is not None:
            return self.proj_drop(self.proj(self._eager(x, mask)))
        wh, ww = self.window_size
        qkv = self.qkv(x).view(bw, wh, ww, -1)
        out = window_attention(qkv, self.relative_position_bias_table, self.num_heads, (wh, ww), 0, scale=self.scale)
        return self.proj_drop(self.proj(out.view(bw, n, -1)))

    def _eager(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        bw, n, _ = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + ref_swin.relative_position_bias(self.relative_position_bias_table,
                                                      self.relative_position_index).to(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.num_heads, n, n) + mask.to(attn.dtype)[None, :, None]).view(bw, -1, n, n)
        attn = attn.softmax(-1)
        if self._vitkern_attn_maps is not None:
            self._vitkern_attn_maps.append(attn)
        attn = self.attn_drop(attn)
        return (attn @ v).transpose(1, 2).reshape(bw, n, -1)

    @classmethod
    def from_timm(cls, attn: nn.Module) -> "WindowAttention":
        """Shares ``attn``'s parameters (timm WindowAttention)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.num_heads = attn.qkv.in_features, attn.num_heads
        new.window_size = tuple(attn.window_size)
        new.window_area = new.window_size[0] * new.window_size[1]
        new._share(attn)
        return share_hooks(attn, new)  # the same calls as timm's ([B·nW, N, C], mask)


class ShiftedWindowAttention(RecordsAttentionMaps, _WindowAttentionBase):
    """Fused (shifted-)window attention on a [B, H, W, C] map, owning timm's ``qkv``/``proj``/bias table.

    ``forward(x)`` equals timm's ``SwinTransformerBlock._attn(x)`` (x already normed): timm's roll-then-pad order,
    padded tokens attended with q/k/v = the qkv bias, shift-mask regions laid out on the padded size,
    ``mask_value`` (-100 as Swin, or float('-inf')) across regions.

    Window and shift per call (:meth:`window_and_shift_for`), as timm's block built for that map would use them
    (``_calc_window_shift``): on an axis where the map is no larger than the window, the window shrinks to the map
    and is not shifted; its bias table is the slice of ours for the offsets it has (timm's block would own a table
    of that size). So ``ShiftedWindowAttention(window_size=7, shift_size=3)`` on a 7x7 map runs one unshifted 7x7
    window, on a 5x4 map one unshifted 5x4 window. ``always_partition=True`` (timm's flag) uses the window and shift
    as given on every map instead: padded up to the window, and rolled. :meth:`from_timm_block` takes the block's
    own (already clamped) window and shift as given, as its ``_attn`` uses them whatever the map size.
    ``pad_first=True`` (torchvision's order, :meth:`from_torchvision`) follows torchvision's rule: the window is
    kept and the shift dropped on an axis the window covers.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size=7, shift_size=0,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 mask_value: float = SWIN_MASK_VALUE, pad_first: bool = False, always_partition: bool = False,
                 device=None, dtype=None):
        super().__init__(dim, num_heads, head_dim, window_size, qkv_bias, attn_drop, proj_drop, device, dtype)
        self.shift_size = _pair(shift_size)
        self.mask_value = mask_value
        self.pad_first = pad_first
        self.always_partition = always_partition

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.attend(self.qkv(x)))

    def window_and_shift_for(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (window, shift) applied to an [height, width] map (see the class docstring)."""
        if self.pad_first:  # torchvision: the window stays (the map is padded up to it), the shift goes
            return self.window_size, tuple(0 if length <= w else s  # type: ignore[return-value]
                                           for length, w, s in zip((height, width), self.window_size, self.shift_size))
        if self.always_partition:
            return self.window_size, self.shift_size
        return ref_swin.clamp_window_and_shift((height, width), self.window_size, self.shift_size)

    def table_for(self, window: tuple[int, int]) -> Tensor:
        """The bias table of ``window`` (ours, or a window clamped to the map): our entries for the offsets it has
        (row dy + wh - 1, column dx + ww - 1 of the [2wh-1, 2ww-1] grid), in its own row-major order."""
        (wh, ww), (h, w) = self.window_size, window
        if (h, w) == (wh, ww):
            return self.relative_position_bias_table
        grid = self.relative_position_bias_table.view(2 * wh - 1, 2 * ww - 1, -1)
        return grid[wh - h:wh + h - 1, ww - w:ww + w - 1].reshape((2 * h - 1) * (2 * w - 1), -1)

    def attend(self, qkv: Tensor) -> Tensor:
        """Window attention on the qkv output [B, H, W, 3·C'] -> [B, H, W, C'] before ``proj``; fused blocks call
        this after their own (LayerNorm-fused) qkv GEMM."""
        window, shift = self.window_and_shift_for(qkv.shape[1], qkv.shape[2])
        if self._vitkern_attn_maps is not None or (self.training and self.attn_drop.p > 0):
            # recording maps, or attention dropout (the kernel has none): the same attention spelled out
            return self._eager_attend(qkv, window, shift)
        return window_attention(qkv, self.table_for(window), self.num_heads, window, shift, qkv_bias=self.qkv.bias,
                                scale=self.scale, mask_value=self.mask_value, pad_first=self.pad_first)

    def project(self, o: Tensor) -> Tensor:
        return self.proj_drop(self.proj(o))

    def _eager_attend(self, qkv: Tensor, window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
        """The same attention spelled out in PyTorch, recording the probabilities [B·nW, heads, N, N]."""
        B, H, W, C3 = qkv.shape
        (wh, ww), n = window, window[0] * window[1]
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        roll = any(shift)

        def pad(t: Tensor) -> Tensor:  # padded tokens are zero *inputs*, so their q/k/v is the qkv bias
            out = t.new_zeros(B, Hp, Wp, C3) if self.qkv.bias is None else self.qkv.bias.to(t.dtype).expand(
                B, Hp, Wp, C3).clone()
            out[:, :H, :W] = t
            return out

        t = qkv
        if self.pad_first:
            t = pad(t)
        if roll:
            t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        if not self.pad_first:
            t = pad(t)
        q, k, v = split_heads_qkv(ref_swin.window_partition(t, (wh, ww)).reshape(-1, n, C3), self.num_heads)
        # our index buffer (torchvision's flat one after from_torchvision) for our window, else computed
        index = (self.relative_position_index.view(n, n) if window == self.window_size
                 else ref_swin.relative_position_index(window, device=q.device))
        bias = ref_swin.relative_position_bias(self.table_for(window), index).to(q.dtype)  # [heads, N, N]
        if roll:
            regions = ref_swin.shifted_window_mask(H, W, (wh, ww), shift, device=q.device) != 0  # [nW, N, N]
            mask = torch.zeros(regions.shape, device=q.device, dtype=q.dtype).masked_fill(regions, self.mask_value)
            bias = (bias + mask[:, None]).repeat(B, 1, 1, 1)  # [B·nW, heads, N, N], windows of an image in a row
        probs = (self._record_probs(q, k, self.scale, bias) if self._vitkern_attn_maps is not None
                 else attention_probs(q, k, self.scale, bias))
        o = merge_heads(self.attn_drop(probs) @ v)  # [B·nW, N, C']; dropout as timm's (identity in eval)
        o = ref_swin.window_reverse(o.view(-1, wh, ww, o.shape[-1]), (wh, ww), Hp, Wp)
        if not self.pad_first:  # undo in reverse order: timm crops, then rolls back; torchvision the other way
            o = o[:, :H, :W]
        if roll:
            o = torch.roll(o, shifts=shift, dims=(1, 2))
        return o[:, :H, :W]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, mask_value={self.mask_value}, pad_first={self.pad_first}, "
                f"always_partition={self.always_partition}")

    @classmethod
    def from_timm(cls, attn: nn.Module, window_size, shift_size=0,
                  mask_value: float = SWIN_MASK_VALUE) -> "ShiftedWindowAttention":
        """Shares the parameters of a timm (or vitkern.reference) ``WindowAttention``; ``window_size``/``shift_size``
        as its block clamped them, used as given on every map (``always_partition``) as the block's ``_attn`` does."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.num_heads = attn.qkv.in_features, attn.num_heads
        new.window_size, new.shift_size = _pair(window_size), _pair(shift_size)
        if new.window_size != tuple(attn.window_size):
            raise ValueError(f"ShiftedWindowAttention.from_timm: window_size {new.window_size} differs from the "
                             f"attention's {tuple(attn.window_size)} (its bias table is sized for that window)")
        new.window_area = new.window_size[0] * new.window_size[1]
        new.mask_value, new.pad_first, new.always_partition = mask_value, False, True
        new._share(attn)
        return new

    @classmethod
    def from_timm_block(cls, block: nn.Module, mask_value: float = SWIN_MASK_VALUE) -> "ShiftedWindowAttention":
        """For a timm (or vitkern.reference) ``SwinTransformerBlock``: replaces ``block._attn`` (its clamped window
        and shift, ``block.attn``'s parameters shared)."""
        return cls.from_timm(block.attn, block.window_size, block.shift_size, mask_value)

    @classmethod
    def from_torchvision(cls, attn: nn.Module, mask_value: float = SWIN_MASK_VALUE) -> "ShiftedWindowAttention":
        """For torchvision's ``ShiftedWindowAttention`` (Swin V1; same names, parameters shared): its pad-then-roll
        order, and no shift on an axis whose padded size is one window, as torchvision decides per call."""
        if not hasattr(attn, "relative_position_bias_table") or hasattr(attn, "logit_scale"):
            raise TypeError("ShiftedWindowAttention.from_torchvision: expected a Swin V1 ShiftedWindowAttention "
                            f"(V2's cosine attention is not supported), got {type(attn).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.num_heads = attn.qkv.in_features, attn.num_heads
        new.window_size, new.shift_size = _pair(list(attn.window_size)), _pair(list(attn.shift_size))
        new.window_area = new.window_size[0] * new.window_size[1]
        new.mask_value, new.pad_first, new.always_partition = mask_value, True, False  # torchvision's own rule
        new.qkv, new.proj = attn.qkv, attn.proj
        new.relative_position_bias_table = attn.relative_position_bias_table
        new.attn_drop, new.proj_drop = nn.Dropout(attn.attention_dropout), nn.Dropout(attn.dropout)
        # torchvision saves its flat [N·N] index (persistent): keep that very tensor so the state_dict is unchanged
        new.register_buffer("relative_position_index", attn.relative_position_index, persistent=True)
        new.scale = (new.qkv.out_features // (3 * new.num_heads)) ** -0.5
        new.train(attn.training)
        return share_hooks(attn, new)  # torchvision's module is called on the map [B, H, W, C] too
