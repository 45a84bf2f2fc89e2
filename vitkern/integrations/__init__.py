"""Integrations: swap vitkern modules into timm / torchvision / HF / reference models (and back)."""

from vitkern.integrations.fx import fx_leaf_modules
from vitkern.integrations.swap import SwapOptions, SwapReport, SwapRule, optimize, register_rule, restore

__all__ = ["SwapOptions", "SwapReport", "SwapRule", "fx_leaf_modules", "optimize", "register_rule", "restore"]
