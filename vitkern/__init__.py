"""vitkern: fused Triton / CUDA C++ kernels for Vision Transformers.

Layers: kernels (vitkern.kernels) -> ops (vitkern.ops: custom ops + autograd + backends) -> functional
(vitkern.functional) -> modules (vitkern.nn) -> integrations. vitkern.reference holds the pure-PyTorch
ViT / DeiT / Swin oracle models.
"""

from vitkern.version import __version__
from vitkern.dispatch import BackendError, explain, use_backend
from vitkern import functional, nn  # noqa: E402  (registers the custom ops)
from vitkern.integrations import optimize, restore

__all__ = ["__version__", "BackendError", "explain", "use_backend", "functional", "nn", "optimize", "restore"]
