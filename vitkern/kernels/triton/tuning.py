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

Triton's autotuner compiles a new key's configs one after another, each inside its first timed call. Here the
configs of a new key are compiled first, together, on ``VITKERN_COMPILE_THREADS`` threads (default: the CPUs this
process may use, at most 16; 0 or 1 compiles one at a time, as Triton does), through Triton's own launch path in
its async-compile mode, so each lands in the kernel cache under the key the timed call then looks up. ptxas and
most of the MLIR pipeline run without the GIL: 16 attention configs compiled for sm_90 in 4.7 s on one thread and
2.4 s on two on CI's 2-core CPU. Only first calls get faster; the binaries, timings and choices are the same.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import weakref
from typing import Callable, Iterator

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

ENV = "VITKERN_AUTOTUNE"
COMPILE_THREADS_ENV = "VITKERN_COMPILE_THREADS"
MAX_COMPILE_THREADS = 16

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
    if not enabled():
        return "first config of each launcher, not tuned (VITKERN_AUTOTUNE=0)"
    threads = compile_threads()
    compiled = f"compiled on {threads} threads" if threads > 1 else "compiled one at a time"
    return f"autotuned per launch key (VITKERN_AUTOTUNE=1; a new key's configs {compiled}, VITKERN_COMPILE_THREADS)"


def pruner(prune: Callable | None = None) -> Callable:
    """``early_config_prune`` for triton.autotune: the launcher's own ``prune`` (shape rules), then the switch."""

    def early_config_prune(configs, named_args, **kwargs):
        kept = list(prune(configs, named_args, **kwargs)) if prune is not None else list(configs)
        if _forced is not None:
            _forced["most"] = max(_forced["most"], len(kept))
            return [kept[_forced["index"] % len(kept)]]
        return kept if enabled() else kept[:1]

    return early_config_prune


def compile_threads() -> int:
    """How many threads compile a new autotune key's configs (``VITKERN_COMPILE_THREADS``; <= 1: one by one)."""
    raw = os.environ.get(COMPILE_THREADS_ENV, "").strip()
    if not raw:
        return min(MAX_COMPILE_THREADS, len(os.sched_getaffinity(0)))
    try:
        threads = int(raw)
    except ValueError:
        threads = -1
    if threads < 0:
        raise ValueError(f"{COMPILE_THREADS_ENV} must be a thread count >= 0 (0 or 1: compile one config at a "
                         f"time), got {raw!r}")
    return threads


@functools.lru_cache(maxsize=None)
def _compile_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="vitkern-compile")


def _jit_function(fn) -> JITFunction | None:
    """The JITFunction under an autotuner's ``fn`` (through heuristics wrappers); None in the interpreter."""
    while fn is not None and not isinstance(fn, JITFunction):
        fn = getattr(fn, "fn", None)
    return fn


def compile_configs(fn, args: tuple, meta: dict, configs: list) -> None:
    """Compile ``fn`` for every config on the compile threads, as the autotuner's timed calls
    ``fn.run(*args, **meta, **config.all_kwargs())`` would one by one; each lands in ``fn``'s kernel cache under the
    key those calls look up. Does nothing in the interpreter, with fewer than 2 threads or configs, or inside
    another async-compile block."""
    threads = compile_threads()
    if threads <= 1 or len(configs) <= 1 or _jit_function(fn) is None:
        return
    from triton.runtime._async_compile import AsyncCompileMode, active_mode

    if active_mode.get() is not None:
        return
    # ignore_errors: a config that fails to compile is left out of the cache, so its timed call compiles it again
    # and raises there, where the autotuner handles it (OutOfResources, PTXASError: that config is skipped)
    with AsyncCompileMode(_compile_pool(threads), ignore_errors=True):
        for config in configs:
            fn.run(*args, **{**meta, **config.all_kwargs(), "warmup": True})


_NO_DTYPE = frozenset({int, float, bool, str, type(None)})


