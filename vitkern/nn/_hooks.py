"""When a fused path must call submodules instead of computing their outputs from their parameters.

A fused block computes some submodules' outputs without calling them (norm + qkv in one GEMM, proj + residual in
another, norm + MLP), reading their weights. That is only the same model while

- no hook sits on them: a forward / backward (pre-)hook (feature extraction, activation statistics, profilers,
  HF's output capturing) would silently not run; and
- each Linear whose weight is read is still exactly ``nn.Linear``: a LoRA adapter or a quantized layer put in
  after ``optimize`` (e.g. by PEFT, which replaces ``attn.qkv`` by a wrapper whose ``weight`` is the frozen base
  weight) computes more than its weight says.

So each fused half first asks :func:`must_call`; if so it calls the submodules as the original block does (slower,
the same numbers, the hook fires, the adapter applies).
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn
from torch.nn.modules import module as _torch_module

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# every per-module hook container (the *_with_kwargs / always_called ones are keyed by the same hook ids)
_ALL_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                   "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def has_own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has a forward or backward (pre-)hook (global hooks not counted)."""
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def share_hooks(original: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` (built to replace ``original``, at the top of a swap or inside a fused block) ``original``'s
    hook dicts, the very same objects: hooks registered before the swap fire on the replacement, and
    :func:`must_call` sees them, so a fused path that would bypass the module calls it instead. Returns ``new``."""
    if new is not original:
        for name in _ALL_HOOK_DICTS:
            hooks = getattr(original, name, None)
            if hooks and not getattr(new, name, None):
                setattr(new, name, hooks)
    return new


def _hooked(modules: Iterable[Optional[nn.Module]], ignoring: tuple[str, ...]) -> bool:
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


def must_call(*modules: Optional[nn.Module], linears: tuple[nn.Module, ...] = (),
              ignoring: tuple[str, ...] = ()) -> bool:
    """Whether a fused path must call ``modules`` and ``linears`` (None entries skipped): one of them has a hook,
    a global module hook is set, or one of ``linears`` (whose weights the fused op reads) is not exactly
    ``nn.Linear``. Hooks defined in a module named in ``ignoring`` (a library's hooks that are inert in the
    caller's situation) do not count."""
    return any(type(m) is not nn.Linear for m in linears) or _hooked((*modules, *linears), ignoring)


def mlp_must_call(norm: nn.Module, mlp: nn.Module, fc1: nn.Module, fc2: nn.Module, *more: Optional[nn.Module],
                  ignoring: tuple[str, ...] = ()) -> bool:
    """:func:`must_call` for the MLP half of a pre-norm block (``x + more(mlp(norm(x)))``): the norm, the MLP and
    all its layers (act, dropouts), its two Linears, and e.g. a layer scale."""
    return must_call(norm, mlp, *mlp.children(), *more, linears=(fc1, fc2), ignoring=ignoring)
