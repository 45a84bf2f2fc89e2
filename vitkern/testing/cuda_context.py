"""Does this process's CUDA context still work? (A kernel fault must cost one test or one benchmark row, not
every one after it.)

A kernel that faults (an illegal or misaligned address, an illegal instruction, a device-side assert) leaves the
process's CUDA context unusable: every later CUDA call in that process fails with the same error. In one pytest or
benchmark process every later GPU test or row would then fail too, and hide which kernel actually broke: most
likely in code that has never run on a GPU. So, after a failure, :func:`context_lost` asks whether the context
still works, and when it does not:

- the GPU tests (``vitkern.testing.pytest_cuda_context``) end the process: pytest-xdist reports the test, queues
  the worker's other tests again and starts a fresh worker;
- ``benchmarks/run_all.py`` restarts itself without the provider that faulted (``vitkern.bench.harness``).
"""

from __future__ import annotations

import torch


def context_lost() -> str | None:
    """None if CUDA works in this process, or was never initialised here; else the error that a trivial CUDA call
    raises."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()  # surfaces a fault of work still in flight
        probe = torch.full((8,), 2.0, device="cuda")
        if probe.sum().item() != 16.0:
            return "a trivial CUDA reduction returned a wrong value"
    except torch.OutOfMemoryError:  # a full device (the failed test's tensors may still be alive), not a dead one
        return None
    except Exception as e:  # noqa: BLE001 - torch.AcceleratorError / RuntimeError, whatever the fault raised
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None
