"""Swap rules for timm models (and ``vitkern.reference``'s, which have timm's structure and names).

    ViT / DeiT ``Block``            -> vitkern.nn.ViTBlock   (norm1+qkv GEMM, flash attention, norm2+MLP fused)
    Swin V1 ``SwinTransformerBlock`` -> vitkern.nn.SwinBlock  (norm1+qkv GEMM, fused shifted-window attention, MLP)
    ViT ``patch_embed`` + the ViT's position-embedding step -> vitkern.nn.FusedViTPatchEmbed
    ``Attention`` / ``WindowAttention`` on their own (blocks that could not be fused as a whole)
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from vitkern.integrations.swap import SwapOptions, SwapRule, register_rule
from vitkern.nn._hooks import has_own_hooks
from vitkern.nn.attention import Attention as VitkernAttention
from vitkern.nn.layer_norm import LayerNorm as VitkernLayerNorm
from vitkern.nn.patch_embed import FusedViTPatchEmbed, patch_projection_reason
from vitkern.nn.patch_embed import PatchEmbed as VitkernPatchEmbed
from vitkern.nn.swin_block import SwinBlock, swin_block_blocker
from vitkern.nn.vit_block import ViTBlock, _drop_p, mlp_fusion_blocker, swappable_attention
from vitkern.nn.window_attention import WindowAttention as VitkernWindowAttention


def _timm_class(module_path: str, name: str) -> Optional[type]:
    try:
        import importlib

        return getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError):  # timm is optional
        return None


def _reference_class(name: str) -> type:
    from vitkern import reference

    return getattr(reference, name)


def _exact(module: nn.Module, *classes: Optional[type]) -> bool:
    """Exactly one of these classes: subclasses may change forward(), and a block's math must be the known one."""
    return any(c is not None and type(module) is c for c in classes)


# ------------------------------------------------------------------------------------------------ ViT / DeiT blocks
def _vit_block_classes() -> tuple:
    return (_timm_class("timm.models.vision_transformer", "Block"), _reference_class("vit").Block)


def _vit_block_accepts(m: nn.Module, parent, options: SwapOptions) -> bool | str:
    if not _exact(m, *_vit_block_classes()):
        return False
    attn_ok = options.attention and swappable_attention(m.attn)
    mlp_why = mlp_fusion_blocker(m) if options.ln_mlp else "ln_mlp=False"
    if not attn_ok and mlp_why is not None:
        return f"nothing to fuse (attention: {type(m.attn).__name__} not swappable or disabled; mlp: {mlp_why})"
    return True


register_rule(SwapRule(
    "timm.Block", ("attention", "ln_mlp"), _vit_block_accepts,
    lambda m, parent, o: ViTBlock.from_timm(m, attention=o.attention, ln_mlp=o.ln_mlp, layer_norm=o.layer_norm),
    priority=10))


# ------------------------------------------------------------------------------------------------ Swin V1 blocks
def _swin_block_classes() -> tuple:
    return (_timm_class("timm.models.swin_transformer", "SwinTransformerBlock"),
            _reference_class("swin").SwinTransformerBlock)


def _swin_block_accepts(m: nn.Module, parent, options: SwapOptions) -> bool | str:
    if not _exact(m, *_swin_block_classes()):
        return False
    attn_why = swin_block_blocker(m) if options.window_attention else "window_attention=False"
    mlp_why = mlp_fusion_blocker(m) if options.ln_mlp else "ln_mlp=False"
    if attn_why is not None and mlp_why is not None:
        return f"nothing to fuse (attention: {attn_why}; mlp: {mlp_why})"
    return True


def _swin_block_replace(m: nn.Module, parent, o: SwapOptions) -> SwinBlock:
    return SwinBlock.from_timm(m, window_attention=o.window_attention, ln_mlp=o.ln_mlp, layer_norm=o.layer_norm)


register_rule(SwapRule("timm.SwinTransformerBlock", ("window_attention", "ln_mlp"), _swin_block_accepts,
                       _swin_block_replace, priority=10))


# ------------------------------------------------------------------------------------------------ known, not fused
# Blocks of timm families whose math vitkern's fused blocks do not implement. The rule never swaps: it puts the
# reason in the report (otherwise such a model would show only its LayerNorms swapped, with no word why), and the
# walk goes on into the block's children (single Attention / LayerNorm layers are still swapped where they fit).
_UNFUSED_BLOCKS = {
    ("timm.models.vision_transformer", "ParallelScalingBlock"):
        "parallel attention + MLP from one fused in_proj (ViT-22B style): no fused vitkern block",
    ("timm.models.vision_transformer", "DiffParallelScalingBlock"):
        "differential parallel attention + MLP: no fused vitkern block",
    ("timm.models.vision_transformer", "ParallelThingsBlock"):
        "parallel attention / MLP branches: no fused vitkern block (its Attention modules are swapped alone)",
    ("timm.models.vision_transformer", "ResPostBlock"):
        "post-norm block (norm after attention and MLP): no fused vitkern block (its Attention is swapped alone)",
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"):
        "Swin V2 (cosine attention with a logit scale, continuous position bias MLP, post-norm): not fused",
    ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock"):
        "Swin V2 (cosine attention with a logit scale, continuous position bias MLP, post-norm): not fused",
    ("timm.models.eva", "EvaBlock"): "EVA block (rotary position embedding in attention): not fused",
    ("timm.models.beit", "Block"): "BEiT block (relative position bias per block): not fused",
    ("timm.models.vision_transformer_relpos", "RelPosBlock"):
        "relative-position ViT block (a position bias inside attention): not fused",
    ("timm.models.vision_transformer_relpos", "ResPostRelPosBlock"):
        "relative-position ViT block, post-norm (a position bias inside attention): not fused",
    ("timm.models.cait", "LayerScaleBlock"):
        "CaiT block (talking-heads attention: head mixing before and after the softmax): not fused",
    ("timm.models.cait", "LayerScaleBlockClassAttn"):
        "CaiT class-attention block (only the class token queries): not fused",
    ("timm.models.xcit", "XCABlock"): "XCiT block (cross-covariance attention over channels, local patch "
                                      "interaction): not fused",
    ("timm.models.xcit", "ClassAttentionBlock"): "XCiT class-attention block (only the class token queries): "
                                                 "not fused",
    ("timm.models.deepseek_vit", "DeepseekVitBlock"): "DeepSeek ViT block (rotary position embedding in attention, "
                                                      "SwiGLU MLP): not fused",
    ("timm.models.gemma4_vit", "Gemma4Block"): "Gemma 4 ViT block (rotary position embedding, sandwich norms): "
                                               "not fused",
}


