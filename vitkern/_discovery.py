"""Import every public submodule of a package and re-export what each lists in ``__all__``.

Op families are added by dropping a module into vitkern/ops, vitkern/functional and vitkern/nn: no registry list
to edit, so work on different op families never touches a shared file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Iterable


def import_submodules(package: str, path: Iterable[str], namespace: dict[str, Any]) -> list[str]:
    exported: list[str] = []
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for name in getattr(module, "__all__", ()):
            namespace[name] = getattr(module, name)
            exported.append(name)
    return exported
