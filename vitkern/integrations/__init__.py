"""Integrations: swap vitkern modules into timm / torchvision / HF / reference models."""

from vitkern.integrations.swap import SwapReport, optimize, restore

__all__ = ["SwapReport", "optimize", "restore"]
