"""``vitkern.nn.SwinBlock``: a timm Swin V1 ``SwinTransformerBlock`` with both halves fused.

    timm:    x = x + drop_path1(_attn(norm1(x)))   (roll, pad, partition, window attention + bias + mask, reverse)
             x = x + drop_path2(mlp(norm2(x)))
    vitkern: qkv = ln_linear(x, norm1, attn.qkv)            [B, H, W, 3C], LayerNorm folded into the GEMM
             o   = attn.attend(qkv)                         one kernel: shift, padding, bias table, shift mask
             x   = linear_residual(o, attn.proj, x)         proj GEMM + bias + residual
             x   = ln_mlp(x, norm2, mlp.fc1, mlp.fc2)       LayerNorm + MLP + residual

``attn`` becomes a :class:`vitkern.nn.ShiftedWindowAttention` sharing timm's ``qkv``/``proj``/bias table (same
state_dict keys; timm's ``attn_mask`` buffer is non-persistent and not needed: the kernel derives the mask). The
block's window and shift are the ones timm clamped for its feature map; timm's ``set_input_size`` runs on the
replaced block and this one is re-derived from it. Stochastic depth / dropout in training and attention-map recording
run unfused.
"""

from __future__ import annotations

from torch import Tensor, nn

from vitkern.functional.ln_mlp import ln_linear, ln_mlp
from vitkern.nn._hooks import has_own_hooks, mlp_must_call, must_call
from vitkern.nn.layer_norm import LayerNorm, layer_norm_reason
from vitkern.nn.vit_block import _drop_p, mlp_fusion_blocker, proj_fusion_blocker, \
    project_residual, training_noise
from vitkern.nn.window_attention import ShiftedWindowAttention

__all__ = ["SwinBlock"]


def swin_block_blocker(block: nn.Module) -> str | None:
    """Why a Swin block's attention cannot be the fused window kernel (None: it can)."""
    attn = getattr(block, "attn", None)
    if not hasattr(attn, "relative_position_bias_table") or hasattr(attn, "logit_scale"):
        return "attn is not a Swin V1 WindowAttention (V2's cosine attention is not supported)"
    if has_own_hooks(attn):  # ours runs on the whole map [B, H, W, C], timm's once per batch of windows
        return "attn has hooks: timm's WindowAttention is kept, so they see its per-window calls"
    if _drop_p(getattr(attn, "attn_drop", None)) > 0:
        return f"attention dropout p={attn.attn_drop.p} (the fused kernel has none)"
    norm_reason = layer_norm_reason(block.norm1, "norm1")
    if norm_reason:
        return norm_reason
    return None


class SwinBlock(nn.Module):
    """A timm ``SwinTransformerBlock`` (or ``vitkern.reference``'s) running fused ops; build with :meth:`from_timm`."""

    _SUBMODULES = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2")  # timm's names, shared or swapped
    _DERIVED = ("window_size", "shift_size", "input_resolution", "fuse_ln_qkv", "fuse_proj", "fuse_mlp", "_timm_attn")

    def __init__(self) -> None:  # use from_timm()
        super().__init__()
        self.fuse_ln_qkv = self.fuse_proj = self.fuse_mlp = False

    @classmethod
    def from_timm(cls, block: nn.Module, window_attention: bool = True, ln_mlp: bool = True,
                  layer_norm: bool = True) -> "SwinBlock":
        new = cls()
        object.__setattr__(new, "_original", block)  # plain attributes: not a submodule, not in the state_dict
        object.__setattr__(new, "_options", (window_attention, ln_mlp, layer_norm))
        new.window_size, new.shift_size = tuple(block.window_size), tuple(block.shift_size)
        new.input_resolution = getattr(block, "input_resolution", None)
        for name in cls._SUBMODULES:
            setattr(new, name, getattr(block, name, None) or nn.Identity())
        if window_attention and swin_block_blocker(block) is None:
            new.attn = ShiftedWindowAttention.from_timm_block(block)
        if layer_norm:
            new.norm1, new.norm2 = LayerNorm.swap_in(new.norm1), LayerNorm.swap_in(new.norm2)
        fused_attn = isinstance(new.attn, ShiftedWindowAttention)
        new.fuse_ln_qkv = ln_mlp and fused_attn and layer_norm_reason(new.norm1, "norm1") is None
        new.fuse_proj = new.fuse_ln_qkv and proj_fusion_blocker(new.attn) is None
        new.fuse_mlp = ln_mlp and mlp_fusion_blocker(new) is None
        # unfused attention: the block's own method (vitkern.reference names timm's _attn window_attention)
        new._timm_attn = None if fused_attn else getattr(block, "_attn", None) or block.window_attention
        new.train(block.training)
        return new

    def set_input_size(self, feat_size, window_size, always_partition=None) -> None:
        """timm's ``SwinTransformerBlock.set_input_size`` (called by the model's): run on the replaced block (new
        clamped window and shift; timm resamples the bias table for a new window), then this block's submodules and
        fusion flags re-derived from it."""
        setter = getattr(self._original, "set_input_size", None)
        if setter is None:
            raise AttributeError(f"{type(self._original).__qualname__} has no set_input_size")
        setter(feat_size=feat_size, window_size=window_size, always_partition=always_partition)
        rebuilt = type(self).from_timm(self._original, *self._options)
        for name in self._SUBMODULES + self._DERIVED:
            setattr(self, name, getattr(rebuilt, name))
        self.train(self.training)

    @property
    def vitkern_ops(self) -> tuple[str, ...]:
        fused_attn = isinstance(self.attn, ShiftedWindowAttention)
        return tuple(op for op, on in (("ln_linear", self.fuse_ln_qkv), ("window_attention", fused_attn),
                                       ("linear_residual", self.fuse_proj), ("ln_mlp", self.fuse_mlp)) if on)

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, shift_size={self.shift_size}, fuse_ln_qkv={self.fuse_ln_qkv}, "
                f"fuse_proj={self.fuse_proj}, fuse_mlp={self.fuse_mlp}")

    def _attn(self, x: Tensor) -> Tensor:
        """timm's name: windowed attention of the normed map [B, H, W, C]."""
        if self._timm_attn is not None:
            return self._timm_attn(x)
        return self.attn(x)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, H, W, C] -> [B, H, W, C]
        recording = getattr(self.attn, "_vitkern_attn_maps", None) is not None
        noise, attn = training_noise(self), self.attn
        if recording or noise or not self.fuse_ln_qkv or must_call(
                self.norm1, attn, attn.proj, linears=(attn.qkv, attn.proj) if self.fuse_proj else (attn.qkv,)):
            x = x + self.drop_path1(self._attn(self.norm1(x)))
        else:
            n1 = self.norm1
            qkv = ln_linear(x, n1.weight, n1.bias, attn.qkv.weight, attn.qkv.bias, n1.eps)
            x = project_residual(attn, attn.attend(qkv), x, None, self.fuse_proj)
        mlp = self.mlp
        if recording or noise or not self.fuse_mlp or mlp_must_call(self.norm2, mlp, mlp.fc1, mlp.fc2):
            B, H, W, C = x.shape  # timm's steps: the MLP half on the rows [B, H·W, C] (what its hooks see)
            x = x.reshape(B, -1, C)
            return (x + self.drop_path2(mlp(self.norm2(x)))).reshape(B, H, W, C)
        n2 = self.norm2
        return ln_mlp(x, n2.weight, n2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, None,
                      n2.eps, mlp.act.approximate)
