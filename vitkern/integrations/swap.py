"""Swap vitkern modules into an existing model (and back), keeping parameters and state_dict keys unchanged.

Each integration module (``torch_nn``, ``timm_models``, ``torchvision_models``, ``hf_models``; ``timm_models`` also
covers ``vitkern.reference``, which has timm's structure) registers :class:`SwapRule` s: which modules a rule
replaces, and with what. :func:`optimize` walks the model from the root; at each submodule the rules are tried in
priority order (block-level rules first), the first that accepts it replaces it with a module that *shares* the
original's parameters (training after the swap updates the same tensors), and the walk does not descend into a
replaced module (the replacement owns that subtree). A rule that declines with a reason is listed in the report, and
the walk goes on into the children, so a block that cannot be fused as a whole still gets its LayerNorms and
attention swapped one by one. :func:`restore` undoes everything.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from typing import Callable, Optional

from torch import nn

from vitkern import dispatch
from vitkern.integrations import fx
from vitkern.nn._hooks import share_hooks

# Op families a user can switch on or off; each rule belongs to one or more of them.
FAMILIES = ("layer_norm", "attention", "ln_mlp", "patch_embed", "window_attention")


@dataclasses.dataclass(frozen=True)
class SwapOptions:
    """Which op families :func:`optimize` may swap in (all by default)."""

    layer_norm: bool = True
    attention: bool = True
    ln_mlp: bool = True
    patch_embed: bool = True
    window_attention: bool = True

    def __post_init__(self) -> None:
        for name in FAMILIES:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"vitkern.optimize: {name} must be True or False, got {value!r}")

    def enabled(self, family: str) -> bool:
        return getattr(self, family)


@dataclasses.dataclass(frozen=True)
class SwapRule:
    """How one kind of module is replaced.

    ``accepts(module, parent, options)`` returns True (swap it), False (not this rule's kind of module) or a string
    (this rule's kind, left alone for that reason). ``replace(module, parent, options)`` returns the replacement;
    it must share ``module``'s parameters and keep its state_dict keys. A replacement that also patched something
    outside itself (e.g. a method of its parent) undoes that in a ``_vitkern_undo(parent, original)`` method, called
    by restore with the module that holds it and the module it replaced (no back references: a deep copy of an
    optimized model restores on its own).
    ``families``: the rule runs when any of them is enabled; ``ops``: the vitkern ops its replacement calls.
    """

    name: str
    families: tuple[str, ...]
    accepts: Callable[[nn.Module, Optional[nn.Module], SwapOptions], "bool | str"]
    replace: Callable[[nn.Module, Optional[nn.Module], SwapOptions], nn.Module]
    ops: tuple[str, ...] = ()
    priority: int = 100  # lower is tried first: whole blocks (10) before single layers (100)

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"SwapRule {self.name!r}: unknown families {sorted(unknown)}; known: {FAMILIES}")


_RULES: list[SwapRule] = []
_RULE_MODULES = ("torch_nn", "timm_models", "torchvision_models", "hf_models")


def register_rule(rule: SwapRule) -> SwapRule:
    """Add a rule (replacing one of the same name)."""
    _RULES[:] = [r for r in _RULES if r.name != rule.name] + [rule]
    _RULES.sort(key=lambda r: r.priority)  # stable: registration order within a priority
    return rule


def rules() -> list[SwapRule]:
    for name in _RULE_MODULES:  # each registers its rules on import; missing optional libraries are checked lazily
        importlib.import_module(f"vitkern.integrations.{name}")
    return list(_RULES)


@dataclasses.dataclass
class Swapped:
    path: str
    rule: str
    original: str  # type name of the module that was replaced
    replacement: str  # type name of the vitkern module now in its place
    ops: tuple[str, ...]
    backends: dict[str, str]  # op -> backend preferred on the model's device (shape permitting)


@dataclasses.dataclass
class SwapReport:
    swapped: list[Swapped]
    left: list[tuple[str, str, str]]  # (module path, rule, reason)

    def count(self, rule_prefix: str = "") -> int:
        return sum(s.rule.startswith(rule_prefix) for s in self.swapped)

    def __str__(self) -> str:
        lines = [f"vitkern.optimize: swapped {len(self.swapped)} module(s)"]
        for s in self.swapped:
            be = ", ".join(f"{op}: {b}" for op, b in s.backends.items())
            lines.append(f"  {s.path}: {s.original} -> {s.replacement} (rule {s.rule})" + (f"  [{be}]" if be else ""))
        if self.left:
            lines.append(f"left unchanged: {len(self.left)}")
            lines += [f"  {path or '<model>'} ({rule}): {why}" for path, rule, why in self.left]
        lines.append("backends are chosen per call (shape, dtype, device): vitkern.explain(...) says which and why")
        return "\n".join(lines)


def preferred_backend(op: str, device: str) -> str:
    """The first backend of ``op`` that can run on ``device`` in this process; shape checks happen per call."""
    for backend in dispatch._order(op, device):
        if backend.availability() is None:
            return backend.name
    return "none available"


_ORIGINALS_ATTR = "_vitkern_originals"


def _model_device(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


def optimize(model: nn.Module, *, layer_norm: bool = True, attention: bool = True, ln_mlp: bool = True,
             patch_embed: bool = True, window_attention: bool = True, **unknown: object) -> SwapReport:
    """Replace supported submodules of ``model`` in place with vitkern modules; undo with :func:`restore`.

    Each keyword switches one op family on or off. Parameters, buffers and state_dict keys are unchanged (the new
    modules share the original tensors). Returns a :class:`SwapReport`: what was swapped (with the backend each op
    prefers on the model's device), and what was left and why.
    """
    if unknown:  # name the switches that exist (a typo must not read as "switched off")
        raise TypeError(f"vitkern.optimize: unknown option(s) {sorted(unknown)}; the op-family switches are "
                        f"{', '.join(FAMILIES)} (True / False)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"vitkern.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    options = SwapOptions(layer_norm=layer_norm, attention=attention, ln_mlp=ln_mlp, patch_embed=patch_embed,
                          window_attention=window_attention)
    active = [r for r in rules() if any(options.enabled(f) for f in r.families)]
    originals: dict[str, nn.Module] = getattr(model, _ORIGINALS_ATTR, {})
    report = SwapReport([], [])
    device = _model_device(model)

    def visit(path: str, module: nn.Module, parent: Optional[nn.Module]) -> None:
        if type(module).__module__.startswith("vitkern.nn"):  # swapped before: it owns its subtree (the plain
            return                                            # layers it keeps, it keeps on purpose)
        for rule in active:
            verdict = rule.accepts(module, parent, options)
            if verdict is True:
                new = rule.replace(module, parent, options)
                if parent is None:
                    raise ValueError(f"vitkern.optimize: rule {rule.name} would replace the model itself; "
                                     "call it on the model's parent or use the replacement module directly")
                share_hooks(module, new)  # feature extractors', profilers' hooks fire on the replacement
                setattr(parent, path.rpartition(".")[2], new)
                originals.setdefault(path, module)  # a second optimize() keeps the very first original
                ops = getattr(new, "vitkern_ops", rule.ops)
                report.swapped.append(Swapped(path, rule.name, type(module).__qualname__,
                                              f"{type(new).__module__}.{type(new).__qualname__}", tuple(ops),
                                              {op: preferred_backend(op, device) for op in ops}))
                return
            if isinstance(verdict, str):
                report.left.append((path, rule.name, verdict))
        for name, child in list(module.named_children()):
            visit(f"{path}.{name}" if path else name, child, module)

    visit("", model, None)
    object.__setattr__(model, _ORIGINALS_ATTR, originals)  # plain attribute: not a submodule, not in state_dict
    fx.register_with_timm(model)  # timm's FX feature extraction traces vitkern modules as leaves
    return report


def _hand_back_tensors(replacement: nn.Module, original: nn.Module) -> None:
    """Parameters and persistent buffers the replacement holds now (``load_state_dict(assign=True)``, ``to_empty()``,
    a user's assignment) go back into the original under the same path: restore must not bring back the tensors the
    swap started from. Non-persistent buffers are the modules' own (not part of the state_dict contract)."""
    targets = dict(original.named_modules(remove_duplicate=False))
    for path, sub in replacement.named_modules(remove_duplicate=False):
        target = targets.get(path)
        if target is None or target is sub:
            continue
        for name, t in sub._parameters.items():
            if t is not None and name in target._parameters and target._parameters[name] is not t:
                target._parameters[name] = t
        for name, t in sub._buffers.items():
            if (t is not None and name in target._buffers and target._buffers[name] is not t
                    and name not in sub._non_persistent_buffers_set):
                target._buffers[name] = t


def _follow_replacement_state(replacement: nn.Module, original: nn.Module) -> None:
    """What ``model.train()`` / ``.eval()`` / ``.to()`` / ``.half()`` did while the original was out of the model:
    its modules that the replacement did not share take the replacement's training flag (the module at the same
    path, else the replacement's own), and its non-persistent buffers (timm Swin's ``attn_mask``) follow the
    replacement's device and floating dtype, or are the replacement's buffer of the same path, name and shape."""
    mirrors = dict(replacement.named_modules(remove_duplicate=False))
    shared = {id(m) for m in mirrors.values()}
    for path, target in original.named_modules(remove_duplicate=False):
        if id(target) in shared:
            continue
        mirror = mirrors.get(path)
        target.training = (mirror or replacement).training
        for name in target._non_persistent_buffers_set:
            buf, theirs = target._buffers.get(name), mirror._buffers.get(name) if mirror is not None else None
            if buf is None:
                continue
            if theirs is not None and theirs.shape == buf.shape:
                target._buffers[name] = theirs
                continue
            params = itertools.chain(mirror.parameters() if mirror is not None else (), replacement.parameters())
            like = next((p for p in params if p.is_floating_point()), None)
            if like is not None:
                target._buffers[name] = buf.to(device=like.device,
                                               dtype=like.dtype if buf.is_floating_point() else buf.dtype)


def restore(model: nn.Module) -> int:
    """Put back every module :func:`optimize` replaced (outermost first), holding the tensors the model holds now;
    returns how many."""
    originals: dict[str, nn.Module] = getattr(model, _ORIGINALS_ATTR, {})
    for path in sorted(originals, key=lambda p: p.count(".")):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        current = getattr(parent, name)
        undo = getattr(current, "_vitkern_undo", None)
        if undo is not None:
            undo(parent, originals[path])
        _hand_back_tensors(current, originals[path])
        _follow_replacement_state(current, originals[path])
        setattr(parent, name, originals[path])
    count = len(originals)
    if hasattr(model, _ORIGINALS_ATTR):
        object.__delattr__(model, _ORIGINALS_ATTR)
    return count


__all__ = ["FAMILIES", "SwapOptions", "SwapRule", "SwapReport", "Swapped", "optimize", "restore", "register_rule",
           "rules", "preferred_backend"]
