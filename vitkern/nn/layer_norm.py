"""``vitkern.nn.LayerNorm``: drop-in for ``torch.nn.LayerNorm`` (same signature, parameters and state_dict)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern.functional.layer_norm import layer_norm
from vitkern.nn._hooks import share_hooks

__all__ = ["LayerNorm", "computes_layer_norm", "layer_norm_reason"]

# torch.nn.LayerNorm subclasses whose forward is F.layer_norm with the module's own arguments (timm's LayerNorm may
# call its fast_layer_norm instead: the same math). Any other subclass that overrides forward is not ours to compute:
# timm's LayerNorm2d normalises the channels of NCHW maps, LayerNormAct adds an activation, LayerNormFp32 returns
# the input dtype under autocast where torch's returns fp32.
_SAME_MATH_SUBCLASSES = {("timm.layers.norm", "LayerNorm")}


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
        cls = type(module)
        if cls.forward is not torch.nn.LayerNorm.forward and (cls.__module__, cls.__qualname__) not in _SAME_MATH_SUBCLASSES:
            return f"{cls.__qualname__} overrides forward()"
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
        return share_hooks(module, new)


def computes_layer_norm(module: torch.nn.Module) -> bool:
    """True when ``module``'s forward is F.layer_norm(x, normalized_shape, weight, bias, eps), so a fused op may
    compute it from those attributes: a torch LayerNorm, a subclass of the same math, or a vitkern LayerNorm."""
    return isinstance(module, LayerNorm) or LayerNorm.accepts_torch(module) is True


def layer_norm_reason(norm: torch.nn.Module, name: str) -> Optional[str]:
    """Why ``norm`` (called ``name`` in messages) is not a LayerNorm over the last dim that a fused op can compute
    from its weight and bias (None: it is)."""
    if not isinstance(norm, torch.nn.LayerNorm):
        return f"{name} is {type(norm).__name__}, not a LayerNorm"
    if not computes_layer_norm(norm):
        return f"{name} ({type(norm).__qualname__}) overrides forward()"
    if len(norm.normalized_shape) != 1:
        return f"{name} normalizes over {len(norm.normalized_shape)} dims, not the last dim only"
    return None
