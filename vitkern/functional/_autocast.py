"""Autocast policy of the fused ops: what the unfused modules they replace get from autocast.

Attention, window attention and patch embedding join autocast's lower-precision list, as F.linear, conv and SDPA
do: under ``torch.autocast(device, dtype)`` every floating-point tensor input (activations and parameters) is cast
to the autocast dtype, and the op computes and returns that dtype (fp32 accumulation and statistics inside).
Without this, fp32 parameters would pull the fused GEMMs to fp32, and the fp32 output of an autocast-fp32 qk-norm
would meet a bf16 v.

The GEMM family (``ln_linear``, ``ln_mlp``, ``linear_residual``) keeps the residual stream's precision instead
(``cast_gemm_inputs``): the GEMM weights and operands go to the autocast dtype, the residual stream (the LayerNorm
input, the residual) stays fp32, and a residual sum comes back in the residual's dtype. That is what an fp32 timm
block computes under autocast: LayerNorm in fp32 (on CUDA), bf16 Linears, and ``x + ls(branch)`` promoted to fp32.
Casting the stream to bf16 as well (vitkern's policy until 2026-11) rounds it once per block: on a 12-block ViT-S/16
(CPU, bf16 autocast, reference backend) the features' max error vs fp64 was 0.086 that way, 0.042 now, 0.036 for
timm's own autocast run.

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


def cast_gemm_inputs(stream: T, operands: tuple[T, ...], vectors: tuple[T, ...]
                     ) -> tuple[T, tuple[T, ...], tuple[T, ...]]:
    """The GEMM family's policy under autocast (module docstring); unchanged without autocast.

    ``operands`` (the weights, and an activation that only feeds a GEMM) go to the autocast dtype. ``stream`` (the
    LayerNorm input or the residual) and ``vectors`` (LayerNorm γ/β, biases, layer scale: kernels read them in fp32)
    keep the autocast dtype or fp32, any other floating dtype is widened to fp32."""
    device = _device_type((stream, *operands))
    dtype = autocast_dtype(device) if device is not None else None
    if dtype is None:
        return stream, operands, vectors

    def keep(t):
        ok = not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float32)
        return t if ok else t.float()

    return keep(stream), _cast_floating(operands, dtype), tuple(keep(v) for v in vectors)
