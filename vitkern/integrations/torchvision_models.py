"""Swap rules for torchvision models (``vit_*``, ``swin_*`` V1) and for ``torch.nn.MultiheadAttention`` anywhere.

- ``torchvision.EncoderBlock`` (ViT, priority 10, family ``ln_mlp``): the whole block; attention fused when
  ``attention`` is on, ln_1 fused into in_proj when both are on.
- ``torchvision.SwinTransformerBlock`` (Swin V1, priority 10, family ``ln_mlp``): the whole block; window attention
  fused when ``window_attention`` is on, norm1 fused into qkv when both are on.
- ``torchvision.ShiftedWindowAttention`` (family ``window_attention``): the attention alone, where its block is not
  replaced (``ln_mlp=False``, or a block with a custom norm / MLP).
- ``torchvision.VisionTransformer.conv_proj`` (family ``patch_embed``): patch projection, class token and position
  embedding in one launch (``TorchvisionViTConvProj``; the ViT's and its encoder's forward are replaced on the
  instance, restore removes them).
- ``torchvision.SwinTransformer.stem`` (family ``patch_embed``): ``features[0]`` = [Conv2d, Permute, norm] with
  Conv2d + Permute on the fused op, then the norm (``TorchvisionSwinPatchEmbed``).
- ``torch.nn.MultiheadAttention`` (family ``attention``): any model's MHA (torchvision ViT blocks that are not
  replaced, CNN + attention classifiers, ``nn.TransformerEncoderLayer``): self-attention calls run fused, every
  other call runs torch's code (``mha.why_not_fused(...)`` says why).

With ``ln_mlp=False`` the block rules stand aside and the per-layer rules (LayerNorm, attention) apply inside.
Swin V2 (``SwinTransformerBlockV2``, ``ShiftedWindowAttentionV2``: post-norm, cosine attention with
``logit_scale`` and the ``cpb_mlp`` bias) is left with that reason; its LayerNorms are still swapped.
torchvision is imported only once a module from it is seen.
"""

from __future__ import annotations

from torch import nn

from vitkern.integrations.swap import SwapRule, register_rule
from vitkern.nn.multihead_attention import MultiheadAttention
from vitkern.nn.torchvision_blocks import TorchvisionEncoderBlock, TorchvisionShiftedWindowAttention, \
    TorchvisionSwinBlock
from vitkern.nn.patch_embed import patch_projection_reason
from vitkern.nn.torchvision_embed import TorchvisionSwinPatchEmbed, TorchvisionViTConvProj


def _is_subclass_of(m: nn.Module, submodule: str, name: str) -> bool:
    """``m``'s class derives from torchvision.models.<submodule>.<name> (checked by name: no import)."""
    return any(c.__name__ == name and c.__module__ == f"torchvision.models.{submodule}" for c in type(m).__mro__)


def _forward_reason(m: nn.Module, base: type) -> str | None:
    return f"{type(m).__qualname__} overrides forward()" if type(m).forward is not base.forward else None


# ----------------------------------------------------------------------------------------------- ViT EncoderBlock
def _encoder_block_accepts(m, parent, options):
    if not _is_subclass_of(m, "vision_transformer", "EncoderBlock"):
        return False
    from torchvision.models.vision_transformer import EncoderBlock

    return _forward_reason(m, EncoderBlock) or TorchvisionEncoderBlock.reason(m) or True


def _encoder_block_replace(m, parent, options):
    return TorchvisionEncoderBlock.from_torchvision(m, attention=options.enabled("attention"),
                                                    ln_mlp=options.enabled("ln_mlp"),
                                                    layer_norm=options.enabled("layer_norm"))


# ----------------------------------------------------------------------------------------------- Swin V1
def _swin_block_accepts(m, parent, options):
    if not _is_subclass_of(m, "swin_transformer", "SwinTransformerBlock"):
        return False
    from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2

    if isinstance(m, SwinTransformerBlockV2):
        return "Swin V2 block (post-norm; cosine attention with logit_scale and the cpb_mlp bias) is not fused"
    return _forward_reason(m, SwinTransformerBlock) or TorchvisionSwinBlock.reason(m) or True


