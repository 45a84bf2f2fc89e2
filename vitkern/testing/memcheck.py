"""Memory checks for Triton kernels run in the interpreter (``TRITON_INTERPRET=1``): bounds and races between
programs.

The interpreter runs a launch's programs one after another on host memory, so two faults that matter on the GPU
pass unnoticed there:

- **Out of bounds.** An access past a tensor reads or writes host memory next to it. On the GPU it reads a
  neighbour or faults (compute-sanitizer's memcheck finds it). Checked: every ``tl.load`` / ``tl.store`` keeps each
  address its mask lets through inside the byte extent of one tensor argument of the launch, from the view's first
  element to one past its last (``sum((size - 1) * stride)``), not the whole storage: reading a view's neighbours
  in a shared buffer counts as out of bounds too.
- **Races between programs.** Programs of one launch run in an unspecified order and concurrently on the GPU;
  sequentially in the interpreter, one fixed order always wins. Nothing orders their plain global loads and stores
  (compute-sanitizer's racecheck covers shared memory only). Checked at the end of each launch: no address is stored
  by two programs, and none is stored by one program and loaded by another.

A violation raises :class:`MemoryCheckError` naming the kernel, the argument, the program ids and the offset.
Lanes the mask turns off are not checked: the GPU does not touch them either. Accesses are compared by their first
byte at the loaded / stored element size (a kernel reads a buffer at one element type).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


class MemoryCheckError(AssertionError):
    pass


@dataclass(frozen=True)
class _Extent:
    name: str
    start: int  # first byte
    end: int  # one past the last byte


@dataclass
class _Launch:
    kernel: str
    extents: list[_Extent]
    grid: tuple[int, int, int] = (1, 1, 1)
    loads: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (addresses, flat program id)
    stores: list[tuple[np.ndarray, int]] = field(default_factory=list)


_state = threading.local()


def _extents_of(arg, name: str) -> list[_Extent]:
    if isinstance(arg, tuple):
        return [e for i, a in enumerate(arg) for e in _extents_of(a, f"{name}[{i}]")]
    if not hasattr(arg, "data_ptr") or not hasattr(arg, "stride"):
        return []
    if arg.numel() == 0:
        return [_Extent(name, arg.data_ptr(), arg.data_ptr())]
    span = sum((s - 1) * st for s, st in zip(arg.shape, arg.stride()))
    return [_Extent(name, arg.data_ptr(), arg.data_ptr() + (span + 1) * arg.element_size())]


def _program() -> tuple[int, int, int]:
    from triton.runtime.interpreter import interpreter_builder

    return tuple(interpreter_builder.grid_idx or (0, 0, 0))


def _where(launch: _Launch, addr: int) -> str:
    owner = next((e for e in launch.extents if e.start <= addr < e.end), None)
    return f"{owner.name!r} + {addr - owner.start} bytes" if owner else f"address {addr:#x}"


def _access(kind: str, ptrs, mask) -> None:
    launch: _Launch | None = getattr(_state, "launch", None)
    if launch is None:
        return
    addr = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
    addr = addr.astype(np.uint64, copy=False).ravel()
    if addr.size == 0:
        return
    itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    lo, hi = int(addr.min()), int(addr.max()) + itemsize
    pid = _program()
    # bounds: every lane inside one argument (views of one packed buffer overlap: any of them will do)
    if not any(e.start <= lo and hi <= e.end for e in launch.extents):
        owner = max((e for e in launch.extents if e.start <= lo < e.end), key=lambda e: e.end, default=None)
        if owner is not None:
            what = f"runs {hi - owner.end} bytes past the end of {owner.name!r} (extent {owner.end - owner.start} bytes)"
        else:
            near = min(launch.extents, key=lambda e: min(abs(lo - e.start), abs(lo - e.end)), default=None)
            what = "touches no tensor argument" if near is None else (
                f"starts {lo - near.end} bytes past the end of {near.name!r}" if lo >= near.end
                else f"starts {near.start - lo} bytes before {near.name!r}")
        raise MemoryCheckError(f"{launch.kernel}: out of bounds: tl.{kind} at program {pid} {what}")
    gx, gy, _ = launch.grid
    flat = pid[0] + gx * (pid[1] + gy * pid[2])
    (launch.stores if kind == "store" else launch.loads).append((np.unique(addr), flat))


def _grid_pid(launch: _Launch, flat: int) -> tuple[int, int, int]:
    gx, gy, _ = launch.grid
    return flat % gx, (flat // gx) % gy, flat // (gx * gy)


def _check_races(launch: _Launch) -> None:
    if not launch.stores:
        return
    s_addr = np.concatenate([a for a, _ in launch.stores])
    s_pid = np.concatenate([np.full(a.size, p, dtype=np.int64) for a, p in launch.stores])
    order = np.lexsort((s_pid, s_addr))
    s_addr, s_pid = s_addr[order], s_pid[order]
    # write / write: one address stored by two programs
    clash = np.flatnonzero((s_addr[1:] == s_addr[:-1]) & (s_pid[1:] != s_pid[:-1]))
    if clash.size:
        i = clash[0]
        raise MemoryCheckError(
            f"{launch.kernel}: race: programs {_grid_pid(launch, int(s_pid[i]))} and "
            f"{_grid_pid(launch, int(s_pid[i + 1]))} both store {_where(launch, int(s_addr[i]))} "
            f"({clash.size} such addresses)")
    if not launch.loads:
        return
    # read / write: an address one program loads and another stores (each stored address has one storer now)
    l_addr = np.concatenate([a for a, _ in launch.loads])
    l_pid = np.concatenate([np.full(a.size, p, dtype=np.int64) for a, p in launch.loads])
    idx = np.clip(np.searchsorted(s_addr, l_addr), 0, s_addr.size - 1)
    clash = np.flatnonzero((s_addr[idx] == l_addr) & (s_pid[idx] != l_pid))
    if clash.size:
        i = clash[0]
        raise MemoryCheckError(
            f"{launch.kernel}: race: program {_grid_pid(launch, int(l_pid[i]))} loads "
            f"{_where(launch, int(l_addr[i]))}, which program {_grid_pid(launch, int(s_pid[idx[i]]))} stores "
            f"({clash.size} such loads)")


@contextlib.contextmanager
def check_memory() -> Iterator[None]:
    """Within this block, interpreted Triton launches raise :class:`MemoryCheckError` on an access outside their
    tensor arguments or a race between their programs. Needs ``TRITON_INTERPRET=1`` set before the kernels were
    defined; nests."""
    from triton.runtime import interpreter as interp

    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    if depth:
        try:
            yield
        finally:
            _state.depth -= 1
        return

    executor, builder = interp.GridExecutor, interp.InterpreterBuilder
    targets = [(executor, "_init_args_hst"), (executor, "__call__"), (builder, "set_grid_dim"),
               (builder, "create_masked_load"), (builder, "create_masked_store")]
    saved = [getattr(owner, name) for owner, name in targets]
    init_args, call, set_grid_dim, load, store = saved

    @functools.wraps(init_args)
    def init_args_recording(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        _state.launch = _Launch(getattr(self.fn, "__name__", "kernel"),
                                [e for name, a in named for e in _extents_of(a, name)])
        return args_hst, kwargs_hst

    @functools.wraps(call)
    def call_checked(self, *args, **kwargs):
        try:
            result = call(self, *args, **kwargs)
            launch = getattr(_state, "launch", None)
            if launch is not None:
                _check_races(launch)
            return result
        finally:
            _state.launch = None

    def set_grid_dim_recording(self, nx, ny, nz):
        launch = getattr(_state, "launch", None)
        if launch is not None:
            launch.grid = (nx, ny, nz)
        return set_grid_dim(self, nx, ny, nz)

    def load_checked(self, ptrs, mask, other, *rest):
        _access("load", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def store_checked(self, ptrs, value, mask, *rest):
        _access("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    patched = [init_args_recording, call_checked, set_grid_dim_recording, load_checked, store_checked]
    for (owner, name), fn in zip(targets, patched):
        setattr(owner, name, fn)
    try:
        yield
    finally:
        for (owner, name), fn in zip(targets, saved):
            setattr(owner, name, fn)
        _state.launch = None
        _state.depth = 0
