"""Swap rules for plain ``torch.nn`` layers found in any model: ``nn.LayerNorm`` (and timm's LayerNorm subclass)."""

from __future__ import annotations

from vitkern.integrations.swap import SwapRule, register_rule
from vitkern.nn.layer_norm import LayerNorm as VitkernLayerNorm

register_rule(SwapRule("torch.nn.LayerNorm", ("layer_norm",),
                       lambda m, parent, options: VitkernLayerNorm.accepts_torch(m),
                       lambda m, parent, options: VitkernLayerNorm.from_torch(m), ops=("layer_norm",)))
