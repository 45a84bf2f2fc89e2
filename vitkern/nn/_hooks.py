"""Hooks and fused paths: a fused block computes some submodules' outputs without calling them (norm + qkv in one
GEMM, proj + residual in another), which would silently skip a hook registered on one of them (feature extraction,
activation statistics, profilers, HF's output capturing). So each fused half first asks :func:`hooked`; with a hook
in the way it calls the submodules as the original block does (slower, same numbers, the hook fires).
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.nn.modules import module as _torch_module

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def hooked(*modules: Optional[nn.Module], ignoring: tuple[str, ...] = ()) -> bool:
    """Whether calling ``modules`` (None entries skipped) would run a hook: a forward / backward (pre-)hook on one
    of them, or a global module hook. Hooks defined in a module named in ``ignoring`` (e.g. a library's hooks that
    are inert in the caller's situation) do not count."""
    if (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
            or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks):
        return True
    for m in modules:
        if m is None:
            continue
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks and any(getattr(h, "__module__", None) not in ignoring for h in hooks.values()):
                return True
    return False


def mlp_half_hooked(norm: nn.Module, mlp: nn.Module, *more: Optional[nn.Module], ignoring: tuple[str, ...] = ()) -> bool:
    """:func:`hooked` for the MLP half of a pre-norm block (``x + more(mlp(norm(x)))``): the norm, the MLP and its
    layers (fc1, act, dropouts, fc2), and e.g. a layer scale."""
    return hooked(norm, mlp, *mlp.children(), *more, ignoring=ignoring)
