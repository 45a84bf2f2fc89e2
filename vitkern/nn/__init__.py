"""Drop-in modules with the constructor arguments and state_dict keys of the modules they replace."""

from vitkern.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm"]
