"""``vitkern.nn.ViTBlock``: a timm ViT/DeiT ``Block`` (pre-norm) with its two halves fused.

    timm:    x = x + drop_path1(ls1(attn(norm1(x))));  x = x + drop_path2(ls2(mlp(norm2(x))))
    vitkern: qkv = ln_linear(x, norm1, attn.qkv)        one GEMM with the LayerNorm folded in
             o   = attn.attend(qkv)                     flash attention on the packed qkv
             x   = linear_residual(o, attn.proj, x, ls1)  proj GEMM + bias + layer scale + residual
             x   = ln_mlp(x, norm2, mlp.fc1, mlp.fc2, ls2)   LayerNorm + fc1 + GELU + fc2 + layer scale + residual

Submodules keep timm's names (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``, ``ls2.gamma``, ...), so parameters are the block's own objects and state_dict keys are unchanged.
Each fusion applies only where it is exact: a gated attention needs norm1's output (no norm1+qkv fusion); stochastic
depth or MLP dropout in training, an ``attn_mask`` or ``is_causal``, or recording attention maps run the block
unfused, with the same submodules (still vitkern attention / LayerNorm where those were swapped); so does the proj
GEMM's epilogue fusion when proj dropout is active in training or ``attn.proj`` is not a plain ``nn.Linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vitkern.functional.linear_residual import linear_residual
from vitkern.functional.ln_mlp import ln_linear, ln_mlp
from vitkern.nn._hooks import mlp_must_call, must_call
from vitkern.nn.attention import Attention
from vitkern.nn.layer_norm import LayerNorm, layer_norm_reason

__all__ = ["ViTBlock"]


def _drop_p(module: Optional[nn.Module]) -> float:
    """Drop probability of a dropout / DropPath module (0 for Identity or None)."""
    return float(getattr(module, "p", getattr(module, "drop_prob", 0.0)) or 0.0)


def swappable_attention(attn: nn.Module) -> bool:
    """timm's ``Attention`` (not a subclass changing forward) or ``vitkern.reference``'s: vitkern.nn.Attention
    takes it over sharing its parameters."""
    from vitkern.reference.layers import Attention as ReferenceAttention

    return Attention.accepts_timm(attn) is True or type(attn) is ReferenceAttention


def training_noise(block: nn.Module) -> bool:
    """Stochastic depth or MLP dropout active in a pre-norm block: those halves run unfused, exactly as the original."""
    if not block.training:
        return False
    mlp = block.mlp
    return any(_drop_p(m) > 0 for m in (block.drop_path1, block.drop_path2, getattr(mlp, "drop1", None),
                                         getattr(mlp, "drop2", None)))


def _layer_scale_ok(ls: Optional[nn.Module]) -> bool:
    """Identity/absent, or a LayerScale (timm's ``gamma`` multiplier) that a GEMM epilogue can apply."""
    return ls is None or isinstance(ls, nn.Identity) or isinstance(getattr(ls, "gamma", None), torch.Tensor)


def proj_fusion_blocker(attn: nn.Module, ls: Optional[nn.Module] = None) -> Optional[str]:
    """Why ``x + ls(attn.project(o))`` cannot be one linear_residual call (None: it can)."""
    proj = getattr(attn, "proj", None)
    if type(proj) is not nn.Linear:  # a subclass (LoRA, quantized) may change what forward computes
        return f"attn.proj is {type(proj).__name__}, not an nn.Linear"
    if not _layer_scale_ok(ls):
        return f"the layer scale is {type(ls).__name__}, not a LayerScale"
    return None


def project_residual(attn: nn.Module, o: Tensor, x: Tensor, ls: Optional[nn.Module], fuse: bool) -> Tensor:
    """``x + ls(attn.project(o))``: with ``fuse`` (proj_fusion_blocker said yes) the proj GEMM, its bias, the layer
    scale and the residual add are one linear_residual call, unless proj dropout is active (training)."""
    if not fuse or (attn.training and _drop_p(getattr(attn, "proj_drop", None)) > 0):
        out = attn.project(o)
        return x + (ls(out) if ls is not None else out)
    return linear_residual(o, attn.proj.weight, attn.proj.bias, x, getattr(ls, "gamma", None))


def mlp_fusion_blocker(block: nn.Module) -> Optional[str]:
    """Why the MLP half of a pre-norm block cannot become one ln_mlp call (None: it can)."""
    mlp = getattr(block, "mlp", None)
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("fc1", "fc2")):
        return "mlp is not fc1 -> act -> fc2 with nn.Linear layers (e.g. SwiGLU / GLU)"
    if type(getattr(mlp, "act", None)) is not nn.GELU:
        return f"mlp.act is {type(getattr(mlp, 'act', None)).__name__}, the fused MLP does GELU"
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return "mlp has a norm between fc1 and fc2 (scale_mlp_norm)"
    norm_reason = layer_norm_reason(block.norm2, "norm2")
    if norm_reason:
        return norm_reason
    ls = getattr(block, "ls2", None)
    if not _layer_scale_ok(ls):
        return f"ls2 is {type(ls).__name__}, not a LayerScale"
    return None


