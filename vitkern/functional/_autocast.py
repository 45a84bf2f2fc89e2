"""Autocast policy of the fused ops: they join autocast's lower-precision list, as F.linear, conv and SDPA do.

Under ``torch.autocast(device, dtype)`` every floating-point tensor input of a fused op (activations and
parameters) is cast to the autocast dtype, and the op computes and returns that dtype (fp32 accumulation and
statistics inside, as always). That includes the residual add inside ``ln_mlp``: after a fused MLP the residual
stream is in the autocast dtype, as with ``model.to(dtype)``. Without this, fp32 parameters would pull the fused
GEMMs to fp32, and the fp32 output of an autocast-fp32 qk-norm would meet a bf16 v.

``layer_norm`` follows torch's own per-device policy instead (``cast_inputs_fp32``): CUDA autocast runs LayerNorm
in fp32 (inputs cast up, fp32 out), CPU autocast leaves it in the input's dtype.
"""

from __future__ import annotations

from typing import Optional, TypeVar

import torch

T = TypeVar("T", bound=Optional[torch.Tensor])


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type not in ("cuda", "cpu"):  # devices vitkern runs on; autocast has no state for e.g. "meta"
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


# devices whose autocast puts layer_norm on its fp32 list (torch 2.x: CUDA does, CPU does not)
LAYER_NORM_FP32_DEVICES = ("cuda",)


def _device_type(tensors) -> Optional[str]:
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    return first.device.type if first is not None else None


def _cast_floating(tensors: tuple[T, ...], dtype: Optional[torch.dtype]) -> tuple[T, ...]:
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # type: ignore
                 for t in tensors)


def cast_inputs_fp32(*tensors: T, devices: tuple[str, ...]) -> tuple[T, ...]:
    """``tensors`` cast to fp32 when autocast is on for their device and that device is one of ``devices`` (an op
    on autocast's fp32 list there); otherwise, and for non-floating-point tensors, unchanged."""
    device = _device_type(tensors)
    on = device in devices and autocast_dtype(device) is not None
    return _cast_floating(tensors, torch.float32 if on else None)


def cast_inputs(*tensors: T) -> tuple[T, ...]:
    """``tensors`` cast to the autocast dtype of their device when autocast is on there; anything that is not a
    floating-point tensor passes through unchanged (validation after this names wrong arguments)."""
    device = _device_type(tensors)
    return _cast_floating(tensors, autocast_dtype(device) if device is not None else None)
