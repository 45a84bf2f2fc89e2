"""A small "CNN + attention" image classifier, as the seed projects build it: a convolutional stem turns the
image into a grid of feature tokens, a few pre-norm transformer blocks built on ``torch.nn.MultiheadAttention``
(batch_first=True) mix them, and a linear head classifies the mean token.

Pure PyTorch, nothing vitkern-specific: ``vitkern.optimize(model)`` swaps its LayerNorms and attention layers.

    image [B, 3, S, S] -> stem (2 strided 3x3 convs) -> [B, dim, S/4, S/4] -> tokens [B, S²/16, dim] + pos
        -> blocks: x = x + attn(norm1(x)); x = x + mlp(norm2(x)) -> norm -> mean over tokens -> head
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['ConvStem', 'AttentionBlock', 'CNNAttentionClassifier']


class ConvStem(nn.Module):
    """Two stride-2 3x3 conv + BatchNorm + GELU stages: [B, C, S, S] -> [B, dim, S/4, S/4]."""

    def __init__(self, in_chans: int = 3, dim: int = 64):
        super().__init__()
        mid = dim // 2
        self.conv1 = nn.Conv2d(in_chans, mid, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(x)))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then an MLP, each with a residual connection."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attn_drop, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim),
                                 nn.Dropout(drop))

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: [B, N, dim]. Returns (x, attention weights [B, heads, N, N] if need_weights else None)."""
        h = self.norm1(x)
        # need_weights=False lets PyTorch (and vitkern) use a fused attention kernel
        h, weights = self.attn(h, h, h, need_weights=need_weights, average_attn_weights=False)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x, weights


class CNNAttentionClassifier(nn.Module):
    """Conv stem -> tokens (+ learned position embedding) -> attention blocks -> LayerNorm -> mean -> head."""

    def __init__(self, img_size: int = 32, in_chans: int = 3, num_classes: int = 10, dim: int = 64, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        if img_size % 4:
            raise ValueError(f'CNNAttentionClassifier: img_size must be a multiple of 4 (the stem downsamples by 4), '
                             f'got {img_size}')
        self.stem = ConvStem(in_chans, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // 4) ** 2, dim) * .02)
        self.blocks = nn.ModuleList([AttentionBlock(dim, num_heads, mlp_ratio, attn_drop, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # [B, dim, h, w] -> [B, h*w, dim]
        x = x + self.pos_embed
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=1))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list:
        """Per-block attention weights [B, heads, N, N] for plotting (runs PyTorch's non-fused attention path)."""
        x = self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed
        maps = []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            maps.append(weights)
        return maps
