"""Test utilities shipped with the package so the CPU tests, the GPU suite and `vitkern check` share them."""

from vitkern.testing.backends import run_every_triton_config
from vitkern.testing.compile_graph import check_compile_and_cuda_graph
from vitkern.testing.gpu_geometry import run_in_gpu_geometry
from vitkern.testing.numerics import (
    ATOL,
    Tolerance,
    assert_close,
    check_forward_backward,
    materialize,
    max_abs_err,
    poison_outputs,
    randn,
    seed_for,
)

__all__ = [
    "check_compile_and_cuda_graph", "run_every_triton_config", "run_in_gpu_geometry",
    "ATOL", "Tolerance", "assert_close", "check_forward_backward", "materialize", "max_abs_err", "poison_outputs", "randn", "seed_for",
]
