"""``vitkern.nn.LayerNorm``: drop-in for ``torch.nn.LayerNorm`` (same signature, parameters and state_dict)."""

from __future__ import annotations

import torch
from torch import Tensor

from vitkern.functional.layer_norm import layer_norm

__all__ = ["LayerNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """A ``torch.nn.LayerNorm`` whose forward runs the vitkern op (so ``isinstance(m, nn.LayerNorm)`` still holds).

    ``forward(x, residual=None)``: with ``residual`` returns ``(norm(x + residual), x + residual)`` from one
    fused pass.
    """

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)

    @staticmethod
    def accepts_torch(module: torch.nn.Module) -> bool | str:
        """For swaps: True for a torch LayerNorm this module computes exactly, a reason for a subclass whose forward
        may differ, False for anything else (including a vitkern LayerNorm)."""
        if not isinstance(module, torch.nn.LayerNorm) or isinstance(module, LayerNorm):
            return False
        # subclasses must not change the math; timm's LayerNorm only changes *how* F.layer_norm is called
        if type(module).forward is not torch.nn.LayerNorm.forward and type(module).__module__.split(".")[0] != "timm":
            return f"{type(module).__qualname__} overrides forward()"
        return True

    @classmethod
    def swap_in(cls, module: torch.nn.Module) -> torch.nn.Module:
        """A vitkern LayerNorm sharing ``module``'s parameters if :meth:`accepts_torch` takes it, else ``module``."""
        return cls.from_torch(module) if cls.accepts_torch(module) is True else module

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> "LayerNorm":
        """A vitkern LayerNorm sharing ``module``'s parameters (no copy), for swapping into a model."""
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
