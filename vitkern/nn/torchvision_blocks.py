"""Fused replacements for torchvision's ViT ``EncoderBlock`` and Swin V1 ``SwinTransformerBlock`` /
``ShiftedWindowAttention`` (torchvision 0.26), built from the original with ``from_torchvision`` (parameters,
submodule names, buffers and state_dict keys shared / unchanged).

ViT ``EncoderBlock`` (ln_1, self_attention, dropout, ln_2, mlp = [Linear, GELU, Dropout, Linear, Dropout])::

    qkv = ln_linear(x, ln_1, self_attention.in_proj)         # LayerNorm + in_proj: one GEMM
    x   = x + dropout(out_proj(attention(qkv)))              # vitkern.nn.MultiheadAttention.attend, then
                                                             #   out_proj + residual: one GEMM (linear_residual)
    x   = ln_mlp(x, ln_2, mlp.0, mlp.3)                      # LayerNorm + MLP + residual: one fused op

Swin V1 ``SwinTransformerBlock`` (norm1, attn, stochastic_depth, norm2, mlp)::

    qkv = ln_linear(x, norm1, attn.qkv)                      # [B, H, W, 3C]: torchvision pads *after* norm1, so
    x   = x + stochastic_depth(proj(window_attention(qkv)))  #   padded tokens are the qkv bias (in-kernel);
                                                             #   proj + residual: one GEMM (linear_residual)
    x   = ln_mlp(x, norm2, mlp.0, mlp.3)

Each part is fused only while its stochastic layers are no-ops (eval, or p == 0), decided per call, so
``model.train()`` with dropout / stochastic depth runs torchvision's own math for that part (same RNG draws as the
original). Dropout and stochastic depth *after* a fused part (EncoderBlock.dropout, Swin's stochastic depth on the
attention branch) are applied as the original does, to the fused part's output. ``unfused_parts()`` says which
parts currently run unfused and why.

torchvision registers ``relative_position_index`` as a *persistent* buffer (flat, [N·N]); unlike timm's, it is in
the state_dict. :class:`TorchvisionShiftedWindowAttention` keeps that very tensor, persistent, under the same name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vitkern.functional.linear_residual import linear_residual
from vitkern.functional.ln_mlp import ln_linear, ln_mlp
from vitkern.nn._hooks import mlp_must_call, must_call
from vitkern.nn.layer_norm import LayerNorm, layer_norm_reason
from vitkern.nn.multihead_attention import MultiheadAttention
from vitkern.nn.window_attention import ShiftedWindowAttention
from vitkern.reference import swin as ref_swin

__all__ = ["TorchvisionEncoderBlock", "TorchvisionSwinBlock", "TorchvisionShiftedWindowAttention"]


# ----------------------------------------------------------------------------------------------- checks
def _mlp_reason(mlp: nn.Module) -> Optional[str]:
    """torchvision's MLP/MLPBlock with one hidden layer: [Linear, GELU, Dropout, Linear, Dropout]."""
    kinds = (nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout)
    layers = list(mlp.children()) if isinstance(mlp, nn.Sequential) else []
    if len(layers) != 5 or not all(type(m) is k for m, k in zip(layers, kinds)):
        got = [type(m).__name__ for m in layers] if layers else type(mlp).__name__
        return f"mlp is {got}; expected [Linear, GELU, Dropout, Linear, Dropout]"
    return None


def _mlp_dropout_active(mlp: nn.Sequential) -> bool:
    return mlp.training and (mlp[2].p > 0 or mlp[4].p > 0)


def _mlp_must_call(norm: nn.LayerNorm, mlp: nn.Sequential) -> bool:
    """mlp_must_call for torchvision's MLPBlock (Linear, GELU, Dropout, Linear, Dropout)."""
    return mlp_must_call(norm, mlp, mlp[0], mlp[3])


def _fused_mlp(x: Tensor, norm: nn.LayerNorm, mlp: nn.Sequential) -> Tensor:
    """x + mlp(norm(x)) in one op."""
    fc1, fc2 = mlp[0], mlp[3]
    return ln_mlp(x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, None, norm.eps,
                  mlp[1].approximate)


def _ops(*pairs: tuple[str, bool]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(op for op, used in pairs if used))


