"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90a) without a GPU.

The Triton interpreter accepts programs the GPU compiler rejects (a ``tl.dot`` side < 16, shared memory beyond the
227 KB a block may use, dtype mismatches in ``tl.dot``, ...). ``compile_sm90`` runs the real compiler (TTIR → TTGIR →
LLVM → PTX → ptxas cubin) for ``GPUTarget("cuda", 90, 32)`` on the launch a launcher would make, with no device:

    >>> info = compile_sm90(layer_norm_fwd_kernel, args, dict(HAS_RES=False, ..., BLOCK_M=4), num_warps=4)
    >>> info.shared, info.regs, info.spill_bytes, info.wgmma, info.dots

``args``/``kwargs`` are what the launcher passes to ``kernel[grid](...)``: tensors may live on the ``meta`` device
(only the dtype and the pointer's 16-byte alignment matter: a tensor is taken to start at a 256-byte aligned
allocation plus its storage offset, as on CUDA); ints are specialised exactly like a real launch (== 1 becomes a
constant, multiples of 16 get the divisibility hint), through Triton's own binder.

``launches(module, fn, *args)`` calls a launcher with the module's kernels and autotuners replaced by recorders and
returns every kernel launch it would make with the configs it would try (the autotuner's list after its
``early_config_prune``), so a test compiles exactly what a GPU run would.

Under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it without a GPU) ``@triton.jit`` returns interpreter functions;
``real_jit`` re-creates the JITFunction from the underlying Python function, with the @triton.jit helpers it calls
re-created too (through a copy of its globals), so the module itself is untouched; while compiling, the @jit
functions of ``triton.language`` are swapped likewise (see ``compile_env``). ``compile_many`` compiles on threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import re
import subprocess
import sys
import tempfile
import threading
import types
from typing import Any, Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from vitkern.kernels.triton import tuning

SM90 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT_SM90 = 232448  # bytes of shared memory one block may use on H100 (227 KB, cudaDevAttrMaxSharedMemoryPerBlockOptin)


@dataclasses.dataclass(frozen=True)
class CompileInfo:
    name: str
    shared: int  # bytes of shared memory per block (Triton's metadata.shared)
    regs: int  # registers per thread (from the cubin)
    spill_bytes: int  # bytes of spill stores (ptxas -v); -1: unknown (cubin from Triton's cache, and stack > 0)
    stack: int  # stack frame bytes per thread (from the cubin; > 0 with spills)
    num_warps: int
    num_stages: int
    wgmma: bool  # wgmma.mma_async in the PTX (tensor cores, Hopper path)
    mma: bool  # any mma (wgmma or mma.sync) in the PTX
    dots: tuple = ()  # per tl.dot in the TTGIR: (kind, M, N), kind "wgmma" (MMAv3), "mma" (mma.sync, MMAv2) or "fma"
    ptx: str = dataclasses.field(repr=False, default="")
    ttgir: str = dataclasses.field(repr=False, default="")

    @property
    def fits(self) -> bool:
        return self.shared <= SMEM_LIMIT_SM90


# ------------------------------------------------------------------------------------------------- real JITFunctions
def _underlying(fn) -> Callable | None:
    """The Python function behind a JITFunction / InterpretedFunction, or None for anything else."""
    if isinstance(fn, JITFunction):
        return None
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return None
    return fn.fn if isinstance(fn, InterpretedFunction) else None


_CLONES: dict = {}  # interpreter function -> its JITFunction
_GLOBALS: dict[int, dict] = {}  # id(a module's globals) -> the copy its clones see (interpreter functions swapped)
_CLONE_LOCK = threading.RLock()
_JIT_OPTIONS = ("version", "do_not_specialize", "do_not_specialize_on_alignment", "debug", "noinline", "repr",
                "launch_metadata")


