"""Run the Triton launchers' GPU path on CPU tensors in the interpreter: GPU tile sizes, autotune configs and
grids sized from an SM count.

The interpreter tests run each launcher's interpreter geometry (small tiles, so that a small shape spans several
blocks, and one fixed config). On the GPU the same kernels run other tiles (64-128 rows, 64-key blocks), every
config of the autotune list and persistent / split grids sized from the SM count: index math, masks and chunking
that no CPU test would otherwise execute. Inside :func:`gpu_geometry` the launchers take their GPU branch for CPU
tensors; combined with :func:`vitkern.testing.run_every_triton_config` (which also keeps the autotuner from timing,
which it cannot do on CPU) and the interpreter's memory checks (:mod:`vitkern.testing.memcheck`), a parity test
then checks every GPU config's results, bounds and races, before any GPU runs them. What it cannot check:
compiled-code properties (registers, shared memory, layouts, intra-program synchronisation) and timing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from vitkern.kernels.triton import tuning


@contextlib.contextmanager
def gpu_geometry(num_sms: int = 132) -> Iterator[None]:
    """Within this block every Triton launcher treats CPU tensors as GPU tensors of a device with ``num_sms`` SMs
    (132: H100 SXM): the launchers ask ``tuning.interpreted`` and ``tuning.num_sms``, which this replaces. Launches
    must run under :func:`tuning.only_config` (``run_every_triton_config`` does that): with more than one config
    left the autotuner would time them, which needs a GPU."""
    saved = tuning.interpreted, tuning.num_sms
    tuning.interpreted, tuning.num_sms = (lambda t: False), (lambda index=None: num_sms)
    tuning.reset()  # choices cached under the interpreter's geometry do not carry over (nor back, below)
    try:
        yield
    finally:
        tuning.interpreted, tuning.num_sms = saved
        tuning.reset()


def run_in_gpu_geometry(run, *, num_sms: int = 132, every_config: bool = True) -> dict:
    """``run()`` inside :func:`gpu_geometry`: once per autotune config (``run_every_triton_config``), or with each
    launcher's first config only (``every_config=False``: where the configs differ only in warps / stages, which
    the interpreter ignores). Returns which config indices ran."""
    from vitkern.testing.backends import run_every_triton_config

    with gpu_geometry(num_sms):
        if every_config:
            return run_every_triton_config(run)
        with tuning.only_config(0):
            run()
        return {"ran": [0], "skipped": []}
