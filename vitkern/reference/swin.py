"""Reference Swin Transformer V1, state_dict-compatible with timm 1.0.x.

The window helpers are plain functions so kernel tests can use them as oracles. Numerics follow timm exactly,
including its quirks (see SwinTransformerBlock): roll *before* padding, zero-padded tokens that are not masked
out, and the window clamped / shift dropped when a window covers the whole feature map.
Inference oracle: no dropout / stochastic depth.
"""
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import IntOrPair, Mlp, PatchEmbed, attention_reference, init_linear_weights_, merge_heads, \
    split_heads_qkv, to_2tuple

Size2 = Tuple[int, int]

# Swin keeps torch's default LayerNorm eps (1e-5), unlike ViT's 1e-6.
SwinLayerNorm = nn.LayerNorm

MASKED = -100.0  # the original Swin's additive mask value: exp(-100) is 0 in fp32, and -100 is safe in fp16


# ---------------------------------------------------------------------------------------------------------------
# Window helpers (oracles for the kernels)
# ---------------------------------------------------------------------------------------------------------------

def window_partition(x: torch.Tensor, window_size: IntOrPair) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, wh, ww, C], windows in row-major order within each image.

    H and W must be multiples of the window (callers pad first).
    """
    wh, ww = to_2tuple(window_size)
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


def window_reverse(windows: torch.Tensor, window_size: IntOrPair, H: int, W: int) -> torch.Tensor:
    """Inverse of window_partition: [B * nW, wh, ww, C] -> [B, H, W, C]."""
    wh, ww = to_2tuple(window_size)
    C = windows.shape[-1]
    x = windows.reshape(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: IntOrPair, device: Optional[torch.device] = None) -> torch.Tensor:
    """[N, N] long index into the [(2wh-1)(2ww-1), heads] bias table, N = wh * ww (non-square windows allowed).

    Entry (i, j) encodes the offset (dy, dx) = pos(i) - pos(j), shifted to be >= 0 and flattened row-major.
    """
    wh, ww = to_2tuple(window_size)
    coords = torch.stack(torch.meshgrid(
        torch.arange(wh, device=device), torch.arange(ww, device=device), indexing='ij')).flatten(1)  # [2, N]
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]: (dy, dx) in [-(w-1), w-1]
    dy, dx = offsets[..., 0] + wh - 1, offsets[..., 1] + ww - 1
    return dy * (2 * ww - 1) + dx


def relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the learned bias: table [(2wh-1)(2ww-1), heads], index [N, N] -> bias [heads, N, N]."""
    N = index.shape[0]
    return table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()


