"""Model names (as in timm) -> reference model class and constructor arguments.

The arguments reproduce what `timm.create_model(name, pretrained=False)` builds, including the defaults timm
takes from the model's default pretrained config (img_size, num_classes), so state_dicts match key for key.
"""
import fnmatch
from typing import Any, Dict, List, Tuple, Type

import torch.nn as nn

from .swin import SwinTransformer
from .vit import VisionTransformer, VisionTransformerDistilled


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, **extra: Any) -> Dict[str, Any]:
    return dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **extra)


def _swin(window_size: int, embed_dim: int, depths: Tuple[int, ...], num_heads: Tuple[int, ...],
          **extra: Any) -> Dict[str, Any]:
    return dict(patch_size=4, window_size=window_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                **extra)


_DEIT3 = dict(no_embed_class=True, init_values=1e-6)  # DeiT-III: no pos-embed on the class token, layer scale

_MODELS: Dict[str, Tuple[Type[nn.Module], Dict[str, Any]]] = {
    # ViT (Dosovitskiy et al.); head_dim is 64 except ViT-H/14 (1280 / 16 = 80)
    'vit_tiny_patch16_224': (VisionTransformer, _vit(16, 192, 12, 3)),
    'vit_small_patch16_224': (VisionTransformer, _vit(16, 384, 12, 6)),
    'vit_base_patch16_224': (VisionTransformer, _vit(16, 768, 12, 12)),
    'vit_large_patch16_224': (VisionTransformer, _vit(16, 1024, 24, 16)),
    'vit_large_patch16_384': (VisionTransformer, _vit(16, 1024, 24, 16, img_size=384)),
    # timm's default weights for ViT-H/14 are the headless in21k ones, so it is built with num_classes=0
    'vit_huge_patch14_224': (VisionTransformer, _vit(14, 1280, 32, 16, num_classes=0)),
    # DeiT: same architecture as ViT
    'deit_tiny_patch16_224': (VisionTransformer, _vit(16, 192, 12, 3)),
    'deit_small_patch16_224': (VisionTransformer, _vit(16, 384, 12, 6)),
    'deit_base_patch16_224': (VisionTransformer, _vit(16, 768, 12, 12)),
    'deit_base_patch16_384': (VisionTransformer, _vit(16, 768, 12, 12, img_size=384)),
    'deit_tiny_distilled_patch16_224': (VisionTransformerDistilled, _vit(16, 192, 12, 3)),
    'deit_small_distilled_patch16_224': (VisionTransformerDistilled, _vit(16, 384, 12, 6)),
    'deit_base_distilled_patch16_224': (VisionTransformerDistilled, _vit(16, 768, 12, 12)),
    'deit_base_distilled_patch16_384': (VisionTransformerDistilled, _vit(16, 768, 12, 12, img_size=384)),
    'deit3_small_patch16_224': (VisionTransformer, _vit(16, 384, 12, 6, **_DEIT3)),
    'deit3_small_patch16_384': (VisionTransformer, _vit(16, 384, 12, 6, img_size=384, **_DEIT3)),
    'deit3_medium_patch16_224': (VisionTransformer, _vit(16, 512, 12, 8, **_DEIT3)),
    'deit3_base_patch16_224': (VisionTransformer, _vit(16, 768, 12, 12, **_DEIT3)),
    'deit3_base_patch16_384': (VisionTransformer, _vit(16, 768, 12, 12, img_size=384, **_DEIT3)),
    'deit3_large_patch16_224': (VisionTransformer, _vit(16, 1024, 24, 16, **_DEIT3)),
    'deit3_large_patch16_384': (VisionTransformer, _vit(16, 1024, 24, 16, img_size=384, **_DEIT3)),
    'deit3_huge_patch14_224': (VisionTransformer, _vit(14, 1280, 32, 16, **_DEIT3)),
    # Swin V1
    'swin_tiny_patch4_window7_224': (SwinTransformer, _swin(7, 96, (2, 2, 6, 2), (3, 6, 12, 24))),
    'swin_small_patch4_window7_224': (SwinTransformer, _swin(7, 96, (2, 2, 18, 2), (3, 6, 12, 24))),
    'swin_base_patch4_window7_224': (SwinTransformer, _swin(7, 128, (2, 2, 18, 2), (4, 8, 16, 32))),
    'swin_base_patch4_window12_384': (SwinTransformer, _swin(12, 128, (2, 2, 18, 2), (4, 8, 16, 32), img_size=384)),
    'swin_large_patch4_window7_224': (SwinTransformer, _swin(7, 192, (2, 2, 18, 2), (6, 12, 24, 48))),
    'swin_large_patch4_window12_384': (SwinTransformer, _swin(12, 192, (2, 2, 18, 2), (6, 12, 24, 48),
                                                              img_size=384)),
}


def list_models(pattern: str = '*') -> List[str]:
    """Registered model names matching a shell-style pattern, e.g. list_models('swin_*')."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_config(name: str) -> Dict[str, Any]:
    """The constructor arguments `name` stands for (a copy), e.g. to build the matching timm model."""
    if name not in _MODELS:
        raise ValueError(f'unknown model {name!r}; known: {", ".join(list_models())}')
    return dict(_MODELS[name][1])


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a reference model by its timm name; keyword arguments override the config (e.g. img_size=32).

    There are no pretrained weights here: load a timm state_dict instead (keys are identical).
    """
    if pretrained:
        raise ValueError('vitkern.reference has no pretrained weights; load a timm state_dict with strict=True')
    config = model_config(name)  # raises for unknown names
    return _MODELS[name][0](**{**config, **overrides})


__all__ = ['list_models', 'model_config', 'create_model']
