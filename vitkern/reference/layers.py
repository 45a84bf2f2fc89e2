"""Building blocks shared by the reference ViT and Swin models.

Everything here is plain, eager PyTorch written for readability: it is the oracle that the fused kernels are
checked against, so attention is spelled out as softmax(Q K^T * scale + bias) V instead of calling
F.scaled_dot_product_attention. Module and parameter names follow timm so that state_dicts load both ways.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

IntOrPair = Union[int, Tuple[int, int]]


def to_2tuple(value: IntOrPair) -> Tuple[int, int]:
    """An int means a square size; a pair is (height, width)."""
    if isinstance(value, (tuple, list)):
        assert len(value) == 2, f'expected an int or a (height, width) pair, got {value}'
        return int(value[0]), int(value[1])
    return int(value), int(value)


def attention_probs(
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) over the key axis.

    q: [..., Nq, D], k: [..., Nk, D], bias broadcastable to [..., Nq, Nk]. Returns [..., Nq, Nk].
    q is scaled before the matmul (as timm's explicit path does) so the rounding matches it closely.
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def attention_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: Optional[float] = None,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Explicit multi-head attention: softmax(q k^T * scale + bias) v.

    q: [..., Nq, D], k/v: [..., Nk, D]; scale defaults to D ** -0.5. Returns [..., Nq, Dv].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attention_probs(q, k, scale, bias) @ v


def split_heads_qkv(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a packed qkv projection [B, N, 3 * heads * D] into q, k, v, each [B, heads, N, D].

    The packed features are laid out as [q | k | v], each of them head-major (timm / original ViT layout).
    """
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, D] -> [B, N, heads * D], heads side by side as the output projection expects."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


def init_linear_weights_(module: nn.Module) -> None:
    """timm's default ViT/Swin init for Linear layers: truncated normal (std .02) weights, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided Conv2d (one conv step per patch).

    Output is [B, N, C] tokens (ViT) or an [B, H', W', C] map (Swin, `output_nhwc=True`), optionally normed.
    """

    def __init__(
            self,
            img_size: IntOrPair = 224,
            patch_size: IntOrPair = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            norm_layer: Optional[type] = None,
            output_nhwc: bool = False,
            strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_nhwc = output_nhwc
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W]
        H, W = x.shape[-2:]
        if self.strict_img_size:
            assert (H, W) == self.img_size, f'input size {(H, W)} does not match the model ({self.img_size})'
        else:
            assert H % self.patch_size[0] == 0 and W % self.patch_size[1] == 0, \
                f'input size {(H, W)} must be a multiple of the patch size {self.patch_size}'
        x = self.proj(x)  # [B, C, H', W']
        x = x.permute(0, 2, 3, 1) if self.output_nhwc else x.flatten(2).transpose(1, 2)  # [B, H', W', C] / [B, N, C]
        return self.norm(x)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU (exact erf form, as timm) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT / DeiT-III); the parameter is `gamma`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Global multi-head self-attention with a packed qkv projection (ViT / DeiT).

    `qkv` packs [q | k | v] along its output features, each split into heads, exactly as timm lays it out.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, 'dim must be divisible by num_heads'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # qk-norm normalises each head's q and k over head_dim (keeps logits bounded in large models)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward_with_probs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the output [B, N, C] and the attention probabilities [B, heads, N, N]."""
        q, k, v = split_heads_qkv(self.qkv(x), self.num_heads)  # each [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        probs = attention_probs(q, k, self.scale)  # [B, heads, N, N]
        return self.proj(merge_heads(probs @ v)), probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_probs(x)[0]


__all__ = [
    'IntOrPair', 'to_2tuple', 'attention_probs', 'attention_reference', 'split_heads_qkv', 'merge_heads',
    'init_linear_weights_',
    'PatchEmbed', 'Mlp', 'LayerScale', 'Attention',
]