def _clone(interp) -> JITFunction:
    if interp in _CLONES:
        return _CLONES[interp]
    py = interp.fn
    fresh = id(py.__globals__) not in _GLOBALS
    if fresh:
        _GLOBALS[id(py.__globals__)] = dict(py.__globals__)  # a copy: the module keeps its interpreter functions
    glb = _GLOBALS[id(py.__globals__)]
    fn = types.FunctionType(py.__code__, glb, py.__name__, py.__defaults__, py.__closure__)
    fn.__kwdefaults__, fn.__annotations__ = py.__kwdefaults__, dict(py.__annotations__)
    fn.__qualname__, fn.__module__, fn.__doc__ = py.__qualname__, py.__module__, py.__doc__
    jit = JITFunction(fn, **{k: v for k, v in getattr(interp, "kwargs", {}).items() if k in _JIT_OPTIONS})
    _CLONES[interp] = jit  # before filling the globals: helpers of one module call each other
    if fresh:
        for name, value in list(glb.items()):
            if _underlying(value) is not None:
                glb[name] = _clone(value)
    return jit


def real_jit(fn) -> JITFunction:
    """The compilable JITFunction of a ``@triton.jit`` kernel, also when the interpreter is on."""
    if isinstance(fn, JITFunction):
        return fn
    if _underlying(fn) is None:
        raise TypeError(f"{fn!r} is not a @triton.jit function")
    with _CLONE_LOCK:  # a clone's globals are filled after it is registered: no other thread may see it half-done
        return _clone(fn)


# ----------------------------------------------------------------------------------------------------- compilation
class _AlignedPtr:
    """Stands in for a tensor argument: Triton's binder reads only ``dtype`` and ``data_ptr()`` (alignment)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 256 + t.storage_offset() * t.element_size()  # a CUDA allocation is 256-byte aligned

    def data_ptr(self) -> int:
        return self._ptr


def _as_arg(a):
    return _AlignedPtr(a) if isinstance(a, torch.Tensor) else a


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) from the bundled cuobjdump; (-1, -1) when it cannot be run."""
    try:
        from triton import knobs
        cuobjdump = knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
    except Exception:  # noqa: BLE001 - resource numbers are informative only
        return -1, -1
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1


def compile_sm90(kernel, args: tuple, kwargs: dict, *, num_warps: int = 4, num_stages: int = 3,
                 target: GPUTarget = SM90) -> CompileInfo:
    """Compile ``kernel[grid](*args, **kwargs, num_warps=..., num_stages=...)`` for ``target`` (no device needed),
    specialised by Triton's own binder (uses the private ``JITFunction._pack_args`` of Triton 3.6).

    Raises whatever the compiler raises (CompilationError, OutOfResources is not raised here: shared memory is
    checked at load time, so compare ``info.shared`` with ``SMEM_LIMIT_SM90``)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = real_jit(kernel)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    call_kwargs = {k: _as_arg(v) for k, v in kwargs.items()}
    call_kwargs.update(num_warps=num_warps, num_stages=num_stages)
    bound, specialization, options = binder(*map(_as_arg, args), **call_kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, call_kwargs, bound, specialization, options)
    with compile_env(), _ptxas_log() as log:
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    ptx = compiled.asm.get("ptx", "")
    regs, stack = _cubin_resources(compiled.asm["cubin"]) if "cubin" in compiled.asm else (-1, -1)
    spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())  # empty when Triton's cache had the cubin
    return CompileInfo(
        name=jit.fn.__name__, shared=int(compiled.metadata.shared), regs=regs,
        spill_bytes=sum(map(int, spills)) if spills else (-1 if stack else 0), stack=stack,
        num_warps=num_warps, num_stages=num_stages, wgmma="wgmma.mma_async" in ptx,
        mma="wgmma.mma_async" in ptx or "mma.sync" in ptx, dots=parse_dots(compiled.asm.get("ttgir", "")), ptx=ptx,
        ttgir=compiled.asm.get("ttgir", ""),
    )


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)x\w+, #(\w+)")


def parse_dots(ttgir: str) -> tuple:
    """(kind, M, N) of every dot in a TTGIR module: ``ttng.warp_group_dot`` is wgmma; a ``tt.dot`` with an ``#mma``
    result layout is mma.sync; any other layout (``#blocked``) means the dot runs on FMA units."""
    out = []
    for op, m, n, layout in _DOT.findall(ttgir):
        kind = "wgmma" if op == "ttng.warp_group_dot" else ("mma" if layout.startswith("mma") else "fma")
        out.append((kind, int(m), int(n)))
    return tuple(out)


def wgmma_possible(m: int, n: int, num_warps: int) -> bool:
    """Triton's condition for MMAv3 on sm_90 (AccelerateMatmul's supportMMA, 16-bit operands): whole warpgroups,
    M a multiple of 64 and N of 8."""
    return num_warps % 4 == 0 and m % 64 == 0 and n % 8 == 0


def compile_many(jobs: list[Callable[[], CompileInfo]], workers: int | None = None) -> list[CompileInfo | Exception]:
    """Run ``compile_sm90`` closures on a thread pool (ptxas and much of the MLIR pipeline run without the GIL):
    results (or the exception raised) in order."""
    import concurrent.futures
    import os

    def run(job):
        try:
            return job()
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            return e

    workers = workers or int(os.environ.get("VITKERN_SM90_WORKERS", 0)) or min(8, len(os.sched_getaffinity(0)))
    with compile_env(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, jobs))


