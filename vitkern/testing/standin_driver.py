"""The GPU launch path on a machine without a GPU: a stand-in for Triton's CUDA driver.

Inside :func:`standin_sm90` Triton's active driver is an sm_90 device whose kernels load and launch as no-ops, so
everything on the host side of a GPU launch runs for real: vitkern's functional → op → dispatch → launcher, Triton's
autotuner and JIT (binder, cache keys, compilation for sm_90 with ptxas), up to the driver call. CPU tensors stand in
for CUDA tensors (the launchers take their GPU branch: ``vitkern.testing.gpu_geometry``) and nothing is computed, so
outputs are garbage. Used to check Triton's launch path (tests/test_parallel_compile.py) and to time vitkern's host
work per op (``python -m benchmarks.cpu.launch_overhead``). Not covered: the driver's own launch cost (a few us).

Needs real JITFunctions: a process without ``TRITON_INTERPRET=1`` (the tests' conftest sets it when there is no GPU;
tests/test_sm90_compile_isolated.py runs such tests in a fresh process).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Iterator

SMEM_PER_BLOCK_SM90 = 232448  # bytes one block may use on H100 (cudaDevAttrMaxSharedMemoryPerBlockOptin)


class Sm90WithoutDevice:
    """Triton's active driver: an sm_90 device whose kernels load and launch as no-ops (``launched`` records the
    kernel name of each launch)."""

    def __init__(self):
        self.launched: list[str] = []
        self.utils = SimpleNamespace(
            load_binary=lambda name, cubin, shared, device: (object(), object(), 32, 0, 1024),
            get_device_properties=lambda device: {"max_shared_mem": SMEM_PER_BLOCK_SM90},
        )

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def launcher_cls(self, src, metadata):
        return lambda *args: self.launched.append(metadata.name)


@contextlib.contextmanager
def active_driver(fake) -> Iterator:
    """``fake`` as Triton's active driver for the block."""
    from triton.runtime import driver

    saved = driver._active  # DriverConfig.reset_active() would create the CUDA driver, which fails without a GPU
    driver.set_active(fake)
    try:
        yield fake
    finally:
        driver._active = saved


@contextlib.contextmanager
def standin_sm90(num_sms: int = 132) -> Iterator[Sm90WithoutDevice]:
    """vitkern's Triton path for CPU tensors, as on an sm_90 GPU with ``num_sms`` SMs, against
    :class:`Sm90WithoutDevice`: the dispatcher's Triton backend accepts CPU tensors, the launchers take their GPU
    branch, Triton compiles for sm_90 and launches nothing."""
    from vitkern.backends import triton_common
    from vitkern.kernels.triton import tuning
    from vitkern.testing.gpu_geometry import gpu_geometry

    if triton_common.kernels_interpreted():
        raise RuntimeError("standin_sm90 needs real Triton JITFunctions: run it in a process without TRITON_INTERPRET=1")
    saved = triton_common.kernels_interpreted
    triton_common.kernels_interpreted = lambda: True  # the backend's device check: CPU tensors run the kernels
    try:
        with active_driver(Sm90WithoutDevice()) as fake, gpu_geometry(num_sms):
            yield fake
    finally:
        triton_common.kernels_interpreted = saved
