"""Swap vitkern modules into an existing model (and back), keeping parameters and state_dict keys unchanged.

Each op family contributes a :class:`SwapRule` (which modules it replaces and how). :func:`optimize` walks the
model once, replaces every module a rule accepts with a module that *shares* the original's parameters (so
training after the swap updates the same tensors), and returns a report; :func:`restore` puts the originals back.
Model-family rules (timm / torchvision / HF attention, Swin blocks, patch embedding) join this list as their
kernels land.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from vitkern.nn.attention import Attention as VitkernAttention
from vitkern.nn.layer_norm import LayerNorm as VitkernLayerNorm


@dataclasses.dataclass(frozen=True)
class SwapRule:
    op: str
    # True: swap it; False: not this rule's kind of module; a string: this rule's kind, left alone for that reason
    accepts: Callable[[nn.Module], bool | str]
    replace: Callable[[nn.Module], nn.Module]


def _layer_norm_accepts(m: nn.Module) -> bool | str:
    if not isinstance(m, nn.LayerNorm) or isinstance(m, VitkernLayerNorm):
        return False
    # subclasses must not change the math; timm's LayerNorm only changes *how* F.layer_norm is called
    if type(m).forward is not nn.LayerNorm.forward and type(m).__module__.split(".")[0] not in ("timm",):
        return f"{type(m).__qualname__} overrides forward()"
    return True


RULES: list[SwapRule] = [
    SwapRule("layer_norm", _layer_norm_accepts, VitkernLayerNorm.from_torch),
    SwapRule("attention", VitkernAttention.accepts_timm, VitkernAttention.from_timm),  # timm's Attention
]


@dataclasses.dataclass
class SwapReport:
    swapped: list[tuple[str, str, str]]  # (module path, op, original type)
    left: list[tuple[str, str, str]]  # (module path, op, reason)

    def __str__(self) -> str:
        lines = [f"vitkern.optimize: swapped {len(self.swapped)} module(s)"]
        lines += [f"  {path}: {orig} -> vitkern ({op})" for path, op, orig in self.swapped]
        if self.left:
            lines.append(f"left unchanged: {len(self.left)}")
            lines += [f"  {path} ({op}): {why}" for path, op, why in self.left]
        lines.append("backends are chosen per call: see vitkern.explain(...)")
        return "\n".join(lines)


_ORIGINALS_ATTR = "_vitkern_originals"


def optimize(model: nn.Module, *, layer_norm: bool = True, attention: bool = True) -> SwapReport:
    """Replace supported submodules of ``model`` in place with vitkern modules. Undo with :func:`restore`.

    Each keyword switches one op family's swaps on or off.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vitkern.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {"layer_norm": layer_norm, "attention": attention}
    originals: dict[str, nn.Module] = getattr(model, _ORIGINALS_ATTR, {})
    report = SwapReport([], [])
    for path, module in list(model.named_modules()):
        if not path:
            continue
        for rule in RULES:
            if not enabled.get(rule.op, False):
                continue
            verdict = rule.accepts(module)
            if verdict is True and path not in originals:  # a module is swapped once, by the first rule that takes it
                parent_path, _, name = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, name, rule.replace(module))
                originals[path] = module
                report.swapped.append((path, rule.op, type(module).__qualname__))
                break
            if isinstance(verdict, str):
                report.left.append((path, rule.op, verdict))
    object.__setattr__(model, _ORIGINALS_ATTR, originals)  # plain attribute: not a submodule, not in state_dict
    return report


def restore(model: nn.Module) -> int:
    """Put back every module :func:`optimize` replaced; returns how many."""
    originals: dict[str, nn.Module] = getattr(model, _ORIGINALS_ATTR, {})
    for path, module in originals.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, module)
    count = len(originals)
    if hasattr(model, _ORIGINALS_ATTR):
        object.__delattr__(model, _ORIGINALS_ATTR)
    return count


__all__ = ["SwapRule", "SwapReport", "optimize", "restore", "RULES"]