def _unfused_block_accepts(m: nn.Module, parent, options: SwapOptions) -> bool | str:
    for (module_path, name), why in _UNFUSED_BLOCKS.items():
        if type(m).__module__ == module_path and type(m).__name__ == name:
            return why
    return False


def _never(m: nn.Module, parent, options: SwapOptions) -> nn.Module:
    raise AssertionError("timm.unfused_block only reports")


register_rule(SwapRule("timm.unfused_block", ("attention", "ln_mlp", "window_attention"), _unfused_block_accepts,
                       _never, priority=10))


# ------------------------------------------------------------------------------------------------ ViT embedding
def _vit_pos_embed_method(vit: nn.Module) -> Optional[str]:
    """The ViT's position-embedding method name, if its class is one whose embedding math we know."""
    timm_vit = _timm_class("timm.models.vision_transformer", "VisionTransformer")
    timm_deit = _timm_class("timm.models.deit", "VisionTransformerDistilled")
    ref = _reference_class("vit")
    if _exact(vit, timm_vit, timm_deit):
        return "_pos_embed"
    if _exact(vit, ref.VisionTransformer, ref.VisionTransformerDistilled):
        return "add_pos_embed"
    return None


def _patch_embed_accepts(m: nn.Module, parent, options: SwapOptions) -> bool | str:
    timm_pe = _timm_class("timm.layers", "PatchEmbed")
    if not _exact(m, timm_pe, _reference_class("layers").PatchEmbed) or parent is None:
        return False
    if getattr(parent, "patch_embed", None) is not m or _vit_pos_embed_method(parent) is None:
        return False  # a patch embedding outside a ViT (e.g. Swin's): left to its model's own path
    why = patch_projection_reason(m.proj, "patch_embed.proj")
    if why:
        return why
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return "patch_embed has a norm layer between the projection and the position embedding"
    if _drop_p(getattr(parent, "pos_drop", None)) > 0:
        return f"pos_drop p={parent.pos_drop.p} (dropout after the position embedding is not fused)"
    if getattr(m, "output_nhwc", False):
        return "patch_embed outputs NHWC maps"
    if has_own_hooks(m):
        return "patch_embed has hooks (the fused module returns the whole token sequence, not the patches)"
    return True


register_rule(SwapRule(
    "timm.VisionTransformer.patch_embed", ("patch_embed",), _patch_embed_accepts,
    lambda m, parent, o: FusedViTPatchEmbed.from_vit(parent, _vit_pos_embed_method(parent)),
    ops=("patch_embed",), priority=50))


def _plain_patch_embed_accepts(m: nn.Module, parent, options: SwapOptions) -> bool | str:
    """A patch embedding whose position embedding is not ours to fuse (e.g. Swin's: NHWC output + LayerNorm)."""
    if not _exact(m, _timm_class("timm.layers", "PatchEmbed"), _reference_class("layers").PatchEmbed):
        return False
    return patch_projection_reason(m.proj) or True


def _plain_patch_embed_replace(m: nn.Module, parent, o: SwapOptions) -> VitkernPatchEmbed:
    new = VitkernPatchEmbed.from_timm(m)
    if o.layer_norm:
        new.norm = VitkernLayerNorm.swap_in(new.norm)  # Swin's norm after the projection
    return new


register_rule(SwapRule("timm.PatchEmbed", ("patch_embed",), _plain_patch_embed_accepts, _plain_patch_embed_replace,
                       ops=("patch_embed",), priority=60))


# ------------------------------------------------------------------------------------------------ single layers
register_rule(SwapRule("timm.Attention", ("attention",),
                       lambda m, parent, options: VitkernAttention.accepts_timm(m),
                       lambda m, parent, options: VitkernAttention.from_timm(m), ops=("attention",)))


def _window_attention_accepts(m: nn.Module, parent, options: SwapOptions) -> bool | str:
    if not _exact(m, _timm_class("timm.models.swin_transformer", "WindowAttention")):
        return False
    return True


register_rule(SwapRule("timm.WindowAttention", ("window_attention",), _window_attention_accepts,
                       lambda m, parent, options: VitkernWindowAttention.from_timm(m), ops=("window_attention",)))
