"""GPU checks every op family repeats: torch.compile(fullgraph=True) gives the eager result, and a CUDA-graph
capture of the module replays correctly on new input (the custom op, its allocations and its autotuning are all
capture-safe once warmed up)."""

from __future__ import annotations

from typing import Callable

import torch


def check_compile_and_cuda_graph(
    module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, compile_tol: float = 0.0
) -> None:
    """``compile_tol``: 0 when the module is only vitkern ops (the compiled graph calls the same kernels); a module
    that also holds torch layers (e.g. qkv/proj linears) lets inductor fuse their epilogues: rounding-level changes."""
    with torch.no_grad():
        eager = module(x)
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, atol=compile_tol, rtol=compile_tol)
        static_x = x.clone()
        module(static_x)  # autotune before capture: benchmarking inside a capture is not allowed
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = module(static_x)
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(static_y, module(static_x), atol=0, rtol=0)
