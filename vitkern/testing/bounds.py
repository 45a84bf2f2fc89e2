"""Out-of-bounds detection for Triton kernels run in the interpreter (``TRITON_INTERPRET=1``).

On the GPU an access past a tensor reads whatever lies there or faults (compute-sanitizer's memcheck finds it);
in the interpreter the same access reads or writes host memory next to the tensor and usually goes unnoticed.
While :func:`check_bounds` is active, every ``tl.load`` / ``tl.store`` of an interpreted kernel must keep each
address its mask lets through inside the byte extent of one tensor argument of that launch: from the view's first
element to one past its last (``storage_offset + sum((size - 1) * stride)``), not the whole storage, so reading a
view's neighbours in a shared buffer counts as out of bounds too. A violation raises :class:`OutOfBounds` naming the
kernel, the argument, the program id and how far past the extent the access went.

Lanes the mask turns off are not checked: the GPU does not touch them either.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np


class OutOfBounds(AssertionError):
    pass


@dataclass(frozen=True)
class _Extent:
    name: str
    start: int  # first byte
    end: int  # one past the last byte


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


def _check(kind: str, ptrs, mask) -> None:
    extents: list[_Extent] | None = getattr(_state, "extents", None)
    if extents is None:
        return
    addr = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
    if addr.size == 0:
        return
    itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    lo, hi = int(addr.min()), int(addr.max()) + itemsize
    # every lane must stay inside one argument (views of one packed buffer overlap: any of them will do)
    if any(e.start <= lo and hi <= e.end for e in extents):
        return
    owner = max((e for e in extents if e.start <= lo < e.end), key=lambda e: e.end, default=None)
    from triton.runtime.interpreter import interpreter_builder

    pid = tuple(interpreter_builder.grid_idx or ())
    kernel = getattr(_state, "kernel", "?")
    if owner is None:
        near = min(extents, key=lambda e: min(abs(lo - e.start), abs(lo - e.end)), default=None)
        where = "no tensor argument" if near is None else (
            f"{lo - near.end} bytes past the end of {near.name!r}" if lo >= near.end
            else f"{near.start - lo} bytes before the start of {near.name!r}")
        raise OutOfBounds(f"{kernel}: tl.{kind} at program {pid} touches {where} (lowest address of the access)")
    raise OutOfBounds(f"{kernel}: tl.{kind} at program {pid} runs {hi - owner.end} bytes past the end of "
                      f"{owner.name!r} (extent {owner.end - owner.start} bytes)")


@contextlib.contextmanager
def check_bounds() -> Iterator[None]:
    """Within this block, interpreted Triton launches raise :class:`OutOfBounds` on an access outside their
    tensor arguments. Needs ``TRITON_INTERPRET=1`` set before the kernels were defined; nests and is re-entrant."""
    from triton.runtime import interpreter as interp

    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    if depth:
        try:
            yield
        finally:
            _state.depth -= 1
        return

    builder = interp.InterpreterBuilder
    saved = (interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__,
             builder.create_masked_load, builder.create_masked_store)
    init_args, call, load, store = saved

    @functools.wraps(init_args)
    def init_args_recording(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        _state.extents = [e for name, a in named for e in _extents_of(a, name)]
        _state.kernel = getattr(self.fn, "__name__", "kernel")
        return args_hst, kwargs_hst

    @functools.wraps(call)
    def call_checked(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            _state.extents = None

    def load_checked(self, ptrs, mask, other, *rest):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def store_checked(self, ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    interp.GridExecutor._init_args_hst = init_args_recording
    interp.GridExecutor.__call__ = call_checked
    builder.create_masked_load = load_checked
    builder.create_masked_store = store_checked
    try:
        yield
    finally:
        (interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__,
         builder.create_masked_load, builder.create_masked_store) = saved
        _state.extents = None
        _state.depth = 0
