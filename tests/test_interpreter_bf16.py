"""The interpreter's bf16 made exact (vitkern.testing.interpreter_bf16, on for every interpreter test through
conftest): conversions round to nearest even like the GPU's cvt.rn, dots of bf16 tiles equal fp32 matmuls of the
same values, and elementwise bf16 arithmetic rounds each result once."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from vitkern.testing import randn, seed_for
from vitkern.testing.interpreter_bf16 import bf16_to_f32, exact_bf16, to_bf16

pytestmark = pytest.mark.interpreter


def test_rounding_matches_torch_ties_to_even_and_carries():
    one = np.float32(1.0).view(np.uint32)
    # 1 + half an ulp (tie: to even, 1.0), 1 + 3 half ulps (tie: up to even), just under 2 (carries into the
    # exponent: 2.0), the largest finite fp32 (overflows to inf, as torch does), and a subnormal
    bits = np.array([one + (1 << 15), one + (3 << 15), np.float32(1.9999999).view(np.uint32), 0x7F7FFFFF, 0x00000001],
                    dtype=np.uint32)
    x = bits.view(np.float32)
    got = bf16_to_f32(to_bf16(x))
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got, want)
    assert list(got[:3]) == [1.0, 1.0 + 2**-6, 2.0]
    assert bf16_to_f32(to_bf16(np.float32(1.9999999), toward_zero=True)) == np.float32(2 - 2**-7)


@triton.jit
def _bf16_ops(A, B, C, OUT_DOT, OUT_EW, OUT_CAST, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    # A [M, K], B [K, N] bf16; C [M, N] fp32; OUT_DOT fp32 = A @ B; OUT_EW bf16 = (A·A + A)[:, :N];
    # OUT_CAST bf16 = C rounded
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :])
    b = tl.load(B + k[:, None] * N + n[None, :])
    tl.store(OUT_DOT + m[:, None] * N + n[None, :], tl.dot(a, b))
    a_mn = tl.load(A + m[:, None] * K + n[None, :])
    tl.store(OUT_EW + m[:, None] * N + n[None, :], a_mn * a_mn + a_mn)
    c = tl.load(C + m[:, None] * N + n[None, :])
    tl.store(OUT_CAST + m[:, None] * N + n[None, :], c.to(tl.bfloat16))


def test_dot_elementwise_and_cast_compute_like_the_gpu():
    seed = seed_for("interp-bf16")
    M, N, K = 16, 16, 32
    a = randn((M, K), dtype=torch.bfloat16, device="cpu", seed=seed)
    b = randn((K, N), dtype=torch.bfloat16, device="cpu", seed=seed + 1)
    c = randn((M, N), dtype=torch.float32, device="cpu", seed=seed + 2)
    out_dot = torch.full((M, N), float("nan"))
    out_ew = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    out_cast = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    with exact_bf16():
        _bf16_ops[(1,)](a, b, c, out_dot, out_ew, out_cast, M=M, N=N, K=K)
    # products of bf16 values are exact in fp32: only the fp32 summation order differs from float64
    exact = a.double() @ b.double()
    assert (out_dot.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    # each bf16 op rounds once: a·a rounded, then + a rounded (torch's bf16 elementwise ops do the same)
    a_mn = a[:, :N]
    assert torch.equal(out_ew, a_mn * a_mn + a_mn)
    assert torch.equal(out_cast, c.to(torch.bfloat16))
