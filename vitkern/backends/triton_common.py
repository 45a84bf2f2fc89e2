"""Device rules shared by every Triton backend.

Triton decides at ``@triton.jit`` time whether a kernel is compiled for the GPU or run by the interpreter
(``TRITON_INTERPRET=1``), so we ask the kernels themselves rather than re-reading the environment: CPU tensors
can only go to interpreted kernels and CUDA tensors only to compiled ones.
"""

from __future__ import annotations

import functools

import torch

from vitkern.dispatch import Backend, Problem

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CUDA_CAPABILITY = (8, 0)  # bf16 tensor cores and the Triton features we use


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(importable, message): whether Triton can be used at all, and in which mode."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton ships with torch on Linux
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    return True, f"triton {triton.__version__}, " + ("interpreter mode" if kernels_interpreted() else "GPU mode")


@functools.lru_cache(maxsize=None)
def kernels_interpreted() -> bool:
    """True when our @triton.jit kernels were created as interpreter functions (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from vitkern.kernels.triton import layer_norm as probe

    return isinstance(probe.layer_norm_fwd_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class TritonBackend(Backend):
    name = "triton"
    cuda_rank = 10
    dtypes = TRITON_DTYPES

    def availability(self) -> str | None:
        ok, msg = triton_status()
        return None if ok else msg

    def device_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.dtype not in self.dtypes:
            reasons.append(f"dtype {problem.dtype} not in {[str(d) for d in self.dtypes]}")
        if problem.device == "cpu":
            if not kernels_interpreted():
                reasons.append(
                    "CPU tensor but Triton kernels were compiled for the GPU "
                    "(set TRITON_INTERPRET=1 before importing vitkern to run them on CPU)"
                )
        elif problem.device == "cuda":
            if kernels_interpreted():
                reasons.append("TRITON_INTERPRET=1: kernels run in the CPU interpreter, not on CUDA tensors")
            else:
                cap = _capability(problem.attr("device_index", 0) or 0)
                if cap < MIN_CUDA_CAPABILITY:
                    reasons.append(f"GPU compute capability {cap} < {MIN_CUDA_CAPABILITY}")
        else:
            reasons.append(f"device type {problem.device!r} is not supported by Triton")
        return reasons
