"""Drop-in modules with the constructor arguments and state_dict keys of the modules they replace.

Each module's ``__all__`` is re-exported here (``vitkern.nn.LayerNorm``, ...).
"""

from vitkern._discovery import import_submodules

__all__ = import_submodules(__name__, __path__, globals())
