// The hand-written pieces of the LayerNorm+MLP forward (csrc/ops/ln_mlp.cu) that cuBLASLt cannot do:
//   gelu_kernel:           h = GELU(pre), exact erf or tanh form, elementwise (may run in place, h == pre);
//   scale_rows_kernel:     W' = γ[:, None] · W and b' = γ · b (layer scale folded into fc2's rows);
//   residual_scale_kernel: y = x + γ · y (layer scale applied after fc2 wrote y = h @ W2ᵀ + b2).
// All compute in fp32 and round once; 16-byte packs (kVec = 8 fp16/bf16, 4 fp32) where every row start is aligned,
// else one element per access (kVec = 1). Grid-stride loops over packs; memory-bound.
#pragma once

#include <cstdint>

#include "common/dispatch.h"
#include "ops/layer_norm.cuh"  // Pack / load_pack / store_pack

namespace vitkern {
namespace ln_mlp {

// What the C++ op's gelu_impl / ls_impl integers mean (also documented in the op schema comment).
enum GeluImpl : int64_t {
  kGeluAuto = 0,      // tanh + fp16/bf16 + hidden % 8 == 0: the cuBLASLt GELU epilogue; otherwise the kernel
  kGeluEpilogue = 1,  // cuBLASLt GELU epilogue (tanh approximation only): an error where it cannot run
  kGeluKernel = 2,    // plain bias epilogue, then gelu_kernel
};
enum ScaleImpl : int64_t {
  kScaleAuto = 0,    // fold when M >= K, the GEMM's inner dim (hidden for ln_mlp's fc2): the fold's N·K elements then
                     // cost less than the post kernel's extra M·N pass; never in fp16 (γ·W underflows for small γ)
  kScaleFold = 1,    // γ folded into W2/b2 (scale_rows_kernel), residual through beta·C
  kScaleKernel = 2,  // fc2 writes h @ W2ᵀ + b2 into y, residual_scale_kernel adds x + γ·y
};

constexpr int kThreads = 256;

// F.gelu's two forms with PyTorch's CUDA constants and operation order
// (aten/src/ATen/native/cuda/ActivationGeluKernel.cu).
template <bool kTanh>
__device__ __forceinline__ float gelu(float x) {
  if constexpr (kTanh) {
    constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    constexpr float kKappa = 0.044715f;
    const float inner = kBeta * (x + kKappa * (x * x * x));
    return 0.5f * x * (1.f + tanhf(inner));
  } else {
    constexpr float kAlpha = 0.70710678118654752440f;  // 1 / sqrt(2)
    return x * 0.5f * (1.f + erff(x * kAlpha));
  }
}

// h[i] = GELU(pre[i]) for i < packs * kVec. pre and h may be the same buffer (no __restrict__).
template <typename T, int kVec, bool kTanh>
__global__ void __launch_bounds__(kThreads) gelu_kernel(const T* pre, T* h, int64_t packs) {
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < packs; i += step) {
    float v[kVec];
    layer_norm::load_pack<T, kVec>(pre + i * kVec, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = gelu<kTanh>(v[e]);
    layer_norm::store_pack<T, kVec>(h + i * kVec, v);
  }
}

// out[r, :] = scale[r] · w[r, :] (w row stride ldw, out contiguous [rows, cols]); bias_out[r] = scale[r] · bias[r].
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(const T* __restrict__ w, int64_t ldw,
                                                              const T* __restrict__ scale, T* __restrict__ out,
                                                              int64_t rows, int64_t cols, const T* __restrict__ bias,
                                                              T* __restrict__ bias_out) {
  const int64_t per_row = cols / kVec, total = rows * per_row;
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const int64_t r = i / per_row, c = (i - r * per_row) * kVec;
    const float s = DTypeTraits<T>::to_float(scale[r]);
    float v[kVec];
    layer_norm::load_pack<T, kVec>(w + r * ldw + c, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] *= s;
    layer_norm::store_pack<T, kVec>(out + r * cols + c, v);
    if (bias != nullptr && c == 0) bias_out[r] = DTypeTraits<T>::from_float(s * DTypeTraits<T>::to_float(bias[r]));
  }
}

// y[r, c] = x[r, c] + scale[c] · y[r, c] (x row stride ldx, y contiguous [rows, cols]); in place on y.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) residual_scale_kernel(const T* __restrict__ x, int64_t ldx,
                                                                  const T* __restrict__ scale, T* __restrict__ y,
                                                                  int64_t rows, int64_t cols) {
  const int64_t per_row = cols / kVec, total = rows * per_row;
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    const int64_t r = i / per_row, c = (i - r * per_row) * kVec;
    float xv[kVec], sv[kVec], yv[kVec];
    layer_norm::load_pack<T, kVec>(x + r * ldx + c, xv);
    layer_norm::load_pack<T, kVec>(scale + c, sv);
    layer_norm::load_pack<T, kVec>(y + r * cols + c, yv);
#pragma unroll
    for (int e = 0; e < kVec; ++e) yv[e] = xv[e] + sv[e] * yv[e];
    layer_norm::store_pack<T, kVec>(y + r * cols + c, yv);
  }
}

}  // namespace ln_mlp
}  // namespace vitkern
