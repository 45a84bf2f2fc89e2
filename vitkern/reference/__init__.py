"""Pure-PyTorch reference ViT / DeiT / Swin: the numerical oracle for vitkern's kernels and its CPU fallback.

State_dict keys equal timm's, so `ref.load_state_dict(timm_model.state_dict(), strict=True)` works both ways.
"""
from .cnn_attention import AttentionBlock, CNNAttentionClassifier, ConvStem
from .layers import Attention, LayerScale, Mlp, PatchEmbed, attention_probs, attention_reference, merge_heads, \
    split_heads_qkv
from .registry import create_model, list_models, model_config
from .swin import SwinTransformer, SwinTransformerBlock, WindowAttention, clamp_window_and_shift, \
    relative_position_bias, relative_position_index, shifted_window_mask, window_attention_reference, \
    window_partition, window_reverse
from .vit import Block, VisionTransformer, VisionTransformerDistilled

__all__ = [
    'create_model', 'list_models', 'model_config',
    'VisionTransformer', 'VisionTransformerDistilled', 'Block', 'Attention', 'Mlp', 'LayerScale', 'PatchEmbed',
    'attention_probs', 'attention_reference', 'split_heads_qkv', 'merge_heads',
    'SwinTransformer', 'SwinTransformerBlock', 'WindowAttention',
    'window_partition', 'window_reverse', 'relative_position_index', 'relative_position_bias',
    'shifted_window_mask', 'window_attention_reference', 'clamp_window_and_shift',
    'CNNAttentionClassifier', 'AttentionBlock', 'ConvStem',
]
