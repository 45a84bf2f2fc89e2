"""Autotuning for every Triton launcher: one switch (``VITKERN_AUTOTUNE``) and a hook for tests.

On the GPU each launcher's ``_tuned`` factory autotunes over a short config list, which compiles and times every
config on the first launch per key. That pays off for a model that runs one shape many times, but a test suite of
hundreds of shapes is then mostly compilation: measured on CPU with the real compiler (tests/test_sm90_compile.py's
tooling, 2-core CI box), one Swin window-attention backward config at ws 12 takes 3-10 s to compile, an attention
config 0.3-0.6 s, and every (shape class, dtype, flags) compiles the whole list again.

``VITKERN_AUTOTUNE=0`` runs only the first config that survives the launcher's prune, untimed. Every config list puts
first a config that fits every supported shape (tests/test_sm90_compile.py checks that it compiles and fits Hopper's
shared memory), so the switch changes speed, never results or which inputs are accepted. The GPU suite runs its
parity tests this way and checks every config separately (the ``*_every_config`` GPU tests, through
:func:`only_config`); benchmarks autotune.

The switch is read when a launch key is first seen (the autotuner caches its choice per key).
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from typing import Callable, Iterator

import torch
import triton

ENV = "VITKERN_AUTOTUNE"

_tuners: "weakref.WeakSet" = weakref.WeakSet()  # every autotuner built here, so tests can reset their choices
_forced: dict | None = None  # only_config's state while it is active


def interpreted(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` takes the interpreter's path (CPU tensors: small fixed tiles, one config) or the
    GPU's (tiles, autotuning and grids for the device). Every launcher asks here, so tests can switch all of them
    (vitkern.testing.gpu_geometry)."""
    return t.device.type == "cpu"


@functools.lru_cache(maxsize=None)
def num_sms(index: int | None) -> int:
    """SM count of CUDA device ``index`` (None: the current one), for grids sized to the device."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def enabled() -> bool:
    """Whether launchers autotune (``VITKERN_AUTOTUNE`` unset or 1) or run their first config (0)."""
    raw = os.environ.get(ENV, "1").strip().lower()
    if raw in ("", "1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{ENV} must be 1 (autotune, the default) or 0 (first config only), got {raw!r}")


def describe() -> str:
    return ("autotuned per launch key (VITKERN_AUTOTUNE=1)" if enabled()
            else "first config of each launcher, not tuned (VITKERN_AUTOTUNE=0)")


def pruner(prune: Callable | None = None) -> Callable:
    """``early_config_prune`` for triton.autotune: the launcher's own ``prune`` (shape rules), then the switch."""

    def early_config_prune(configs, named_args, **kwargs):
        kept = list(prune(configs, named_args, **kwargs)) if prune is not None else list(configs)
        if _forced is not None:
            _forced["most"] = max(_forced["most"], len(kept))
            return [kept[_forced["index"] % len(kept)]]
        return kept if enabled() else kept[:1]

    return early_config_prune


def autotune(kernel, configs: list, key: list, prune: Callable | None = None, do_bench: Callable | None = None,
             cache_results: bool = False):
    """``triton.autotune(...)(kernel)`` under the switch. ``do_bench`` (kernel_call, quantiles) times a config; a
    single surviving config is not timed (nothing to compare it with)."""

    def bench(kernel_call, quantiles):
        if _forced is not None or not enabled():
            return [0.0] * len(quantiles)
        if do_bench is not None:
            return do_bench(kernel_call, quantiles)
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)

    tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": pruner(prune)},
                            do_bench=bench, cache_results=cache_results)(kernel)
    _tuners.add(tuner)
    return tuner


def size_class(n: int) -> int:
    """An autotune key's class for a size that varies with the batch: the next power of two (one tuning serves
    every n in (2^(k-1), 2^k]; any config is correct for any size, only its speed was timed at another)."""
    return triton.next_power_of_2(max(int(n), 1))


def reset() -> None:
    """Forget every autotuner's per-key choice (the next launch per key prunes, and tunes, again)."""
    for tuner in list(_tuners):
        tuner.cache.clear()


@contextlib.contextmanager
def only_config(index: int) -> Iterator[dict]:
    """Tests: inside the block every autotuned launch runs config ``index`` of its pruned list (modulo the list's
    length). Yields a dict whose ``"most"`` is the longest pruned list seen, so a caller can loop over every config:
    run once with index 0, then with 1 .. most-1."""
    global _forced
    if _forced is not None:
        raise RuntimeError("only_config blocks do not nest")
    _forced = {"index": index, "most": 0}
    reset()
    try:
        yield _forced
    finally:
        _forced = None
        reset()
