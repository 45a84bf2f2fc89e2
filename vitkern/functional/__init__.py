"""Functional API: validated entry points that reshape arguments and call the custom ops.

Each module's ``__all__`` is re-exported here (``vitkern.functional.layer_norm``, ...).
"""

from vitkern._discovery import import_submodules

__all__ = import_submodules(__name__, __path__, globals())
