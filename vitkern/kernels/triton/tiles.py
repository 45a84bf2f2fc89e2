"""Register-tile helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def column_halves(x):
    """[R, W] -> its columns [0, W/2) and [W/2, W). In an MMA accumulator layout this only selects registers (no
    data movement); an epilogue run half by half keeps fewer registers live than one over the whole tile."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, (R, 2, W // 2)), (0, 2, 1)))
