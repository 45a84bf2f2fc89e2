"""The autotuning switch (vitkern/kernels/triton/tuning.py), run through Triton's real autotuner in the interpreter.

A tiny kernel writes its BLOCK constexpr to every element, so the output says which config ran; a stub ``do_bench``
counts how many configs were timed and makes a chosen one the fastest.
"""

import os

import numpy
import pytest
import torch
import triton
import triton.language as tl

from vitkern.kernels.triton import tuning

pytestmark = pytest.mark.interpreter


@triton.jit
def _which_config_kernel(OUT, n, BLOCK: tl.constexpr):  # OUT: [n] int32 <- BLOCK
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, tl.full([BLOCK], BLOCK, tl.int32), mask=offs < n)


BLOCKS = (64, 16, 32, 128)  # the launcher's list; the prune below keeps BLOCK <= n, in this order


def _tuner(timings: dict):
    """An autotuned launcher over BLOCKS; returns (run(n) -> the BLOCK that ran, the BLOCKs timed so far)."""
    timed, last_out = [], {}

    def bench(kernel_call, quantiles):  # times a config: run it and read which BLOCK it was from the output
        kernel_call()
        block = int(last_out["t"][0])
        timed.append(block)
        return [timings.get(block, 1.0)] * len(quantiles)

    tuner = tuning.autotune(_which_config_kernel, [triton.Config({"BLOCK": b}) for b in BLOCKS], ["n"],
                            prune=lambda configs, named, **_: [c for c in configs if c.kwargs["BLOCK"] <= named["n"]],
                            do_bench=bench)

    def run(n: int = 40) -> int:
        out = last_out["t"] = torch.full((n,), -1, dtype=torch.int32)  # poisoned: every element must be written
        tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](out, n)
        assert (out == out[0]).all() and out[0] > 0, out
        return int(out[0])

    return run, timed


def test_autotune_on_times_every_kept_config_and_runs_the_fastest(monkeypatch):
    monkeypatch.delenv(tuning.ENV, raising=False)
    run, timed = _tuner({16: 2.0, 32: 0.5})
    assert run(40) == 32
    assert timed == [16, 32]  # 64 and 128 pruned (> n); the rest timed in list order
    assert run(40) == 32 and timed == [16, 32]  # cached per key: not timed again


def test_autotune_off_runs_the_first_kept_config_untimed(monkeypatch):
    monkeypatch.setenv(tuning.ENV, "0")
    run, timed = _tuner({32: 0.5})
    assert run(40) == 16
    assert run(100) == 64  # another key: the first config that survives the prune at n=100
    assert timed == []
    assert "VITKERN_AUTOTUNE=0" in tuning.describe()


@pytest.mark.parametrize("threads, says", [("8", "compiled on 8 threads"), ("1", "compiled one at a time"),
                                            ("0", "compiled one at a time")])
def test_describe_says_how_new_keys_compile(monkeypatch, threads, says):
    monkeypatch.delenv(tuning.ENV, raising=False)
    monkeypatch.setenv(tuning.COMPILE_THREADS_ENV, threads)
    assert tuning.compile_threads() == int(threads)
    assert says in tuning.describe()


