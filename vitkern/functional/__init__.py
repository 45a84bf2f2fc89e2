"""Functional API: validated entry points that reshape arguments and call the custom ops."""

from vitkern.functional.layer_norm import layer_norm

__all__ = ["layer_norm"]
