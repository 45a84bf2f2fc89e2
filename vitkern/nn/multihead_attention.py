"""``vitkern.nn.MultiheadAttention``: drop-in for ``torch.nn.MultiheadAttention`` (a subclass: same constructor,
parameters, state_dict keys and return value ``(out, weights)``).

Fused path, for self-attention as torchvision's ViT and most "CNN + attention" models call it
(``mha(x, x, x, need_weights=False)``)::

    qkv = F.linear(x, in_proj_weight, in_proj_bias)       # [B, N, 3E], columns (q|k|v, head-major) as torch packs them
    o   = vitkern.functional.attention(qkv=qkv, ...)      # [B, N, E]: the kernel reads q/k/v by strides
    out = out_proj(o)

``batch_first=False`` ([N, B, E]): the packed qkv is passed as its [B, N, 3E] transpose (a strided view, no copy)
and the output is returned as the [N, B, E] transpose of out_proj's [B, N, E] result (a view, as torch itself
returns for ``batch_first=True``). Unbatched input ([N, E]) runs as a batch of one.

Every other call runs ``torch.nn.MultiheadAttention.forward`` unchanged (same numbers, same ``(out, weights)``):
query/key/value not the same tensor object, masks, ``is_causal``, ``need_weights=True`` (torch's default: the fused
kernel never forms the weights), attention dropout in training, ``add_bias_kv``, ``add_zero_attn``, kdim/vdim !=
embed_dim, nested tensors. ``mha.why_not_fused(query, key, value, ...)`` returns the reason (None when fused) and
``mha.explain(...)`` says the same in words, with ``vitkern.explain``'s backend choice for fused calls.

Same-object identity (``query is key is value``) is the self-attention test, as torch's own fast path uses: equal
values in different tensors cannot be checked without reading them, and two views of one storage may carry
different autograd histories (``mha(x, x.detach(), x.detach())``), so fusing them would route gradients wrongly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import dispatch
from vitkern.functional.attention import attention
from vitkern.nn._hooks import share_hooks
from vitkern.nn.attention_maps import RecordsAttentionMaps

__all__ = ["MultiheadAttention"]

# plain attributes nn.MultiheadAttention.__init__ sets (parameters and out_proj are shared separately)
_MHA_ATTRS = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim",
              "add_zero_attn")


class MultiheadAttention(RecordsAttentionMaps, nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose self-attention calls run vitkern's fused attention (module docstring)."""

    vitkern_ops = ("attention",)

    # ------------------------------------------------------------------------------------------- construction
    @staticmethod
    def static_reason(mha: nn.MultiheadAttention) -> Optional[str]:
        """Why no call of ``mha`` can be fused, from its configuration alone (None: calls may be fused)."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            return (f"kdim/vdim ({mha.kdim}/{mha.vdim}) differ from embed_dim {mha.embed_dim}: separate q/k/v "
                    "projection weights, no packed qkv")
        if mha.bias_k is not None or mha.bias_v is not None:
            return "add_bias_kv=True (learned key/value bias tokens are not fused)"
        if mha.add_zero_attn:
            return "add_zero_attn=True (a zero key/value token is not fused)"
        return None

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """A vitkern MultiheadAttention sharing ``mha``'s parameters and ``out_proj`` (no copy; same state_dict)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError("vitkern.nn.MultiheadAttention.from_torch: mha must be a torch.nn.MultiheadAttention, "
                            f"got {type(mha).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in _MHA_ATTRS:
            setattr(new, name, getattr(mha, name))
        for name, p in mha._parameters.items():  # same order and None entries: identical state_dict
            new.register_parameter(name, p)
        for name in ("bias_k", "bias_v"):
            if name not in new._parameters:
                setattr(new, name, getattr(mha, name))
        for name, m in mha._modules.items():
            new.add_module(name, m)
        new.training = mha.training  # not .train(): that would also flip the shared children
        return share_hooks(mha, new)

    # ------------------------------------------------------------------------------------------- forward
    def why_not_fused(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                      need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                      average_attn_weights: bool = True, is_causal: bool = False) -> Optional[str]:
        """Why ``forward`` with these arguments runs torch's path instead of the fused one (None: it is fused)."""
        reason = self.static_reason(self)
        if reason is not None:
            return reason
        if query is not key or key is not value:
            return "not self-attention: query, key and value are not the same tensor object"
        if query.is_nested:
            return "nested tensor input"
        if query.dim() not in (2, 3):
            return f"query is {query.dim()}-D; expected [N, E] or batched 3-D"
        if key_padding_mask is not None:
            return "key_padding_mask is given (masks are not fused)"
        if attn_mask is not None:
            return "attn_mask is given (masks are not fused)"
        if is_causal:
            return "is_causal=True (causal masking is not fused)"
        if need_weights:
            return "need_weights=True (the fused kernel never forms the attention weights; pass need_weights=False)"
        if self.training and self.dropout > 0:
            return f"attention dropout in training (dropout={self.dropout})"
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self.why_not_fused(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                              is_causal) is not None:
            return self._torch_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if query.dim() == 2:  # unbatched [N, E]: a batch of one (torch ignores batch_first here too)
            return self.project(self.attend(self.in_proj(query.unsqueeze(0)))).squeeze(0), None
        if self.batch_first:
            return self.project(self.attend(self.in_proj(query))), None
        qkv = self.in_proj(query).transpose(0, 1)  # [N, B, 3E] -> [B, N, 3E] view: the kernel reads by strides
        return self.project(self.attend(qkv)).transpose(0, 1), None

    def in_proj(self, x: Tensor) -> Tensor:
        """The packed input projection [..., E] -> [..., 3E] (q | k | v)."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def attend(self, qkv: Tensor) -> Tensor:
        """Attention on a packed [B, N, 3E] qkv (any strides with a unit last stride) -> [B, N, E], before
        ``out_proj``. Fused blocks call this after their own qkv GEMM (e.g. LayerNorm + in_proj in one)."""
        if self._vitkern_attn_maps is not None:
            B, N, _ = qkv.shape
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            o = self._record_probs(q, k, self.head_dim ** -0.5) @ v  # [B, H, N, D]
            return o.transpose(1, 2).reshape(B, N, self.embed_dim)
        return attention(qkv=qkv, num_heads=self.num_heads)  # scale head_dim ** -0.5, as torch's SDPA call

    def project(self, o: Tensor) -> Tensor:
        return self.out_proj(o)

    def _torch_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                       is_causal):
        """torch.nn.MultiheadAttention.forward; inside ``vitkern.nn.attention_maps`` it runs torch's
        need_weights=True path to record the per-head weights ([B, H, L, S]; unbatched: [1, H, L, S]; after
        dropout in training, as torch returns them) and returns what the caller asked for."""
        if self._vitkern_attn_maps is None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        out, weights = super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                       attn_mask=attn_mask, average_attn_weights=False, is_causal=is_causal)
        self._vitkern_attn_maps.append(weights if weights.dim() == 4 else weights.unsqueeze(0))
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights

    def explain(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                **forward_kwargs) -> str:
        """In words: whether ``forward(query, key, value, **forward_kwargs)`` is fused (and on which backend, as
        ``vitkern.explain``), or why it runs torch's path. key/value default to query (self-attention)."""
        key = query if key is None else key
        value = key if value is None else value
        reason = self.why_not_fused(query, key, value, **forward_kwargs)
        if reason is not None:
            return f"not fused (runs torch.nn.MultiheadAttention.forward): {reason}"
        with torch.no_grad():
            x = query.unsqueeze(0) if query.dim() == 2 else query if self.batch_first else query.transpose(0, 1)
            qkv = x.new_empty(()).expand(*x.shape[:2], 3 * self.embed_dim)  # shape, dtype, device: no compute
            choice = dispatch.explain("attention", qkv=qkv, num_heads=self.num_heads)
        return f"fused: {choice}"
