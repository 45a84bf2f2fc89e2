"""Op families: backends + torch.library custom ops + autograd. Importing this registers all of them."""

from vitkern.ops import layer_norm  # noqa: F401
