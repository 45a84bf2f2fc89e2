"""``vitkern.nn.Attention``: drop-in for timm's ``timm.models.vision_transformer.Attention`` (timm 1.0.31).

Same constructor arguments, submodules (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``,
``proj``, ``proj_drop``) and state_dict keys; the attention itself runs ``vitkern.functional.attention``:

- no qk_norm: the kernel reads q/k/v straight from the packed qkv output and writes [B, N, H·D] for ``proj``;
- qk_norm: q and k are normalised first on their [B, N, H, D] views (a ``torch.nn.LayerNorm`` norm is swapped
  for ``vitkern.nn.LayerNorm`` sharing its parameters), then the kernel runs on separate q/k/v in the "bnhd"
  layout (v is still a strided view of the packed output);
- attention dropout in training (``attn_drop.p > 0``): the eager reference path (``vitkern.explain`` says why);
- ``attn_mask`` / ``is_causal`` (not fused): ``F.scaled_dot_product_attention`` exactly as timm calls it.

Differences from timm: ``norm_layer=None`` with ``qk_norm`` / ``scale_norm`` uses ``vitkern.nn.LayerNorm``
(eps 1e-6, timm's ViT choice) where timm raises.
"""

from __future__ import annotations

import functools
from typing import Optional, Type

import torch.nn.functional as F
from torch import Tensor, nn

from vitkern.functional.attention import attention
from vitkern.nn._hooks import must_call, share_hooks
from vitkern.nn.attention_maps import RecordsAttentionMaps
from vitkern.nn.layer_norm import LayerNorm

__all__ = ["Attention"]


def _vitkern_norm(module: nn.Module) -> nn.Module:
    """A plain ``torch.nn.LayerNorm`` becomes a vitkern LayerNorm sharing its parameters; anything else is kept."""
    return LayerNorm.from_torch(module) if type(module) is nn.LayerNorm else module


class Attention(RecordsAttentionMaps, nn.Module):
    """Multi-head self-attention with a packed qkv projection; see the module docstring."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_head_dim: Optional[int] = None,
            dim_out: Optional[int] = None,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            gated: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"vitkern.nn.Attention: dim {dim} must be divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        if norm_layer is None:
            norm_layer = functools.partial(LayerNorm, eps=1e-6)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True  # timm reads this flag; the fused path is always taken

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = _vitkern_norm(norm_layer(head_dim, **dd)) if qk_norm else nn.Identity()
        self.k_norm = _vitkern_norm(norm_layer(head_dim, **dd)) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = _vitkern_norm(norm_layer(self.attn_dim, **dd)) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def has_qk_norm(self) -> bool:
        return not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self.project(self.attend(self.qkv(x), x, attn_mask, is_causal))

    def attend(self, qkv: Tensor, x: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
               is_causal: bool = False) -> Tensor:
        """Attention on the packed ``qkv`` output [B, N, 3·H·D] -> [B, N, H·D], before ``norm``/``gate``/``proj``
        (``x``, the block input, is needed only with ``gated``). Fused blocks call this after their own qkv GEMM."""
        B, N, _ = qkv.shape
        dropout_p = self.attn_drop.p if self.training else 0.0
        # a hook on q_norm / k_norm (Identity ones too) sees timm's [B, H, N, D] calls: the unfused layout
        if (attn_mask is not None or is_causal or self._vitkern_attn_maps is not None
                or must_call(self.q_norm, self.k_norm)):
            q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if self._vitkern_attn_maps is not None and attn_mask is None and not is_causal:
                o = self.attn_drop(self._record_probs(q, k, self.scale)) @ v
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                   is_causal=is_causal)
            o = o.transpose(1, 2).reshape(B, N, self.attn_dim)
        elif self.has_qk_norm:
            heads = qkv.view(B, N, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, D]
            q, k, v = self.q_norm(heads[:, :, 0]), self.k_norm(heads[:, :, 1]), heads[:, :, 2]
            o = attention(q, k, v, layout="bnhd", scale=self.scale, dropout_p=dropout_p).reshape(B, N, self.attn_dim)
        else:
            o = attention(qkv=qkv, num_heads=self.num_heads, scale=self.scale, dropout_p=dropout_p)
        o = self.norm(o)
        if self.gate is not None:
            if x is None:
                raise ValueError("vitkern.nn.Attention.attend: a gated attention needs x (the block input)")
            o = o * self.gate(x).sigmoid()
        return o

    def project(self, o: Tensor) -> Tensor:
        """The output projection (+ dropout) on attend()'s [B, N, H·D]."""
        return self.proj_drop(self.proj(o))

    @staticmethod
    def accepts_timm(module: nn.Module) -> bool | str:
        """For a swap rule: True for timm's ``Attention`` itself, a reason for subclasses, False otherwise."""
        try:
            from timm.models.vision_transformer import Attention as TimmAttention
        except ImportError:  # timm is optional
            return False
        if not isinstance(module, TimmAttention) or isinstance(module, Attention):
            return False
        if type(module).forward is not TimmAttention.forward:
            return f"{type(module).__qualname__} overrides forward()"
        return True

    @classmethod
    def from_timm(cls, module: nn.Module) -> "Attention":
        """A vitkern Attention sharing ``module``'s submodules and parameters (no copy).

        ``module`` is timm's ``Attention`` (or ``vitkern.reference.layers.Attention``, which has the same names);
        torch LayerNorms used as q/k norms are wrapped by vitkern's, sharing their parameters.
        """
        for name in ("qkv", "proj", "num_heads"):
            if not hasattr(module, name):
                raise TypeError(f"vitkern.nn.Attention.from_timm: {type(module).__name__} has no {name!r}; "
                                "expected a timm-style Attention with packed qkv")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = module.num_heads
        new.attn_dim = module.qkv.out_features // 3
        new.head_dim = getattr(module, "head_dim", new.attn_dim // new.num_heads)
        new.scale = getattr(module, "scale", new.head_dim ** -0.5)
        new.fused_attn = True
        new.qkv = module.qkv
        new.q_norm = _vitkern_norm(getattr(module, "q_norm", nn.Identity()))
        new.k_norm = _vitkern_norm(getattr(module, "k_norm", nn.Identity()))
        new.attn_drop = getattr(module, "attn_drop", nn.Dropout(0.0))
        new.norm = _vitkern_norm(getattr(module, "norm", nn.Identity()))
        new.gate = getattr(module, "gate", None)
        new.proj = module.proj
        new.proj_drop = getattr(module, "proj_drop", nn.Dropout(0.0))
        new.train(module.training)
        return share_hooks(module, new)
