"""bf16 arithmetic in the Triton interpreter, as the GPU does it.

The Triton 3.6 interpreter keeps bf16 values as their raw uint16 bits and gets three things wrong:

- ``tl.dot`` multiplies the bit patterns as integers (garbage: the reason bf16 kernel tests were GPU-only);
- fp32 → bf16 casts truncate (round toward zero), and its round-to-nearest mode neither ties to even nor carries
  into the exponent; the GPU's ``.to(tl.bfloat16)`` rounds to nearest even (``cvt.rn.bf16.f32``);
- elementwise arithmetic on bf16 operands works on the bits.

Inside :func:`exact_bf16` the interpreter instead widens bf16 operands exactly to fp32 (a bf16 is the top half of
an fp32), computes dots and elementwise ops in fp32, and rounds results to bf16 to nearest even (through torch's
conversion), or toward zero where the kernel asks for it. Products of bf16 values are exact in fp32, so a dot with
an fp32 accumulator matches the tensor cores up to summation order. conftest turns this on for every interpreter
test, so bf16 parity tests run on CPU too.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def to_bf16(x: np.ndarray, toward_zero: bool = False) -> np.ndarray:
    """bf16 bits (uint16) of ``x`` (any float or int array) rounded to nearest even, or toward zero."""
    x = np.array(x, copy=True)
    if toward_zero:
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if x.dtype == np.float16 or x.dtype.kind in "iub":
        x = x.astype(np.float32)  # exact
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@contextlib.contextmanager
def exact_bf16() -> Iterator[None]:
    """Within this block the interpreter's bf16 dots, casts and elementwise ops compute as the GPU does."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter as interp

    builder, TensorHandle = interp.InterpreterBuilder, interp.TensorHandle
    bf16 = tl.bfloat16
    saved = {}  # the interpreter's own methods, filled below before any patched one can run

    def widen(h):
        return TensorHandle(bf16_to_f32(h.data), tl.float32) if h.dtype.scalar == bf16 else h

    def narrow(h, toward_zero=False):
        return TensorHandle(to_bf16(h.data, toward_zero), bf16)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == bf16:
            if src.dtype.scalar == bf16:
                return src
            return narrow(src) if src.dtype.scalar.is_floating() or src.dtype.scalar.is_int() else \
                saved["cast_impl"](self, src, dst_type)
        return saved["cast_impl"](self, widen(src), dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if bf16 in (src.dtype.scalar, dst_type.scalar):
            if dst_type.scalar == bf16:
                return narrow(widen(src) if src.dtype.scalar == bf16 else src,
                              toward_zero=rounding_mode == ir.ROUNDING_MODE.RTZ)
            return saved["cast_impl"](self, widen(src), dst_type)
        return saved["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return saved["create_dot"](self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if bf16 not in (lhs.dtype.scalar, rhs.dtype.scalar):
            return saved["binary_op"](self, lhs, rhs, op)
        out = saved["binary_op"](self, widen(lhs), widen(rhs), op)
        # float results round back to bf16; comparisons stay truth values (the semantic layer types them int1)
        return narrow(out) if out.data.dtype.kind == "f" else out

    def unary_op(self, arg, op):
        if arg.dtype.scalar != bf16:
            return saved["unary_op"](self, arg, op)
        return narrow(saved["unary_op"](self, widen(arg), op))

    def create_fma(self, x, y, z):
        if bf16 not in (x.dtype.scalar, y.dtype.scalar, z.dtype.scalar):
            return saved["create_fma"](self, x, y, z)
        wide = widen(x).data.astype(np.float64) * widen(y).data + widen(z).data  # one rounding, as fma
        return narrow(TensorHandle(wide, tl.float64)) if z.dtype.scalar == bf16 else \
            TensorHandle(wide.astype(np.float32), z.dtype.scalar)

    patches = dict(cast_impl=cast_impl, create_fp_to_fp=create_fp_to_fp, create_dot=create_dot,
                   binary_op=binary_op, unary_op=unary_op, create_fma=create_fma)
    saved.update((n, getattr(builder, n)) for n in patches)
    for n, fn in patches.items():
        setattr(builder, n, fn)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(builder, n, fn)