class ViTBlock(nn.Module):
    """A timm ``Block`` whose forward runs the fused ops.

    Two ways in: :meth:`from_timm` wraps an existing block (shares its parameters), and the constructor takes timm
    ``Block``'s own arguments (``dim, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values, ...``), so
    ``timm.create_model(name, block_fn=vitkern.nn.ViTBlock)`` builds a fused ViT directly (timm's block is built
    with those arguments, then taken over).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.fuse_ln_qkv = self.fuse_proj = self.fuse_mlp = False
        if args or kwargs:  # timm's Block signature (timm's block_fn): build timm's block and take it over
            from timm.models.vision_transformer import Block

            self._take_over(Block(*args, **kwargs))

    @classmethod
    def from_timm(cls, block: nn.Module, attention: bool = True, ln_mlp: bool = True,
                  layer_norm: bool = True) -> "ViTBlock":
        """Wrap the submodules of a timm (or ``vitkern.reference``) ViT ``Block``; the flags choose what is fused:
        ``attention`` swaps ``attn`` for ``vitkern.nn.Attention``, ``ln_mlp`` fuses norm1+qkv, proj+ls1+residual
        and norm2+mlp, ``layer_norm`` swaps norms left unfused for ``vitkern.nn.LayerNorm``."""
        new = cls()
        new._take_over(block, attention, ln_mlp, layer_norm)
        return new

    def _take_over(self, block: nn.Module, attention: bool = True, ln_mlp: bool = True,
                   layer_norm: bool = True) -> None:
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name, None) or nn.Identity())
        if attention and swappable_attention(self.attn):
            self.attn = Attention.from_timm(self.attn)
        if layer_norm:
            self.norm1, self.norm2 = LayerNorm.swap_in(self.norm1), LayerNorm.swap_in(self.norm2)
        self.fuse_ln_qkv = (ln_mlp and isinstance(self.attn, Attention) and self.attn.gate is None
                            and layer_norm_reason(self.norm1, "norm1") is None)
        self.fuse_proj = self.fuse_ln_qkv and proj_fusion_blocker(self.attn, self.ls1) is None
        self.fuse_mlp = ln_mlp and mlp_fusion_blocker(self) is None
        self.train(block.training)

    @property
    def vitkern_ops(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(op for op, on in (("ln_linear", self.fuse_ln_qkv), ("attention", isinstance(self.attn, Attention)),
                                       ("linear_residual", self.fuse_proj), ("ln_mlp", self.fuse_mlp)) if on)

    def extra_repr(self) -> str:
        return f"fuse_ln_qkv={self.fuse_ln_qkv}, fuse_proj={self.fuse_proj}, fuse_mlp={self.fuse_mlp}"

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        # x: [B, N, C] -> [B, N, C]
        recording = getattr(self.attn, "_vitkern_attn_maps", None) is not None
        if attn_mask is not None or is_causal or recording or training_noise(self):
            masks = {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **masks)))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        attn = self.attn
        # proj's weight is read only when fuse_proj (else project_residual calls it)
        if self.fuse_ln_qkv and not must_call(self.norm1, attn, attn.proj, self.ls1,
                                              linears=(attn.qkv, attn.proj) if self.fuse_proj else (attn.qkv,)):
            n1 = self.norm1
            qkv = ln_linear(x, n1.weight, n1.bias, attn.qkv.weight, attn.qkv.bias, n1.eps)
            x = project_residual(attn, attn.attend(qkv), x, self.ls1, self.fuse_proj)
        else:
            x = x + self.ls1(attn(self.norm1(x)))
        if not self.fuse_mlp or mlp_must_call(self.norm2, self.mlp, self.mlp.fc1, self.mlp.fc2, self.ls2):
            return x + self.ls2(self.mlp(self.norm2(x)))
        n2, mlp = self.norm2, self.mlp
        gamma = getattr(self.ls2, "gamma", None)
        return ln_mlp(x, n2.weight, n2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, gamma,
                      n2.eps, mlp.act.approximate)

    def forward_with_probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``vitkern.reference`` models call this for ``return_attn=True``: the block output and the attention
        probabilities [B, heads, N, N] (through :func:`vitkern.nn.attention_maps`)."""
        from vitkern.nn.attention_maps import attention_maps

        with attention_maps(self) as maps:
            out = self(x)
        return out, maps["attn"][0]