_ENV_LOCK = threading.Lock()
_ENV_DEPTH = 0
_TLS = threading.local()


class _ThreadStdout(io.TextIOBase):
    """sys.stdout while compiling: a thread collecting a ptxas log (``_ptxas_log``) gets its own writes."""

    def __init__(self, real):
        self.real = real

    def write(self, text):
        buf = getattr(_TLS, "log", None)
        return (buf or self.real).write(text)

    def flush(self):
        self.real.flush()


@contextlib.contextmanager
def _ptxas_log():
    _TLS.log = io.StringIO()
    try:
        yield _TLS.log
    finally:
        _TLS.log = None


@contextlib.contextmanager
def compile_env():
    """Compile as if TRITON_INTERPRET were unset: the interpret knob off, and the @jit functions of
    ``triton.language`` itself (tl.sum, tl.cdiv, ... are @jit in triton/language/standard.py, so they were built as
    interpreter functions at import) swapped for real JITFunctions for the duration; ptxas's -v log is printed so
    ``compile_sm90`` can read the spills. Re-entrant and shared by threads (the outermost entry sets up/restores)."""
    global _ENV_DEPTH
    from triton import knobs

    with _ENV_LOCK:
        _ENV_DEPTH += 1
        if _ENV_DEPTH == 1:
            swapped = [(mod, name, value) for mod_name, mod in list(sys.modules.items())
                       if mod is not None and mod_name.startswith("triton.language")
                       for name, value in list(vars(mod).items()) if _underlying(value) is not None]
            saved = (swapped, knobs.runtime.interpret, knobs.nvidia.dump_ptxas_log, sys.stdout)
            compile_env.saved = saved
            for mod, name, value in swapped:
                setattr(mod, name, real_jit(value))
            knobs.runtime.interpret = False
            knobs.nvidia.dump_ptxas_log = True
            sys.stdout = _ThreadStdout(sys.stdout)
    try:
        yield
    finally:
        with _ENV_LOCK:
            _ENV_DEPTH -= 1
            if _ENV_DEPTH == 0:
                swapped, knobs.runtime.interpret, knobs.nvidia.dump_ptxas_log, sys.stdout = compile_env.saved
                for mod, name, value in swapped:
                    setattr(mod, name, value)


