"""The reference backend: plain PyTorch, every device and dtype, the CPU default and the fallback of last resort."""

from __future__ import annotations

from vitkern.dispatch import Backend, Problem


class ReferenceBackend(Backend):
    name = "reference"
    cuda_rank = 1000  # on CUDA only when nothing faster accepts the call

    def reject_reasons(self, problem: Problem) -> list[str]:
        return []