def _swin_block_replace(m, parent, options):
    return TorchvisionSwinBlock.from_torchvision(m, window_attention=options.enabled("window_attention"),
                                                 ln_mlp=options.enabled("ln_mlp"),
                                                 layer_norm=options.enabled("layer_norm"))


def _window_attention_accepts(m, parent, options):
    if not _is_subclass_of(m, "swin_transformer", "ShiftedWindowAttention"):
        return False
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    if isinstance(m, ShiftedWindowAttentionV2):
        return "Swin V2 cosine attention (logit_scale, cpb_mlp bias) is not fused"
    return _forward_reason(m, ShiftedWindowAttention) or True


# ----------------------------------------------------------------------------------------------- patch embeddings
def _vit_conv_proj_accepts(m, parent, options):
    if parent is None or getattr(parent, "conv_proj", None) is not m \
            or not _is_subclass_of(parent, "vision_transformer", "VisionTransformer"):
        return False
    from torchvision.models.vision_transformer import Encoder, VisionTransformer

    for owner, base, name in ((parent, VisionTransformer, "forward"), (parent, VisionTransformer, "_process_input"),
                              (parent.encoder, Encoder, "forward")):
        if getattr(type(owner), name) is not getattr(base, name) or name in vars(owner):
            return f"{type(owner).__qualname__}.{name} is overridden: the embedding steps are not where expected"
    if type(m) is not nn.Conv2d:  # its replacement is a Conv2d subclass: a user's own subclass would be dropped
        return f"conv_proj is {type(m).__name__}, not an nn.Conv2d (e.g. a conv stem)"
    return patch_projection_reason(m, "conv_proj") or True


def _swin_stem_accepts(m, parent, options):
    """torchvision Swin's stem, recognised by its layout (its parent is the ``features`` Sequential)."""
    layers = list(m.children()) if type(m) is nn.Sequential else []
    if len(layers) != 3 or type(layers[0]) is not nn.Conv2d or type(layers[1]).__name__ != "Permute" \
            or type(layers[1]).__module__ != "torchvision.ops.misc" or list(layers[1].dims) != [0, 2, 3, 1]:
        return False
    return patch_projection_reason(layers[0], "the stem's Conv2d") or True


register_rule(SwapRule("torchvision.VisionTransformer.conv_proj", ("patch_embed",), _vit_conv_proj_accepts,
                       lambda m, parent, options: TorchvisionViTConvProj.from_torchvision(parent),
                       ops=("patch_embed",), priority=50))
register_rule(SwapRule("torchvision.SwinTransformer.stem", ("patch_embed",), _swin_stem_accepts,
                       lambda m, parent, options: TorchvisionSwinPatchEmbed.from_torchvision(
                           m, layer_norm=options.enabled("layer_norm")),
                       ops=("patch_embed",), priority=50))


# ----------------------------------------------------------------------------------------------- any MHA
def _mha_accepts(m, parent, options):
    if not isinstance(m, nn.MultiheadAttention) or isinstance(m, MultiheadAttention):
        return False
    return _forward_reason(m, nn.MultiheadAttention) or MultiheadAttention.static_reason(m) or True


register_rule(SwapRule("torchvision.EncoderBlock", ("ln_mlp",), _encoder_block_accepts, _encoder_block_replace,
                       ops=("ln_linear", "attention", "ln_mlp"), priority=10))
register_rule(SwapRule("torchvision.SwinTransformerBlock", ("ln_mlp",), _swin_block_accepts, _swin_block_replace,
                       ops=("ln_linear", "window_attention", "ln_mlp"), priority=10))
register_rule(SwapRule("torchvision.ShiftedWindowAttention", ("window_attention",), _window_attention_accepts,
                       lambda m, parent, options: TorchvisionShiftedWindowAttention.from_torchvision(m),
                       ops=("window_attention",)))
register_rule(SwapRule("torch.nn.MultiheadAttention", ("attention",), _mha_accepts,
                       lambda m, parent, options: MultiheadAttention.from_torch(m), ops=("attention",)))
