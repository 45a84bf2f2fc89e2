"""Op families: backends + torch.library custom ops + autograd, one family per module.

Importing this package imports every module in it, which registers each family's backends and custom ops.
"""

from vitkern._discovery import import_submodules

__all__ = import_submodules(__name__, __path__, globals())