class VitkernAutotuner(Autotuner):
    """Triton's Autotuner with two changes, neither of which changes a choice or a result:

    - a new key's pruned configs compile together (:func:`compile_configs`) before the first of them is timed;
    - a launch whose key is tuned already skips ``Autotuner.run``'s per-call bookkeeping (it rebuilds dicts of all
      arguments and tests each name against the argument list: ~10 us per launch of a 29-argument kernel, measured
      with a stand-in driver on CI's CPU, against 13 us for the JIT launch itself); the key it looks up is the one
      ``Autotuner.run`` builds (``cache_key``), anything else goes through ``Autotuner.run``.
    """

    _to_compile: list | None = None

    def __init__(self, fn, arg_names, configs, key, **kwargs):
        super().__init__(fn, arg_names, configs, key, **kwargs)
        position = {name: i for i, name in enumerate(arg_names)}
        self._key_slots = tuple((name, position[name]) for name in key)
        self._arg_names = frozenset(arg_names)
        self._config_kwargs: dict = {}  # id(config) -> (config, config.all_kwargs())

    def cache_key(self, args: tuple, kwargs: dict) -> tuple:
        """``Autotuner.run``'s key: the key arguments given (in ``key`` order), then the str(dtype) of every
        argument that has one (positional ones first, then keyword ones in call order)."""
        n = len(args)
        key = [args[i] if i < n else kwargs[name] for name, i in self._key_slots if i < n or name in kwargs]
        # most arguments are ints (strides, sizes): their exact type rules out a dtype without hasattr's
        # AttributeError (a subclass such as numpy.float64 may have one: it takes hasattr)
        key += [str(a.dtype) for a in args if type(a) not in _NO_DTYPE and hasattr(a, "dtype")]
        key += [str(v.dtype) for k, v in kwargs.items()
                if type(v) not in _NO_DTYPE and k in self._arg_names and hasattr(v, "dtype")]
        return tuple(key)

    def run(self, *args, **kwargs):
        config = self.cache.get(self.cache_key(args, kwargs)) if len(self.configs) > 1 else None
        if config is None or config.pre_hook is not None:
            return super().run(*args, **kwargs)  # tunes a new key (or runs the only config, or a config's hook)
        self.best_config = config
        extra = self._config_kwargs.get(id(config))  # by id: Config's own hash and == rebuild all_kwargs()
        if extra is None or extra[0] is not config:
            extra = self._config_kwargs[id(config)] = (config, config.all_kwargs())
        return self.fn.run(*args, **kwargs, **extra[1])

    def prune_configs(self, kwargs: dict) -> list:
        # Autotuner.run prunes once per new key, then times each config through _bench(*args, config, **kwargs)
        configs = super().prune_configs(kwargs)
        self._to_compile = configs
        return configs

    def _bench(self, *args, config, **meta):
        configs, self._to_compile = self._to_compile, None
        if configs:  # the key's first timed config: a cached tuning choice (cache_results) times nothing
            compile_configs(self.fn, args, meta, configs)
        return super()._bench(*args, config=config, **meta)


def autotune(kernel, configs: list, key: list, prune: Callable | None = None, do_bench: Callable | None = None,
             cache_results: bool = False):
    """``triton.autotune(...)(kernel)`` under the switch, compiling a new key's configs in parallel. ``do_bench``
    (kernel_call, quantiles) times a config; a single surviving config is not timed (nothing to compare it with)."""

    def bench(kernel_call, quantiles):
        if _forced is not None or not enabled():
            return [0.0] * len(quantiles)
        if do_bench is not None:
            return do_bench(kernel_call, quantiles)
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)

    tuner = VitkernAutotuner(kernel, kernel.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                             prune_configs_by={"early_config_prune": pruner(prune)}, do_bench=bench,
                             cache_results=cache_results)
    _tuners.add(tuner)
    return tuner


# Host-side integer helpers for the launchers: triton.cdiv / triton.next_power_of_2 are constexpr functions in Triton
# 3.6, and a call from Python unwraps its arguments first (1.6 us against 0.02 us on CI's CPU, several per launch).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def size_class(n: int) -> int:
    """An autotune key's class for a size that varies with the batch: the next power of two (one tuning serves
    every n in (2^(k-1), 2^k]; any config is correct for any size, only its speed was timed at another)."""
    return next_power_of_2(max(int(n), 1))


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