def shifted_window_mask(
        H: int,
        W: int,
        window_size: IntOrPair,
        shift_size: IntOrPair,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask [nW, N, N] for shifted windows: 0 within a region, -100 across regions.

    After the cyclic roll, a window at the bottom/right edge holds tokens that were not neighbours in the image;
    each axis is cut into the regions [0, L-w), [L-w, L-s), [L-s, L) and only tokens of one region may attend
    to each other. H and W are rounded up to the window like the padded map (timm computes the regions on the
    padded size, with the padding at the end). A zero shift gives an all-zero mask.
    """
    (wh, ww), (sh, sw) = to_2tuple(window_size), to_2tuple(shift_size)
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww

    def region_ids(length: int, window: int, shift: int) -> torch.Tensor:
        ids = torch.zeros(length, device=device)
        ids[length - window:] = 1
        ids[length - shift:] = 2  # empty slice for a zero shift: then there are only two regions
        return ids

    # one label per (row region, column region) pair
    labels = region_ids(Hp, wh, sh)[:, None] * 3 + region_ids(Wp, ww, sw)[None, :]  # [Hp, Wp]
    labels = window_partition(labels[None, :, :, None], (wh, ww)).reshape(-1, wh * ww)  # [nW, N]
    different = labels[:, None, :] != labels[:, :, None]  # [nW, N, N]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, MASKED)


def window_attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_pos_bias: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
) -> torch.Tensor:
    """Windowed attention softmax(q k^T * scale + rel_pos_bias + mask) v.

    q, k, v: [B * nW, heads, N, D] (windows of one image contiguous, as window_partition makes them),
    rel_pos_bias: [heads, N, N], mask: [nW, N, N] or None. Returns [B * nW, heads, N, D].
    """
    if mask is None:
        return attention_reference(q, k, v, scale, rel_pos_bias)
    num_windows = mask.shape[0]
    per_window = [t.view(-1, num_windows, *t.shape[1:]) for t in (q, k, v)]  # [B, nW, heads, N, D]
    bias = rel_pos_bias + mask.unsqueeze(1)  # [nW, heads, N, N]; mask entries are 0 or -100, so exact enough
    return attention_reference(*per_window, scale, bias).flatten(0, 1)


def clamp_window_and_shift(
        resolution: Size2,
        window_size: Size2,
        shift_size: Size2,
        always_partition: bool = False,
) -> Tuple[Size2, Size2]:
    """timm's _calc_window_shift: per axis, a window >= the feature map shrinks to it and is not shifted."""
    if always_partition:
        return window_size, shift_size
    window = tuple(min(r, w) for r, w in zip(resolution, window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, window, shift_size))
    return window, shift


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------

class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias per head."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: IntOrPair = 7,
            head_dim: Optional[int] = None,
            qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.window_size = wh, ww = to_2tuple(window_size)
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        # derived from the window size, so timm does not save it (non-persistent)
        self.register_buffer('relative_position_index', relative_position_index((wh, ww)), persistent=False)
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [B * nW, N, C], mask: [nW, N, N] or None -> [B * nW, N, C]
        q, k, v = split_heads_qkv(self.qkv(x), self.num_heads)  # each [B * nW, heads, N, head_dim]
        bias = relative_position_bias(self.relative_position_bias_table, self.relative_position_index)
        return self.proj(merge_heads(window_attention_reference(q, k, v, bias, mask, self.scale)))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention block on an [B, H, W, C] map, pre-norm like ViT.

    Matching timm, in this order: norm1 -> cyclic roll by -shift -> zero-pad bottom/right to a window multiple
    -> window attention -> crop -> roll back. The padded tokens are zeros *after* norm1, so their keys and values
    are the qkv bias: they are attended to (not masked). The mask regions are laid out on the padded map, so with
    padding they do not line up with the wrap-around seam of the roll (e.g. H=11, window 4, shift 2: image rows
    10 and 0 share a region and attend to each other). That is timm's behaviour and the oracle keeps it.
    """

    def __init__(
            self,
            dim: int,
            input_resolution: Size2,
            num_heads: int,
            head_dim: Optional[int] = None,
            window_size: IntOrPair = 7,
            shift_size: IntOrPair = 0,
            always_partition: bool = False,
            dynamic_mask: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.window_size, self.shift_size = clamp_window_and_shift(
            self.input_resolution, to_2tuple(window_size), to_2tuple(shift_size), always_partition)
        self.dynamic_mask = dynamic_mask
        self.norm1 = SwinLayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, head_dim=head_dim, qkv_bias=qkv_bias)
        self.norm2 = SwinLayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # fixed input size: build the mask once; dynamic size: build it per forward from the actual map
        mask = None
        if any(self.shift_size) and not dynamic_mask:
            mask = shifted_window_mask(*self.input_resolution, self.window_size, self.shift_size)
        self.register_buffer('attn_mask', mask, persistent=False)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        # x: normed [B, H, W, C] -> attention output [B, H, W, C]
        B, H, W, C = x.shape
        (wh, ww), shift = self.window_size, self.shift_size
        has_shift = any(shift)
        if has_shift:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zeros at the bottom / right, after the roll
        Hp, Wp = H + pad_h, W + pad_w

        mask = self.attn_mask
        if has_shift and self.dynamic_mask:
            mask = shifted_window_mask(H, W, self.window_size, shift, device=x.device, dtype=x.dtype)
        windows = window_partition(x, (wh, ww)).reshape(-1, wh * ww, C)  # [B * nW, N, C]
        windows = self.attn(windows, mask=mask)
        x = window_reverse(windows.view(-1, wh, ww, C), (wh, ww), Hp, Wp)[:, :H, :W]  # crop the padding
        if has_shift:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, W, C]
        x = x + self.window_attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x downsampling: concatenate each 2x2 neighbourhood (4C channels), norm, project to out_dim (no bias)."""

    def __init__(self, dim: int, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.norm = SwinLayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_dim]; odd sizes are zero-padded at the bottom/right
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = x.shape[1:3]
        # channel order of the 2x2 group is (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1):
        # the original Swin's cat(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2])
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    """Optional PatchMerging (`downsample`, at the *start* of every stage but the first, as timm 1.0 does),
    then `depth` blocks alternating plain and shifted windows.

    `block_kwargs` (head_dim, always_partition, dynamic_mask, mlp_ratio, qkv_bias) go to every block.
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            input_resolution: Size2,
            depth: int,
            downsample: bool,
            num_heads: int,
            window_size: IntOrPair = 7,
            **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.output_resolution = tuple((r + 1) // 2 for r in input_resolution) if downsample else input_resolution
        assert downsample or dim == out_dim
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        window = to_2tuple(window_size)
        shift = (window[0] // 2, window[1] // 2)  # from the requested window; each block clamps both
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, self.output_resolution, num_heads, window_size=window,
                                 shift_size=shift if i % 2 else 0, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))  # [B, H, W, C] -> [B, H', W', C']


class ClassifierHead(nn.Module):
    """Global average pool over H, W of an NHWC map, then `fc` (timm's ClassifierHead; only `fc` has weights)."""

    def __init__(self, in_features: int, num_classes: int, pool_type: str = 'avg') -> None:
        super().__init__()
        assert pool_type in ('avg', ''), f'unsupported global_pool {pool_type!r}'
        self.pool_type = pool_type
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # x: [B, H, W, C] -> [B, num_classes] (or [B, H, W, num_classes] without pooling)
        if self.pool_type == 'avg':
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """Swin V1: conv patch embed (+norm, NHWC) -> stages `layers.{i}` of window blocks -> norm -> head."""

    def __init__(
            self,
            img_size: IntOrPair = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            head_dim: Optional[int] = None,
            window_size: IntOrPair = 7,
            always_partition: bool = False,
            strict_img_size: bool = True,
            dynamic_img_size: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        assert len(depths) == len(num_heads)
        strict_img_size = strict_img_size and not dynamic_img_size  # timm treats the two as synonyms
        self.num_classes = num_classes
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.num_features = dims[-1]

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, norm_layer=SwinLayerNorm, output_nhwc=True,
            strict_img_size=strict_img_size)
        block_kwargs = dict(head_dim=head_dim, always_partition=always_partition, dynamic_mask=not strict_img_size,
                            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        stages, resolution, in_dim = [], self.patch_embed.grid_size, embed_dim
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stage = SwinTransformerStage(
                in_dim, dims[i], resolution, depth, downsample=i > 0, num_heads=heads, window_size=window_size,
                **block_kwargs)
            stages.append(stage)
            resolution, in_dim = stage.output_resolution, dims[i]
        self.layers = nn.Sequential(*stages)
        self.norm = SwinLayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_linear_weights_(self)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W] -> normed map [B, H / (patch * 2^(stages-1)), ..., C_last] (NHWC)
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


__all__ = [
    'window_partition', 'window_reverse', 'relative_position_index', 'relative_position_bias',
    'shifted_window_mask', 'window_attention_reference', 'clamp_window_and_shift',
    'WindowAttention', 'SwinTransformerBlock', 'PatchMerging', 'SwinTransformerStage', 'ClassifierHead',
    'SwinTransformer',
]
