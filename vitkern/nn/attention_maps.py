"""Opt-in attention maps from an optimized model, for visualisation (attention rollout, per-head plots).

The fused kernels never materialise the N×N probabilities. Inside ``with vitkern.nn.attention_maps(model) as
maps:`` every vitkern attention module of ``model`` runs its eager path instead and appends its probabilities
([batch, heads, N_q, N_k]; Swin: [batch·windows, heads, N, N]) to ``maps[module_path]``, one entry per call.
Outside the block nothing is recorded and the fused path runs: the switch is a per-module attribute (class default
``None``), not a global, so the default path pays one attribute check and torch.compile sees a constant.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import Tensor, nn

from vitkern.reference.layers import attention_probs

__all__ = ["attention_maps", "RecordsAttentionMaps"]


class RecordsAttentionMaps:
    """Mixin for vitkern modules that can record their attention probabilities."""

    _vitkern_attn_maps: Optional[list] = None  # set per instance by attention_maps()

    def _record_probs(self, q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor] = None) -> Tensor:
        """softmax(q kᵀ·scale + bias) (q, k: [..., N, D]), recorded; the caller multiplies by v."""
        probs = attention_probs(q, k, scale, bias)
        self._vitkern_attn_maps.append(probs)  # type: ignore[union-attr]
        return probs


@contextlib.contextmanager
def attention_maps(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Collect attention probabilities of every vitkern attention module in ``model`` (see the module docstring)."""
    maps: dict[str, list[Tensor]] = {}
    recorders = [(path, m) for path, m in model.named_modules() if isinstance(m, RecordsAttentionMaps)]
    if not recorders:
        raise ValueError("vitkern.nn.attention_maps: the model has no vitkern attention module "
                         "(call vitkern.optimize(model) first)")
    for path, module in recorders:
        maps[path] = []
        module._vitkern_attn_maps = maps[path]
    try:
        yield maps
    finally:
        for _, module in recorders:
            del module._vitkern_attn_maps  # back to the class default (None)
