"""Shared backend base classes: the pure-PyTorch reference and the Triton family's common device rules."""

from vitkern.backends.reference import ReferenceBackend
from vitkern.backends.triton_common import TritonBackend, triton_status

__all__ = ["ReferenceBackend", "TritonBackend", "triton_status"]
