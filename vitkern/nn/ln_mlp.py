"""``vitkern.nn.LayerNormMlp`` (timm Block's ``norm2`` + ``mlp`` + ``ls2`` + residual) and
``vitkern.nn.LayerNormLinear`` (``norm1`` + ``attn.qkv``).

Submodule names follow timm's so that the parameters are the same objects and state_dicts map key by key:

    LayerNormMlp    norm.{weight,bias} fc1.{weight,bias} act fc2.{weight,bias} ls.gamma (only with layer scale)
    timm Block      norm2.*            mlp.fc1.*          mlp.act mlp.fc2.*     ls2.gamma
    LayerNormLinear norm.*  linear.*
    timm Block      norm1.* attn.qkv.*

``TIMM_KEYS`` holds that prefix map; ``timm_state_dict()`` / ``load_timm_state_dict()`` convert, and
``from_timm_block(block)`` builds a module sharing the block's parameters (no copy).
Note that ``LayerNormMlp.forward`` includes the residual: it computes ``x + ls(mlp(norm(x)))``, the whole second
half of a pre-norm block (timm: ``x = x + drop_path2(ls2(mlp(norm2(x))))`` with drop_path 0).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from vitkern.functional.ln_mlp import ln_linear, ln_mlp
from vitkern.nn.layer_norm import LayerNorm, layer_norm_reason

__all__ = ["LayerNormMlp", "LayerNormLinear"]

TIMM_LN_EPS = 1e-6  # timm's LayerNorm default (ViT/DeiT)


class _LayerScale(nn.Module):
    """timm's LayerScale parameter layout (``gamma`` [dim]); applied inside the fused op."""

    def __init__(self, dim: int, init_values: float, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device, dtype=dtype))


class _TimmKeys:
    TIMM_KEYS: Mapping[str, str] = {}

    def timm_state_dict(self) -> dict[str, Tensor]:
        """This module's state_dict under the timm Block's keys (e.g. ``fc1.weight`` -> ``mlp.fc1.weight``)."""
        out = {}
        for key, value in self.state_dict().items():  # type: ignore[attr-defined]
            head, _, rest = key.partition(".")
            out[f"{self.TIMM_KEYS[head]}.{rest}"] = value
        return out

    def load_timm_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> Any:
        """Load from a timm Block's state_dict (extra keys of the block, e.g. the attention's, are ignored)."""
        back = {v: k for k, v in self.TIMM_KEYS.items()}
        mine = {}
        for key, value in state_dict.items():
            for timm_prefix, prefix in back.items():
                if key.startswith(timm_prefix + "."):
                    mine[prefix + key[len(timm_prefix):]] = value
        return self.load_state_dict(mine, strict=strict)  # type: ignore[attr-defined]


# Pre-norm blocks whose halves are exactly x + ls2(mlp(norm2(x))) and attn.qkv(norm1(x)). Blocks of the same
# submodule names can do other math (timm's ResPostBlock normalises after the MLP; EVA and BEiT scale the branch by
# gamma_2 and add q_bias / v_bias to a bias-free qkv), so only these classes are taken, exactly.
_PRE_NORM_BLOCKS = {
    ("timm.models.vision_transformer", "Block"), ("timm.models.swin_transformer", "SwinTransformerBlock"),
    ("vitkern.reference.vit", "Block"), ("vitkern.reference.swin", "SwinTransformerBlock"),
}


def _check_block_class(block: nn.Module) -> None:
    cls = type(block)
    _check((cls.__module__, cls.__qualname__) in _PRE_NORM_BLOCKS,
           f"block must be a timm (or vitkern.reference) ViT Block or SwinTransformerBlock, got {cls.__qualname__} "
           f"from {cls.__module__} (a block of another class may compute other math with the same submodules)")


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"from_timm_block: {what}")


def _shared_norm(norm: nn.Module, name: str) -> LayerNorm:
    reason = layer_norm_reason(norm, f"block.{name}")
    _check(reason is None, f"{reason}: the fused op computes a LayerNorm over the last dim")
    return LayerNorm.from_torch(norm)


class LayerNormMlp(_TimmKeys, nn.Module):
    """``x + ls.gamma · fc2(GELU(fc1(norm(x))))`` as one fused op (``vitkern.functional.ln_mlp``)."""

    TIMM_KEYS = {"norm": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "ls": "ls2"}

    def __init__(self, in_features: int, hidden_features: int | None = None, approximate: str = "none",
                 bias: bool = True, eps: float = TIMM_LN_EPS, init_values: float | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        hidden = hidden_features or 4 * in_features
        self.norm = LayerNorm(in_features, eps=eps, **kw)
        self.fc1 = nn.Linear(in_features, hidden, bias=bias, **kw)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, in_features, bias=bias, **kw)
        self.ls = _LayerScale(in_features, init_values, **kw) if init_values is not None else None

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.ls.gamma if self.ls is not None else None
        return ln_mlp(x, self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                      self.fc2.bias, gamma, self.norm.eps, self.act.approximate)

    @classmethod
    def from_timm_block(cls, block: nn.Module) -> "LayerNormMlp":
        """The MLP half of a timm ViT ``Block`` (norm2, mlp, ls2), sharing its parameters."""
        _check_block_class(block)
        mlp = block.mlp
        _check(all(hasattr(mlp, n) for n in ("fc1", "act", "fc2")), "block.mlp must be a timm Mlp (fc1, act, fc2)")
        _check(isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear), "mlp.fc1/fc2 must be nn.Linear")
        _check(type(mlp.act) is nn.GELU, f"mlp.act must be nn.GELU, got {type(mlp.act).__name__}")
        _check(isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity), "mlp.norm must be Identity")
        for name in ("drop1", "drop2"):
            drop = getattr(mlp, name, None)
            _check(drop is None or isinstance(drop, nn.Identity) or getattr(drop, "p", 0.0) == 0.0,
                   f"mlp.{name} has dropout > 0 (not fused)")
        _check(isinstance(getattr(block, "drop_path2", nn.Identity()), nn.Identity), "block.drop_path2 must be Identity")
        ls = getattr(block, "ls2", None)
        _check(ls is None or isinstance(ls, nn.Identity) or hasattr(ls, "gamma"), "block.ls2 must be LayerScale")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.norm = _shared_norm(block.norm2, "norm2")
        new.fc1, new.act, new.fc2 = mlp.fc1, mlp.act, mlp.fc2
        new.ls = ls if ls is not None and hasattr(ls, "gamma") else None
        new.train(block.training)
        return new


class LayerNormLinear(_TimmKeys, nn.Module):
    """``linear(norm(x))`` as one fused GEMM (``vitkern.functional.ln_linear``): timm's ``norm1`` + ``attn.qkv``."""

    TIMM_KEYS = {"norm": "norm1", "linear": "attn.qkv"}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = TIMM_LN_EPS, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.norm = LayerNorm(in_features, eps=eps, device=device, dtype=dtype)
        self.linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return ln_linear(x, self.norm.weight, self.norm.bias, self.linear.weight, self.linear.bias, self.norm.eps)

    @classmethod
    def from_timm_block(cls, block: nn.Module) -> "LayerNormLinear":
        """``norm1`` + ``attn.qkv`` of a timm ViT ``Block``, sharing its parameters."""
        _check_block_class(block)
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        _check(isinstance(qkv, nn.Linear), "block.attn.qkv must be nn.Linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.norm = _shared_norm(block.norm1, "norm1")
        new.linear = qkv
        new.train(block.training)
        return new
