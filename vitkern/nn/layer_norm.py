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

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> "LayerNorm":
        """A vitkern LayerNorm sharing ``module``'s parameters (no copy), for swapping into a model."""
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
