"""A new autotune key's configs compile together on threads, under the keys Triton's timed calls look up.

On the GPU, ``vitkern.kernels.triton.tuning`` compiles a key's pruned configs on ``VITKERN_COMPILE_THREADS``
threads before the autotuner times them; the timed calls must then find every config in the kernel cache, or the
work is done twice. That path never runs in the interpreter, so here Triton's real launch path runs against a
stand-in driver (vitkern.testing.standin_driver): an sm_90 device that loads and launches nothing. Triton's own
``Autotuner.run`` drives it, the kernels compile for real (ptxas), and every compile is recorded with the thread it
ran on. Those tests run in a fresh process (tests/test_sm90_compile_isolated.py), away from the interpreter's
patches; on a GPU the same checks run on the device, with Triton's own timer.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from vitkern.kernels.triton import tuning
from vitkern.testing.sm90_compile import FRESH_PROCESS_ENV, compile_env, real_jit
from vitkern.testing.standin_driver import Sm90WithoutDevice, active_driver

fresh_process = pytest.mark.skipif(
    os.environ.get(FRESH_PROCESS_ENV) != "1" or torch.cuda.is_available(),
    reason="runs in a fresh process (tests/test_sm90_compile_isolated.py), away from the Triton interpreter; "
           "with a GPU, test_gpu_* check the same on the device",
)


@triton.jit
def _scale_kernel(X, Y, n, scale, BLOCK: tl.constexpr):  # X, Y: [n] fp32; Y = X * scale
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * scale, mask=offs < n)


@pytest.fixture
def sm90_without_device():
    with compile_env(), active_driver(Sm90WithoutDevice()) as fake:
        yield fake


@pytest.fixture
def jit(monkeypatch):
    """A fresh JITFunction of _scale_kernel (empty kernel cache) whose compiles are recorded: ``jit.started``
    (num_warps, BLOCK) per compile the launch path starts, ``jit.threads`` the thread each compile ran on."""
    import triton.compiler

    monkeypatch.setenv(tuning.ENV, "1")  # autotuning on (the GPU suite's test processes run with it off)
    fresh = JITFunction(real_jit(_scale_kernel).fn)
    fresh.started, fresh.threads = [], []
    do_compile, compile_fn = JITFunction._do_compile, triton.compiler.compile

    def start(self, key, signature, device, constexprs, options, attrs, warmup):  # on the launching thread
        if self is fresh:
            block = next(v for k, v in constexprs.items() if self.arg_names[k[0]] == "BLOCK")
            fresh.started.append((options.num_warps, block))
        return do_compile(self, key, signature, device, constexprs, options, attrs, warmup)

    def run(*args, **kwargs):  # in async mode, on a pool thread
        fresh.threads.append(threading.current_thread().name)
        return compile_fn(*args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", start)
    monkeypatch.setattr(triton.compiler, "compile", run)  # JITFunction.create_binder looks it up on first launch
    return fresh


CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((128, 4), (256, 4), (512, 8), (1024, 8))]


def _tuner(jit, timed: list):
    def bench(kernel_call, quantiles):  # a stand-in timer: runs the config once (no device to time it on)
        kernel_call()
        timed.append(len(timed))
        return [float(len(timed))] * len(quantiles)

    return tuning.autotune(jit, CONFIGS, ["n"], do_bench=bench)


def _launch(tuner, n: int):
    x, y = torch.empty(n), torch.empty(n)  # the stand-in driver never touches their memory
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n, 2.0)


@fresh_process
def test_new_key_compiles_every_config_on_the_pool_before_timing(sm90_without_device, jit, monkeypatch):
    monkeypatch.setenv(tuning.COMPILE_THREADS_ENV, "4")
    timed: list = []
    tuner = _tuner(jit, timed)
    _launch(tuner, 1000)
    # each config compiled exactly once, all on the compile threads; the timed calls and the final launch found
    # them in the kernel cache (no compile from the main thread)
    assert sorted(jit.started) == sorted((c.num_warps, c.kwargs["BLOCK"]) for c in CONFIGS)
    assert len(jit.threads) == len(CONFIGS), jit.threads
    assert all(t.startswith("vitkern-compile") for t in jit.threads), jit.threads
    assert len(timed) == len(CONFIGS)
    assert sm90_without_device.launched == ["_scale_kernel"] * (len(CONFIGS) + 1)  # timed calls + the launch
    # the same key again: no compile, no timing
    _launch(tuner, 1000)
    assert len(jit.started) == len(CONFIGS) and len(timed) == len(CONFIGS)


@fresh_process
def test_another_specialisation_compiles_again(sm90_without_device, jit, monkeypatch):
    """n = 1024 is a multiple of 16 (Triton specialises the argument): a new key compiles its own binaries, in
    parallel again, and the earlier key's stay cached."""
    monkeypatch.setenv(tuning.COMPILE_THREADS_ENV, "4")
    tuner = _tuner(jit, [])
    _launch(tuner, 1000)
    _launch(tuner, 1024)
    assert len(jit.started) == 2 * len(CONFIGS)
    assert all(t.startswith("vitkern-compile") for t in jit.threads)


@fresh_process
@pytest.mark.parametrize("threads", ["0", "1"])
def test_one_thread_compiles_in_the_timed_calls_as_triton_does(sm90_without_device, jit, monkeypatch, threads):
    monkeypatch.setenv(tuning.COMPILE_THREADS_ENV, threads)
    timed: list = []
    _launch(_tuner(jit, timed), 1000)
    assert len(jit.started) == len(CONFIGS) and len(timed) == len(CONFIGS)
    assert all(not t.startswith("vitkern-compile") for t in jit.threads), jit.threads


def test_bad_thread_count_names_the_variable(monkeypatch):
    monkeypatch.setenv(tuning.COMPILE_THREADS_ENV, "many")
    with pytest.raises(ValueError, match="VITKERN_COMPILE_THREADS must be a thread count"):
        tuning.compile_threads()


@pytest.mark.gpu
def test_gpu_new_key_compiles_on_the_pool_and_runs_the_fastest(jit, monkeypatch):
    monkeypatch.setenv(tuning.COMPILE_THREADS_ENV, "4")
    tuner = tuning.autotune(jit, CONFIGS, ["n"])  # Triton's do_bench times each config on the device
    n = 1000
    x = torch.randn(n, device="cuda")
    y = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n, 2.0)
    torch.cuda.synchronize()
    assert torch.equal(y, x * 2.0)  # a multiply by 2 is exact in fp32
    assert sorted(jit.started) == sorted((c.num_warps, c.kwargs["BLOCK"]) for c in CONFIGS)
    assert len(jit.threads) == len(CONFIGS) and all(t.startswith("vitkern-compile") for t in jit.threads), jit.threads
    assert tuner.best_config in CONFIGS and set(tuner.configs_timings) == set(CONFIGS)