def test_compile_threads_default_to_the_usable_cpus_at_most_16(monkeypatch):
    monkeypatch.delenv(tuning.COMPILE_THREADS_ENV, raising=False)
    assert tuning.compile_threads() == min(16, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("value", ["2", "fast"])
def test_bad_switch_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(tuning.ENV, value)
    run, _ = _tuner({})
    with pytest.raises(ValueError, match=r"VITKERN_AUTOTUNE must be 1 .* or 0 .*got '" + value):
        run(40)


def test_only_config_walks_every_kept_config_then_resets(monkeypatch):
    monkeypatch.delenv(tuning.ENV, raising=False)
    run, timed = _tuner({16: 2.0, 32: 0.5})
    assert run(40) == 32  # tuned and cached before the block
    seen = []
    with tuning.only_config(0) as state:
        seen.append(run(40))  # the cached choice is dropped on entry
    for i in range(1, state["most"]):
        with tuning.only_config(i):
            seen.append(run(40))
    assert state["most"] == 2 and seen == [16, 32]
    with tuning.only_config(5):  # modulo the kept list's length
        assert run(40) == 32
    timed.clear()
    assert run(40) == 32 and timed == [16, 32]  # leaving the block resets: tuned afresh
    with tuning.only_config(0), pytest.raises(RuntimeError, match="do not nest"):
        with tuning.only_config(1):
            pass


def test_gemm_tuning_is_keyed_on_the_size_class_of_the_token_dimensions(monkeypatch):
    """fused_linear's autotuner (its GPU path, run here in the interpreter) tunes once per power-of-two class of M and
    K, which grow with the batch: a new batch size in a known class reuses the choice; N (a layer's width) is exact.
    Results stay exact whichever key is hit."""
    from vitkern.kernels.triton import ln_linear as lnl_k

    monkeypatch.setenv(tuning.ENV, "0")  # one config per key (the GPU tiles are slow to interpret); keys still cached
    monkeypatch.setattr(tuning, "interpreted", lambda t: False)
    tuner = lnl_k._tuned_linear()
    tuner.cache.clear()
    g = torch.Generator().manual_seed(7)
    for i, (m, n, k) in enumerate([(300, 48, 40), (400, 48, 40), (600, 48, 40), (300, 64, 40), (300, 48, 60)]):
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        out = torch.full((m, n), float("nan"))
        lnl_k.fused_linear(a, b, out)
        torch.testing.assert_close(out, a @ b, atol=1e-4, rtol=1e-4)
        # 300 and 400 share class 512 (one key); 600 (1024), N 64, K 60 (64 vs 40's 64: same class) add keys
        assert len(tuner.cache) == [1, 1, 2, 3, 3][i], (m, n, k, list(tuner.cache))
    tuner.cache.clear()
    assert [tuning.size_class(v) for v in (1, 2, 3, 197, 256, 257)] == [1, 2, 4, 256, 256, 512]


@triton.jit
def _many_args_kernel(X, Y, n, m, W, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr):  # only its signature is used
    pass


def _autotuners_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """Autotuner.run's key as Triton 3.6 builds it (runtime/autotuner.py), the reference for the fast one."""
    all_args = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in all_args.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


@pytest.mark.parametrize("call", ["positional", "tensor_by_keyword", "key_by_keyword", "all_by_keyword", "key_absent",
                                  "numpy_scalars"])
def test_fast_cache_key_is_the_autotuners_key(call):
    x, y, w = torch.empty(4), torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.int32)
    launch = dict(grid=(1,), warmup=False)  # what kernel[grid](...) passes to run besides the arguments
    args, kwargs = {
        "positional": ((x, y, 5, 7, w, 0.5), dict(BLOCK=16, FLAG=True)),
        "tensor_by_keyword": ((x, y, 5, 7), dict(scale=0.5, W=w, BLOCK=16, FLAG=True)),
        "key_by_keyword": ((x, y), dict(m=7, n=5, W=w, scale=0.5, BLOCK=16)),
        "all_by_keyword": ((), dict(W=w, Y=y, X=x, n=5, m=7, scale=0.5, BLOCK=16)),
        "key_absent": ((x, y, 5), dict(BLOCK=16)),  # m not given: the key leaves it out, as Triton's does
        # numpy.float64 subclasses float and has a dtype (Triton's key includes it); numpy.int64 is no int subclass
        "numpy_scalars": ((x, y, numpy.int64(5), 7, w, numpy.float64(0.5)), dict(BLOCK=16)),
    }[call]
    kwargs = {**kwargs, **launch}
    tuner = tuning.autotune(_many_args_kernel, [triton.Config({}), triton.Config({}, num_warps=8)], ["m", "n", "FLAG"])
    expected = _autotuners_key(tuner, args, kwargs)
    assert tuner.cache_key(args, kwargs) == expected
    assert any(isinstance(v, str) and v.startswith("torch.") for v in expected)  # the dtypes are part of it
    if call == "numpy_scalars":
        assert expected.count("float64") == 1 and expected.count("int64") == 1


def test_a_tuned_key_launches_without_autotuner_run(monkeypatch):
    """After the first launch of a key, launches of that key go straight to the JIT with the cached config, and
    give the same result; a new key goes through Autotuner.run (and is tuned)."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.delenv(tuning.ENV, raising=False)
    run, timed = _tuner({16: 2.0, 32: 0.5})
    slow_runs = []
    slow_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: slow_runs.append(1) or slow_run(self, *a, **k))
    assert run(40) == 32 and len(slow_runs) == 1  # tuned
    assert run(40) == 32 and run(40) == 32 and len(slow_runs) == 1 and timed == [16, 32]  # same key: fast path
    assert run(20) == 16 and len(slow_runs) == 2  # another key (n is in it): tuned, and 32 > n is pruned
    assert run(20) == 16 and run(40) == 32 and len(slow_runs) == 2


def test_host_integer_helpers_match_tritons():
    for n in range(0, 4100):
        assert tuning.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert tuning.cdiv(n, d) == triton.cdiv(n, d), (n, d)
