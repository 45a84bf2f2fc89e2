"""Swap rules for plain ``torch.nn`` layers found in any model: ``nn.LayerNorm`` (and timm's LayerNorm subclass)."""

from __future__ import annotations

from torch import nn

from vitkern.integrations.swap import SwapRule, register_rule
from vitkern.nn.layer_norm import LayerNorm as VitkernLayerNorm


def _layer_norm_accepts(m: nn.Module, parent, options) -> bool | str:
    if not isinstance(m, nn.LayerNorm) or isinstance(m, VitkernLayerNorm):
        return False
    # subclasses must not change the math; timm's LayerNorm only changes *how* F.layer_norm is called
    if type(m).forward is not nn.LayerNorm.forward and type(m).__module__.split(".")[0] != "timm":
        return f"{type(m).__qualname__} overrides forward()"
    return True


register_rule(SwapRule("torch.nn.LayerNorm", ("layer_norm",), _layer_norm_accepts,
                       lambda m, parent, options: VitkernLayerNorm.from_torch(m), ops=("layer_norm",)))
