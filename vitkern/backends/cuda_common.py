"""What every CUDA C++ backend (``vitkern._C`` ops) checks before it accepts a call.

:class:`CudaBackend` gives the shared part of ``availability`` / ``reject_reasons``: the extension is built, loaded,
has the op and can run here; CUDA tensors of a supported dtype; the extension's SASS covers the call's device; and,
for forward-only backends, the reason the backward runs elsewhere. Subclasses add their shape rules in
``op_reasons`` (and device-dependent limits such as shared memory in ``device_reasons``).

All CUDA backends rank after Triton (``cuda_rank = 20`` vs 10): an unmeasured kernel must not become the default.
Where CUDA is measured faster, per shape class and GPU model, the speed table says so
(:mod:`vitkern.backends.speed_table`, ``vitkern/data/speed_table.json``, written from committed GPU benchmark results
by ``benchmarks/make_speed_table.py``) and the dispatcher tries the measured winner first; the rank stays the
fallback for everything not measured.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from vitkern import dispatch
from vitkern._extension import _arch_covers, extension_status

BACKWARD_REASON = ("no CUDA backward kernel: the backward runs on the next backend in order (Triton on a GPU), "
                   "from this forward's saved outputs")


def extension_reason(op_name: Optional[str] = None) -> Optional[str]:
    """Why ``torch.ops.vitkern_C.<op_name>`` (or the extension at all) cannot run in this process; None if it can."""
    st = extension_status()
    if not st.available:
        return f"CUDA extension unavailable: {st.reason}"
    if op_name is not None:
        try:
            getattr(torch.ops.vitkern_C, op_name)
        except (AttributeError, RuntimeError):
            return (f"CUDA extension {st.path or 'vitkern_C'} has no op {op_name} (built from older sources); "
                    "rebuild it with `bash scripts/build_csrc.sh --inplace`")
    if not st.can_run:
        return f"CUDA extension cannot run here: {st.reason}"
    return None


@functools.lru_cache(maxsize=None)
def _arch_reason(index: int, archs: str) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(index)
    if any(_arch_covers(a, major, minor) for a in archs.split(",") if a.strip()):
        return None
    return f"vitkern._C was compiled for [{archs}], not for cuda:{index} (sm_{major}{minor})"


def device_reason(problem: dispatch.Problem) -> Optional[str]:
    """Why the extension's SASS cannot run on the problem's CUDA device (None if it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    return _arch_reason(problem.attr("device_index", 0) or 0, extension_status().info().get("cuda_archs", ""))


class CudaBackend(dispatch.Backend):
    name = "cuda"
    cuda_rank = 20  # after Triton unless the speed table measured CUDA faster (module docstring)
    op_name: Optional[str] = None  # the vitkern_C op this backend calls
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    forward_only = True  # backward problems are rejected with BACKWARD_REASON
    dtype_label = "dtype"  # what problem.dtype is, in messages

    def availability(self) -> Optional[str]:
        return extension_reason(self.op_name)

    def op_reasons(self, problem: dispatch.Problem) -> list[str]:
        """Shape / layout / attribute rules of this op (no device queries)."""
        return []

    def device_reasons(self, problem: dispatch.Problem, index: int) -> list[str]:
        """Limits of the actual device (e.g. shared memory), checked once everything else passed."""
        return []

    def reject_reasons(self, problem: dispatch.Problem) -> list[str]:
        if self.forward_only and problem.direction == dispatch.BACKWARD:
            return [BACKWARD_REASON]
        reasons = []
        if problem.device != "cuda":
            reasons.append(f"device {problem.device!r}: the CUDA kernels need CUDA tensors")
        if problem.dtype not in self.dtypes:
            reasons.append(f"{self.dtype_label} {problem.dtype} not in {[str(d) for d in self.dtypes]}")
        reasons += self.op_reasons(problem)
        if problem.device == "cuda" and not reasons:
            why = device_reason(problem)
            reasons += [why] if why else self.device_reasons(problem, problem.attr("device_index", 0) or 0)
        return reasons
