"""Reference Vision Transformer (ViT) and distilled DeiT, state_dict-compatible with timm.

Inference oracle: no dropout / stochastic depth, so train() and eval() compute the same thing (except for the
distilled head, whose training output timm defines differently).
"""
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .layers import Attention, IntOrPair, LayerScale, Mlp, PatchEmbed, init_linear_weights_

# ViT / DeiT use eps 1e-6 (the JAX original); torch's default 1e-5 would not match timm's numerics.
ViTLayerNorm = partial(nn.LayerNorm, eps=1e-6)

ModelOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            init_values: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.norm1 = ViTLayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_eps=1e-6)
        # layer scale only exists when init_values is set (timm: falsy init_values -> Identity, no `gamma` key)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = ViTLayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward_with_probs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # x: [B, N, C] -> ([B, N, C], attention probabilities [B, heads, N, N])
        attn_out, probs = self.attn.forward_with_probs(self.norm1(x))
        x = x + self.ls1(attn_out)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # through the submodules' __call__, as timm does: hooks fire and swapped-in modules are used
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT: patch embed -> [prefix tokens] + position embedding -> pre-norm blocks -> norm -> pool -> head.

    Prefix tokens are, in order, the class token (`cls_token`) and `reg_tokens` register tokens (`reg_token`).
    """

    def __init__(
            self,
            img_size: IntOrPair = 224,
            patch_size: IntOrPair = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            init_values: Optional[float] = None,
            class_token: bool = True,
            reg_tokens: int = 0,
            no_embed_class: bool = False,
            fc_norm: Optional[bool] = None,
    ) -> None:
        super().__init__()
        assert global_pool in ('', 'token', 'avg'), f'unsupported global_pool {global_pool!r}'
        assert class_token or global_pool != 'token', "global_pool='token' needs the class token"
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        # no_embed_class (DeiT-III, big_vision): the position embedding covers the patches only
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))

        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, init_values=init_values)
            for _ in range(depth)])
        # average pooling normalises after pooling (`fc_norm`) instead of before (`norm`), as timm does
        use_fc_norm = global_pool == 'avg' if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else ViTLayerNorm(embed_dim)
        self.fc_norm = ViTLayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm-style init: small position embedding and tokens, truncated-normal linears."""
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        init_linear_weights_(self)

    def prefix_tokens(self, batch_size: int) -> List[torch.Tensor]:
        """The learned tokens put in front of the patch tokens, each [B, n, C]."""
        tokens = [self.cls_token, self.reg_token]
        return [t.expand(batch_size, -1, -1) for t in tokens if t is not None]

    def add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, num_patches, C] -> [B, prefix + num_patches, C]
        prefix = self.prefix_tokens(x.shape[0])
        if self.no_embed_class:
            # the prefix tokens get no position: add to the patches, then prepend
            return torch.cat(prefix + [x + self.pos_embed], dim=1)
        # original ViT / DeiT: prepend, then add (pos_embed has one entry per prefix token too)
        return torch.cat(prefix + [x], dim=1) + self.pos_embed

    def forward_features(
            self,
            x: torch.Tensor,
            attn_maps: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """x: [B, C_in, H, W] -> normed tokens [B, prefix + N, C].

        If `attn_maps` is a list, each block appends its attention probabilities [B, heads, N, N] to it.
        """
        x = self.add_pos_embed(self.patch_embed(x))
        for block in self.blocks:
            if attn_maps is None:
                x = block(x)
            else:
                x, probs = block.forward_with_probs(x)
                attn_maps.append(probs)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, prefix + N, C] -> [B, C] ([B, prefix + N, C] when global_pool == '')
        if self.global_pool == 'token':
            return x[:, 0]
        if self.global_pool == 'avg':
            return x[:, self.num_prefix_tokens:].mean(dim=1)  # average over patch tokens only
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> ModelOutput:
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(
            self,
            x: torch.Tensor,
            return_attn: bool = False,
    ) -> Union[ModelOutput, Tuple[ModelOutput, List[torch.Tensor]]]:
        """x: [B, C_in, H, W] -> logits [B, num_classes] (features [B, C] if num_classes == 0).

        With return_attn=True returns (output, [attention probabilities per block, each [B, heads, N, N]]).
        """
        attn_maps: Optional[List[torch.Tensor]] = [] if return_attn else None
        out = self.forward_head(self.forward_features(x, attn_maps))
        return (out, attn_maps) if return_attn else out


class VisionTransformerDistilled(VisionTransformer):
    """DeiT with a distillation token (`dist_token`, right after the class token) and its own head (`head_dist`).

    Output, as timm's VisionTransformerDistilled: the mean of the two heads, except in training mode with
    `distilled_training` set, where both logits are returned as (class_logits, distillation_logits).
    """

    def __init__(self, **kwargs) -> None:
        assert kwargs.get('global_pool', 'token') == 'token', 'the distilled head reads the class and dist tokens'
        assert kwargs.get('class_token', True) and not kwargs.get('reg_tokens', 0), \
            'DeiT distilled has exactly two prefix tokens: class and distillation'
        assert not kwargs.get('no_embed_class', False), 'timm sizes the distilled pos_embed for the prefix tokens'
        super().__init__(**kwargs)
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        # timm always sizes this for both prefix tokens (no_embed_class does not shrink it)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, self.embed_dim))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, 'dist_token'):  # the base __init__ calls this before dist_token exists
            nn.init.trunc_normal_(self.dist_token, std=.02)

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def prefix_tokens(self, batch_size: int) -> List[torch.Tensor]:
        return [t.expand(batch_size, -1, -1) for t in (self.cls_token, self.dist_token)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> ModelOutput:
        # x: [B, 2 + N, C]; token 0 feeds `head`, token 1 feeds `head_dist`
        x_cls, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x_cls + x_dist) / 2
        x_cls, x_dist = self.head(x_cls), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return x_cls, x_dist
        return (x_cls + x_dist) / 2


__all__ = ['Block', 'VisionTransformer', 'VisionTransformerDistilled']