# ----------------------------------------------------------------------------------------------- ViT
class TorchvisionEncoderBlock(nn.Module):
    """torchvision's ViT ``EncoderBlock`` with LayerNorm+in_proj, attention and LayerNorm+MLP fused (see the
    module docstring); the same submodules (ln_1, self_attention, dropout, ln_2, mlp) and state_dict."""

    @staticmethod
    def reason(block: nn.Module) -> Optional[str]:
        """Why ``block`` (a torchvision EncoderBlock) cannot be replaced (None: it can)."""
        attn = getattr(block, "self_attention", None)
        if not isinstance(attn, nn.MultiheadAttention):
            return f"self_attention is {type(attn).__name__}, not nn.MultiheadAttention"
        if not attn.batch_first:
            return "self_attention has batch_first=False (torchvision's EncoderBlock uses True)"
        return (layer_norm_reason(getattr(block, "ln_1", None), "ln_1")
                or layer_norm_reason(getattr(block, "ln_2", None), "ln_2")
                or MultiheadAttention.static_reason(attn) or _mlp_reason(getattr(block, "mlp", None)))

    @classmethod
    def from_torchvision(cls, block: nn.Module, *, attention: bool = True, ln_linear: bool = True,
                         ln_mlp: bool = True, layer_norm: bool = True) -> "TorchvisionEncoderBlock":
        """Share ``block``'s submodules. ``attention``: fused attention (self_attention becomes a
        vitkern.nn.MultiheadAttention); ``ln_linear``: ln_1 fused into in_proj (needs ``attention``); ``ln_mlp``:
        ln_2 + mlp + residual fused; ``layer_norm``: the LayerNorms that still run on their own become vitkern's."""
        reason = cls.reason(block)
        if reason is not None:
            raise TypeError(f"TorchvisionEncoderBlock.from_torchvision: {reason}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = getattr(block, "num_heads", block.self_attention.num_heads)
        new.fuse_qkv, new.fuse_mlp = bool(attention and ln_linear), bool(ln_mlp)
        # ln_1 runs when qkv is not fused (or not in this call)
        new.ln_1 = LayerNorm.swap_in(block.ln_1) if layer_norm else block.ln_1
        attn = block.self_attention
        new.self_attention = MultiheadAttention.from_torch(attn) if attention and type(attn) is nn.MultiheadAttention \
            else attn
        new.dropout = block.dropout
        new.ln_2 = LayerNorm.swap_in(block.ln_2) if layer_norm else block.ln_2
        new.mlp = block.mlp
        new.training = block.training
        fused_attn = isinstance(new.self_attention, MultiheadAttention)
        new.vitkern_ops = _ops(("ln_linear", new.fuse_qkv), ("attention", fused_attn),
                               ("linear_residual", new.fuse_qkv and fused_attn), ("ln_mlp", new.fuse_mlp),
                               ("layer_norm", isinstance(new.ln_1, LayerNorm) and not new.fuse_qkv),
                               ("layer_norm", isinstance(new.ln_2, LayerNorm) and not new.fuse_mlp))
        return new

    def extra_repr(self) -> str:
        return f"fuse_qkv={self.fuse_qkv}, fuse_mlp={self.fuse_mlp}"

    def unfused_parts(self) -> dict[str, str]:
        """Parts that run unfused in the current mode, with the reason."""
        out = {}
        attn = self.self_attention
        if not isinstance(attn, MultiheadAttention):
            out["attention"] = "not swapped (attention=False)"
        elif attn.training and attn.dropout > 0:
            out["attention"] = f"attention dropout in training (p={attn.dropout})"
        if "attention" in out or not self.fuse_qkv:
            out["ln_1+in_proj"] = out["out_proj+residual"] = out.get("attention", "ln_linear fusion off")
        elif self._attention_must_call():
            out["ln_1+in_proj"] = out["out_proj+residual"] = "a hook on ln_1, self_attention or out_proj"
        elif self.dropout.training and self.dropout.p > 0:
            out["out_proj+residual"] = f"dropout in training (p={self.dropout.p})"
        if not self.fuse_mlp:
            out["ln_2+mlp"] = "ln_mlp fusion off"
        elif _mlp_dropout_active(self.mlp):
            out["ln_2+mlp"] = f"MLP dropout in training (p={self.mlp[2].p})"
        elif _mlp_must_call(self.ln_2, self.mlp):
            out["ln_2+mlp"] = "a hook on ln_2 or the MLP, or its Linears are not plain nn.Linear"
        return out

    def _attention_must_call(self) -> bool:
        # out_proj is torch's NonDynamicallyQuantizableLinear (an nn.Linear subclass computing the same)
        return must_call(self.ln_1, self.self_attention, getattr(self.self_attention, "out_proj", None))

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        attn = self.self_attention
        if (self.fuse_qkv and isinstance(attn, MultiheadAttention) and not (attn.training and attn.dropout > 0)
                and not self._attention_must_call()):
            ln = self.ln_1
            qkv = ln_linear(input, ln.weight, ln.bias, attn.in_proj_weight, attn.in_proj_bias, ln.eps)
            o = attn.attend(qkv)
            if not (self.dropout.training and self.dropout.p > 0):  # out_proj + residual in one GEMM
                x = linear_residual(o, attn.out_proj.weight, attn.out_proj.bias, input)
            else:  # torch's MHA returns out_proj's output in [N, B, E] memory order: the same dropout mask needs it
                x = self.dropout(attn.project(o.transpose(0, 1)).transpose(0, 1)) + input
        else:
            h = self.ln_1(input)
            x, _ = attn(h, h, h, need_weights=False)
            x = self.dropout(x) + input
        if self.fuse_mlp and not _mlp_dropout_active(self.mlp) and not _mlp_must_call(self.ln_2, self.mlp):
            return _fused_mlp(x, self.ln_2, self.mlp)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------- Swin V1
def _is_swin_v1_attention(attn: nn.Module) -> bool:
    """torchvision's 2-D Swin V1 ``ShiftedWindowAttention`` itself (or ours). Not by its attributes: Swin3D's
    ``ShiftedWindowAttention3d`` has the same ones over 3-D windows, V2 and other subclasses compute other things."""
    if isinstance(attn, TorchvisionShiftedWindowAttention):
        return True
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention as TorchvisionV1Attention
    except ImportError:
        return False
    return type(attn) is TorchvisionV1Attention


class TorchvisionShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's Swin V1 ``ShiftedWindowAttention`` ([B, H, W, C] -> [B, H, W, C]) on the fused
    ``vitkern.functional.window_attention`` (``ShiftedWindowAttention.from_torchvision``: pad-then-roll order,
    padding and shift mask in-kernel; ``attend`` / ``project`` / attention maps come from there).

    Adds what a swap into a torchvision model needs: in training with attention or output dropout > 0
    torchvision's own ``shifted_window_attention`` runs (same RNG draws as the original).
    """

    def _dropout_active(self) -> bool:
        return self.training and (self.attn_drop.p > 0 or self.proj_drop.p > 0)

    def forward(self, x: Tensor) -> Tensor:
        if self._dropout_active():
            from torchvision.models.swin_transformer import shifted_window_attention

            n = self.window_area
            index = self.relative_position_index.view(n, n)
            bias = ref_swin.relative_position_bias(self.relative_position_bias_table, index).unsqueeze(0)
            return shifted_window_attention(x, self.qkv.weight, self.proj.weight, bias, list(self.window_size),
                                            self.num_heads, list(self.shift_size), self.attn_drop.p,
                                            self.proj_drop.p, self.qkv.bias, self.proj.bias, training=True)
        return self.project(self.attend(self.qkv(x)))


class TorchvisionSwinBlock(nn.Module):
    """torchvision's Swin V1 ``SwinTransformerBlock`` with norm1+qkv, window attention and norm2+MLP fused (see
    the module docstring); the same submodules (norm1, attn, stochastic_depth, norm2, mlp) and state_dict."""

    @staticmethod
    def reason(block: nn.Module) -> Optional[str]:
        """Why ``block`` (a torchvision SwinTransformerBlock) cannot be replaced (None: it can)."""
        attn = getattr(block, "attn", None)
        if not _is_swin_v1_attention(attn):
            return (f"attn is {type(attn).__name__}: Swin V2 cosine attention (logit_scale, cpb_mlp) is not fused"
                    if hasattr(attn, "logit_scale") else f"attn is {type(attn).__name__}, not a Swin V1 attention")
        return (layer_norm_reason(getattr(block, "norm1", None), "norm1")
                or layer_norm_reason(getattr(block, "norm2", None), "norm2")
                or _mlp_reason(getattr(block, "mlp", None)))

    @classmethod
    def from_torchvision(cls, block: nn.Module, *, window_attention: bool = True, ln_linear: bool = True,
                         ln_mlp: bool = True, layer_norm: bool = True) -> "TorchvisionSwinBlock":
        """Share ``block``'s submodules; the flags say which parts fuse (as TorchvisionEncoderBlock's;
        ``ln_linear`` needs ``window_attention``)."""
        reason = cls.reason(block)
        if reason is not None:
            raise TypeError(f"TorchvisionSwinBlock.from_torchvision: {reason}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.fuse_qkv, new.fuse_mlp = bool(window_attention and ln_linear), bool(ln_mlp)
        new.norm1 = LayerNorm.swap_in(block.norm1) if layer_norm else block.norm1
        attn = block.attn
        new.attn = TorchvisionShiftedWindowAttention.from_torchvision(attn) if window_attention and not \
            isinstance(attn, TorchvisionShiftedWindowAttention) else attn
        new.stochastic_depth = block.stochastic_depth
        new.norm2 = LayerNorm.swap_in(block.norm2) if layer_norm else block.norm2
        new.mlp = block.mlp
        new.training = block.training
        fused_attn = isinstance(new.attn, TorchvisionShiftedWindowAttention)
        new.vitkern_ops = _ops(("ln_linear", new.fuse_qkv), ("window_attention", fused_attn),
                               ("linear_residual", new.fuse_qkv and fused_attn), ("ln_mlp", new.fuse_mlp),
                               ("layer_norm", isinstance(new.norm1, LayerNorm) and not new.fuse_qkv),
                               ("layer_norm", isinstance(new.norm2, LayerNorm) and not new.fuse_mlp))
        return new

    def extra_repr(self) -> str:
        return f"fuse_qkv={self.fuse_qkv}, fuse_mlp={self.fuse_mlp}"

    def _stochastic_depth_active(self) -> bool:
        return self.stochastic_depth.training and self.stochastic_depth.p > 0

    def unfused_parts(self) -> dict[str, str]:
        """Parts that run unfused in the current mode, with the reason."""
        out = {}
        attn = self.attn
        if not isinstance(attn, TorchvisionShiftedWindowAttention):
            out["attention"] = "not swapped (window_attention=False)"
        elif attn._dropout_active():
            out["attention"] = f"dropout in training (attention {attn.attn_drop.p}, output {attn.proj_drop.p})"
        if "attention" in out or not self.fuse_qkv:
            out["norm1+qkv"] = out["proj+residual"] = out.get("attention", "ln_linear fusion off")
        elif self._attention_must_call():
            out["norm1+qkv"] = out["proj+residual"] = ("a hook on norm1, attn or its qkv / proj, or those are not "
                                                       "plain nn.Linear")
        elif self._stochastic_depth_active():
            out["proj+residual"] = f"stochastic depth in training (p={self.stochastic_depth.p})"
        if not self.fuse_mlp:
            out["norm2+mlp"] = "ln_mlp fusion off"
        elif self._stochastic_depth_active() or _mlp_dropout_active(self.mlp):
            out["norm2+mlp"] = (f"stochastic depth (p={self.stochastic_depth.p}) or MLP dropout "
                                f"(p={self.mlp[2].p}) in training")
        elif _mlp_must_call(self.norm2, self.mlp):
            out["norm2+mlp"] = "a hook on norm2 or the MLP, or its Linears are not plain nn.Linear"
        return out

    def _attention_must_call(self) -> bool:
        attn = self.attn
        return must_call(self.norm1, attn, linears=(attn.qkv, attn.proj))

    def forward(self, x: Tensor) -> Tensor:
        attn = self.attn
        if (self.fuse_qkv and isinstance(attn, TorchvisionShiftedWindowAttention) and not attn._dropout_active()
                and not self._attention_must_call()):
            norm = self.norm1
            o = attn.attend(ln_linear(x, norm.weight, norm.bias, attn.qkv.weight, attn.qkv.bias, norm.eps))
        else:
            o = None
        sd_active = self._stochastic_depth_active()
        if o is not None and not sd_active:  # proj + residual in one GEMM
            x = linear_residual(o, attn.proj.weight, attn.proj.bias, x)
        else:
            a = attn.project(o) if o is not None else attn(self.norm1(x))
            x = x + (self.stochastic_depth(a) if sd_active else a)
        if (self.fuse_mlp and not sd_active and not _mlp_dropout_active(self.mlp)
                and not _mlp_must_call(self.norm2, self.mlp)):
            return _fused_mlp(x, self.norm2, self.mlp)
        y = self.mlp(self.norm2(x))
        return x + (self.stochastic_depth(y) if sd_active else y)