# ------------------------------------------------------------------------------------------ recording a launcher
@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` a launcher makes, with the configs it would run on the GPU."""
    kernel: Any  # the @triton.jit kernel (interpreter function or JITFunction)
    args: tuple
    kwargs: dict  # constexprs / options passed by keyword
    configs: list  # [(config kwargs, num_warps, num_stages)]: the pruned autotune list, or the one fixed launch
    autotuned: bool
    all_configs: list = dataclasses.field(default_factory=list)  # the autotuner's list before pruning
    tag: str = ""  # a caller's label (e.g. which GEMM of a block this launch is)

    @property
    def name(self) -> str:
        return self.kernel.__name__


class _Recorder:
    def __init__(self, kernel, log: list, autotune: dict | None = None):
        self.kernel, self.log, self.autotune = kernel, log, autotune

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        if self.autotune is None:  # a direct launch: its options are in kwargs
            warps = kwargs.pop("num_warps", 4)
            stages = kwargs.pop("num_stages", 3)
            self.log.append(Launch(self.kernel, args, kwargs, [({}, warps, stages)], autotuned=False))
            return
        configs, prune = self.autotune["configs"], self.autotune["early_config_prune"]  # tuning.pruner(...)
        # argument names from the Python function, not real_jit(): cloning now would snapshot the module's globals
        # while launches() has its kernels swapped for recorders
        named = dict(zip(inspect.signature(self.kernel.fn).parameters, args))
        kept = prune(configs, named, **kwargs)
        self.log.append(Launch(self.kernel, args, kwargs, [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kept],
                               autotuned=True, all_configs=[(dict(c.kwargs), c.num_warps, c.num_stages)
                                                            for c in configs]))


def _is_kernel(v) -> bool:
    return isinstance(v, JITFunction) or _underlying(v) is not None


def launches(module: types.ModuleType, launcher: Callable, *args, num_sms: int = 132, **kwargs) -> list[Launch]:
    """Every kernel launch ``launcher(*args, **kwargs)`` makes on the GPU path (pass ``meta`` tensors: the
    launchers treat a non-CPU tensor as a GPU one), with the autotune configs it would try after pruning (and after
    the ``VITKERN_AUTOTUNE`` switch: with 0, only the first).

    The module's @triton.jit globals are replaced by recorders for the call, its ``_tuned*`` autotuner factories
    by factories of recorders carrying the same configs/prune function (``tuning.autotune`` is intercepted), and
    ``tuning.num_sms`` returns ``num_sms`` (132: H100 SXM). Everything is restored afterwards."""
    log: list[Launch] = []
    saved: dict[str, Any] = {}
    real_num_sms = tuning.num_sms

    def fake_autotune(kernel, configs, key, prune=None, **_):  # tuning.autotune's signature
        return _Recorder(kernel, log, dict(configs=configs, early_config_prune=tuning.pruner(prune)))

    try:
        kernels = {name: v for name, v in vars(module).items() if _is_kernel(v)}
        factories = {name: v for name, v in vars(module).items() if name.startswith("_tuned") and hasattr(v, "cache_clear")}
        for name, value in kernels.items():
            saved[name] = value
            setattr(module, name, _Recorder(value, log))
        for name, value in factories.items():
            saved[name] = value
            setattr(module, name, _rebuild_tuned(value, kernels, fake_autotune))
        tuning.num_sms = lambda index=None: num_sms
        launcher(*args, **kwargs)
    finally:
        tuning.num_sms = real_num_sms
        for name, value in saved.items():
            setattr(module, name, value)
    return log


def _rebuild_tuned(cached, saved_kernels: dict, fake_autotune):
    """A fresh (uncached) copy of an ``@lru_cache`` ``_tuned(...)`` factory that sees ``fake_autotune`` for
    ``tuning.autotune`` and the original kernels (not the recorders) under their names."""
    fn = cached.__wrapped__
    glb = dict(fn.__globals__)
    glb.update(saved_kernels)
    glb["tuning"] = types.SimpleNamespace(**{**vars(tuning), "autotune": fake_autotune})
    return types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)

# tests/test_sm90_compile.py runs only in a process started with this set (see tests/test_sm90_compile_isolated.py)
FRESH_PROCESS_ENV = "VITKERN_SM90_FRESH_PROCESS"
