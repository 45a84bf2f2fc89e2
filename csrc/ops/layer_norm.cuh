// LayerNorm kernels (with an optional fused residual add), used by csrc/ops/layer_norm.cu.
//
// Same math and contract as the Triton kernels (vitkern/kernels/triton/layer_norm.py):
//   forward:  s = x + residual (rounded to x's dtype), y = (s - mean) * rstd * weight + bias, mean/rstd fp32;
//   backward: dx = rstd * (w*dy - mean(w*dy) - x̂ * mean(w*dy*x̂)) (+ dsum), dweight/dbias as fp32 per-CTA partials
//             [G, N] summed by torch afterwards (deterministic, no atomics).
//
// Layout: a "row group" of kWarps warps owns one row; every thread holds kElems values of it in registers
// (compile-time maximum; the runtime N may be smaller, columns >= N are masked). Thread `lane` of a group owns the
// packs j = 0..kPacks-1 at columns (j * kThreadsPerRow + lane) * kVec .. + kVec - 1, so each pack load is a
// coalesced 16-byte access (kVec = 8 bf16/fp16 or 4 fp32) on the vectorised path, or one element (kVec = 1) on the
// scalar fallback (N not a multiple of 8/4, or a pointer / row stride not 16-byte aligned). Short ViT rows
// (192-1280) get one warp per row and several rows per CTA; wider rows get several warps per row, reduced through
// shared memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dispatch.h"

namespace vitkern {
namespace layer_norm {

constexpr int kMaxWidth = 8192;  // widest row any instantiation holds (keep in sync with CUDA_MAX_N in Python)

// Compile-time shape of one instantiation.
template <typename T, int kElems_, int kWarps_, bool kVectorized>
struct RowConfig {
  static constexpr int kElems = kElems_;                              // values per thread (max)
  static constexpr int kWarps = kWarps_;                              // warps per row
  static constexpr int kVec = kVectorized ? 16 / int(sizeof(T)) : 1;  // elements per load/store
  static constexpr int kPacks = kElems / kVec;
  static constexpr int kThreadsPerRow = 32 * kWarps;
  static constexpr int kRowsPerCta = kWarps >= 4 ? 1 : 4 / kWarps;  // at least 4 warps per CTA
  static constexpr int kThreads = kRowsPerCta * kThreadsPerRow;
  static constexpr int kMaxN = kElems * kThreadsPerRow;
  static_assert(kElems % 8 == 0, "kElems must be a multiple of the widest pack (8 x 16-bit)");
};

// kN elements of U; 16-byte aligned (or its own size when smaller) so a load is one (or two) vector instructions.
template <typename U, int kN>
struct alignas(sizeof(U) * kN >= 16 ? 16 : sizeof(U) * kN) Pack {
  U v[kN];
};

template <typename U, int kN>
__device__ __forceinline__ void load_pack(const U* __restrict__ p, float (&out)[kN]) {
  const Pack<U, kN> pk = *reinterpret_cast<const Pack<U, kN>*>(p);
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = DTypeTraits<U>::to_float(pk.v[i]);
}

template <typename U, int kN>
__device__ __forceinline__ void store_pack(U* __restrict__ p, const float (&in)[kN]) {
  Pack<U, kN> pk;
#pragma unroll
  for (int i = 0; i < kN; ++i) pk.v[i] = DTypeTraits<U>::from_float(in[i]);
  *reinterpret_cast<Pack<U, kN>*>(p) = pk;
}

// Sum of kCount values over the kWarps warps of a row group; every thread of the group gets the totals.
// smem: [kRowsPerCta * kWarps * kCount] floats. Called by every thread of the CTA (it may __syncthreads).
// The cross-warp sum runs in a fixed order, so results are bitwise reproducible.
template <int kWarps, int kCount>
__device__ __forceinline__ void group_sum(float (&v)[kCount], float* smem) {
#pragma unroll
  for (int c = 0; c < kCount; ++c) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[c] += __shfl_xor_sync(0xffffffffu, v[c], off);
  }
  if constexpr (kWarps > 1) {
    const int warp = threadIdx.x / 32;  // global warp index in the CTA; the group's warps are consecutive
    const int first = (warp / kWarps) * kWarps;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int c = 0; c < kCount; ++c) smem[warp * kCount + c] = v[c];
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kCount; ++c) {
      float t = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) t += smem[(first + w) * kCount + c];
      v[c] = t;
    }
    __syncthreads();  // smem is reused by the next call
  }
}

struct FwdParams {
  const void* x;         // [M, N] T, row stride x_stride, unit column stride
  const void* residual;  // [M, N] T or nullptr
  const void* weight;    // [N] P or nullptr
  const void* bias;      // [N] P or nullptr
  void* y;               // [M, N] T
  void* sum;             // [M, N] T (written when residual != nullptr)
  float* mean;           // [M]
  float* rstd;           // [M]
  int64_t rows;
  int cols;
  int64_t x_stride, res_stride, y_stride, sum_stride;
  float eps;
};

// T: activation dtype; P: weight/bias dtype (T or float).
template <typename T, typename P, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) layer_norm_fwd_kernel(const FwdParams p) {
  constexpr int kVec = Cfg::kVec, kPacks = Cfg::kPacks, kThreadsPerRow = Cfg::kThreadsPerRow;
  __shared__ float red[Cfg::kRowsPerCta * Cfg::kWarps];
  const int group = threadIdx.x / kThreadsPerRow, lane = threadIdx.x % kThreadsPerRow;
  const int64_t row = int64_t(blockIdx.x) * Cfg::kRowsPerCta + group;
  const bool row_ok = row < p.rows;  // no early return: every thread takes part in group_sum's barriers
  const int n = p.cols;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;

  // 1. load the row (x, or x + residual rounded to T and written out as the sum)
  float v[kPacks][kVec];
  float acc[1] = {0.f};
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const int col = (j * kThreadsPerRow + lane) * kVec;
    if (row_ok && col < n) {
      load_pack<T, kVec>(x + col, v[j]);
      if (p.residual != nullptr) {
        float r[kVec];
        load_pack<T, kVec>(static_cast<const T*>(p.residual) + row * p.res_stride + col, r);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[j][i] = DTypeTraits<T>::to_float(DTypeTraits<T>::from_float(v[j][i] + r[i]));
        store_pack<T, kVec>(static_cast<T*>(p.sum) + row * p.sum_stride + col, v[j]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[j][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[0] += v[j][i];
  }

  // 2. two-pass statistics from registers: mean, then the centred variance (no E[x²]-E[x]² cancellation)
  group_sum<Cfg::kWarps, 1>(acc, red);
  const float mean = acc[0] / n;
  acc[0] = 0.f;
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const bool ok = (j * kThreadsPerRow + lane) * kVec < n;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      v[j][i] = ok ? v[j][i] - mean : 0.f;
      acc[0] += v[j][i] * v[j][i];
    }
  }
  group_sum<Cfg::kWarps, 1>(acc, red);
  const float rstd = 1.f / sqrtf(acc[0] / n + p.eps);  // IEEE sqrt and division, as the Triton kernel

  // 3. y = x̂ * weight + bias
  if (!row_ok) return;  // no barriers below
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const int col = (j * kThreadsPerRow + lane) * kVec;
    if (col >= n) continue;
    float w[kVec], b[kVec];
    if (p.weight != nullptr) {
      load_pack<P, kVec>(static_cast<const P*>(p.weight) + col, w);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) w[i] = 1.f;
    }
    if (p.bias != nullptr) {
      load_pack<P, kVec>(static_cast<const P*>(p.bias) + col, b);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) b[i] = 0.f;
    }
    float out[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = v[j][i] * rstd * w[i] + b[i];
    store_pack<T, kVec>(static_cast<T*>(p.y) + row * p.y_stride + col, out);
  }
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

struct BwdParams {
  const void* dy;      // [M, N] T
  const void* dsum;    // [M, N] T or nullptr (gradient flowing into the residual-sum output)
  const void* xs;      // [M, N] T, the normalised input (x, or x + residual)
  const void* weight;  // [N] P or nullptr
  const float* mean;   // [M]
  const float* rstd;   // [M]
  void* dx;            // [M, N] T
  float* dw_part;      // [G, N] fp32 or nullptr (not needed)
  float* db_part;      // [G, N] fp32 or nullptr
  int64_t rows;
  int cols;
  int64_t rows_per_cta;  // CTA g owns rows [g * rows_per_cta, (g + 1) * rows_per_cta), a multiple of kRowsPerCta
  int64_t dy_stride, dsum_stride, xs_stride, dx_stride;
};

template <typename Cfg>
struct BwdSmem {
  float stats[Cfg::kRowsPerCta * Cfg::kWarps * 2];
  // the other row groups' weight/bias-gradient partials, summed into group 0's before the partial row is written
  float part[Cfg::kRowsPerCta > 1 ? (Cfg::kRowsPerCta - 1) * Cfg::kThreadsPerRow * Cfg::kElems : 1];
};

// Sum the per-group column partials of a CTA and write them as one fp32 row: groups 1.. park theirs in shared
// memory, group 0 adds them in a fixed order and stores. Called by every thread of the CTA (barriers).
template <typename Cfg>
__device__ __forceinline__ void store_partial(float (&part)[Cfg::kPacks][Cfg::kVec], float* smem_part, float* out,
                                              int group, int lane, int n) {
  constexpr int kVec = Cfg::kVec, kPacks = Cfg::kPacks, kThreadsPerRow = Cfg::kThreadsPerRow;
  if constexpr (Cfg::kRowsPerCta > 1) {
    if (group > 0) {
#pragma unroll
      for (int j = 0; j < kPacks; ++j) {
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          smem_part[((group - 1) * Cfg::kElems + j * kVec + i) * kThreadsPerRow + lane] = part[j][i];
      }
    }
    __syncthreads();
    if (group == 0) {
      for (int g = 1; g < Cfg::kRowsPerCta; ++g) {
#pragma unroll
        for (int j = 0; j < kPacks; ++j) {
#pragma unroll
          for (int i = 0; i < kVec; ++i)
            part[j][i] += smem_part[((g - 1) * Cfg::kElems + j * kVec + i) * kThreadsPerRow + lane];
        }
      }
    }
    __syncthreads();  // smem_part is reused by the next call
  }
  if (group == 0) {
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      const int col = (j * kThreadsPerRow + lane) * kVec;
      if (col < n) store_pack<float, kVec>(out + col, part[j]);
    }
  }
}

template <typename T, typename P, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) layer_norm_bwd_kernel(const BwdParams p) {
  constexpr int kVec = Cfg::kVec, kPacks = Cfg::kPacks, kThreadsPerRow = Cfg::kThreadsPerRow;
  __shared__ BwdSmem<Cfg> smem;
  const int group = threadIdx.x / kThreadsPerRow, lane = threadIdx.x % kThreadsPerRow;
  const int n = p.cols;
  const int64_t start = int64_t(blockIdx.x) * p.rows_per_cta;
  const int64_t end = start + p.rows_per_cta < p.rows ? start + p.rows_per_cta : p.rows;
  const bool need_dw = p.dw_part != nullptr, need_db = p.db_part != nullptr;

  float dw[kPacks][kVec], db[kPacks][kVec];  // this thread's columns, summed over its rows
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) dw[j][i] = db[j][i] = 0.f;
  }

  // every group runs the same number of iterations (barriers in group_sum); rows past `end` are masked
  for (int64_t base = start; base < end; base += Cfg::kRowsPerCta) {
    const int64_t row = base + group;
    const bool row_ok = row < end;
    const float mean = row_ok ? p.mean[row] : 0.f, rstd = row_ok ? p.rstd[row] : 0.f;
    const T* xs = static_cast<const T*>(p.xs) + row * p.xs_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_stride;

    // 1. x̂ and w*dy in registers; accumulate dweight += dy*x̂, dbias += dy
    float xhat[kPacks][kVec], wdy[kPacks][kVec];
    float acc[2] = {0.f, 0.f};  // sum(x̂ * w*dy), sum(w*dy)
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      const int col = (j * kThreadsPerRow + lane) * kVec;
      if (row_ok && col < n) {
        float g[kVec], w[kVec];
        load_pack<T, kVec>(xs + col, xhat[j]);
        load_pack<T, kVec>(dy + col, g);
        if (p.weight != nullptr) {
          load_pack<P, kVec>(static_cast<const P*>(p.weight) + col, w);  // L1/L2 resident after the first row
        } else {
#pragma unroll
          for (int i = 0; i < kVec; ++i) w[i] = 1.f;
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          xhat[j][i] = (xhat[j][i] - mean) * rstd;
          wdy[j][i] = g[i] * w[i];
          dw[j][i] += g[i] * xhat[j][i];
          db[j][i] += g[i];
          acc[0] += xhat[j][i] * wdy[j][i];
          acc[1] += wdy[j][i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) xhat[j][i] = wdy[j][i] = 0.f;
      }
    }
    group_sum<Cfg::kWarps, 2>(acc, smem.stats);
    const float c1 = acc[0] / n, c2 = acc[1] / n;

    // 2. dx = (w*dy - (x̂*c1 + c2)) * rstd (+ dsum)
    if (!row_ok) continue;  // group_sum is the only barrier in the loop and it is behind us
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      const int col = (j * kThreadsPerRow + lane) * kVec;
      if (col >= n) continue;
      float d[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) d[i] = (wdy[j][i] - (xhat[j][i] * c1 + c2)) * rstd;
      if (p.dsum != nullptr) {
        float ds[kVec];
        load_pack<T, kVec>(static_cast<const T*>(p.dsum) + row * p.dsum_stride + col, ds);
#pragma unroll
        for (int i = 0; i < kVec; ++i) d[i] += ds[i];
      }
      store_pack<T, kVec>(static_cast<T*>(p.dx) + row * p.dx_stride + col, d);
    }
  }

  // 3. one fp32 partial row per CTA for each needed gradient (need_* is uniform over the CTA)
  if (need_dw) store_partial<Cfg>(dw, smem.part, p.dw_part + int64_t(blockIdx.x) * n, group, lane, n);
  if (need_db) store_partial<Cfg>(db, smem.part, p.db_part + int64_t(blockIdx.x) * n, group, lane, n);
}

}  // namespace layer_norm
}  // namespace vitkern

// Row width N -> the forward instantiation holding it: `constexpr int ELEMS` values per thread, `WARPS` warps per
// row (max width ELEMS * 32 * WARPS). One warp per row up to 1280 (ViT-S/B/L/H), several beyond.
#define VITKERN_LN_FWD_WIDTH_SWITCH(N, ELEMS, WARPS, ...)                                            \
  [&] {                                                                                              \
    const int64_t _vk_n = (N);                                                                       \
    if (_vk_n <= 256) { constexpr static int ELEMS = 8, WARPS = 1; return __VA_ARGS__(); }           \
    else if (_vk_n <= 512) { constexpr static int ELEMS = 16, WARPS = 1; return __VA_ARGS__(); }     \
    else if (_vk_n <= 768) { constexpr static int ELEMS = 24, WARPS = 1; return __VA_ARGS__(); }     \
    else if (_vk_n <= 1024) { constexpr static int ELEMS = 32, WARPS = 1; return __VA_ARGS__(); }    \
    else if (_vk_n <= 1280) { constexpr static int ELEMS = 40, WARPS = 1; return __VA_ARGS__(); }    \
    else if (_vk_n <= 2048) { constexpr static int ELEMS = 32, WARPS = 2; return __VA_ARGS__(); }    \
    else if (_vk_n <= 4096) { constexpr static int ELEMS = 32, WARPS = 4; return __VA_ARGS__(); }    \
    else if (_vk_n <= 8192) { constexpr static int ELEMS = 32, WARPS = 8; return __VA_ARGS__(); }    \
    else { TORCH_CHECK(false, "vitkern: LayerNorm row width ", _vk_n, " > 8192 is not compiled"); } \
  }()

// The backward holds x̂, w*dy and the two gradient accumulators per value (4x the forward's registers), so it
// keeps at most 24 values per thread and spreads wider rows over more warps.
#define VITKERN_LN_BWD_WIDTH_SWITCH(N, ELEMS, WARPS, ...)                                            \
  [&] {                                                                                              \
    const int64_t _vk_n = (N);                                                                       \
    if (_vk_n <= 256) { constexpr static int ELEMS = 8, WARPS = 1; return __VA_ARGS__(); }           \
    else if (_vk_n <= 512) { constexpr static int ELEMS = 16, WARPS = 1; return __VA_ARGS__(); }     \
    else if (_vk_n <= 768) { constexpr static int ELEMS = 24, WARPS = 1; return __VA_ARGS__(); }     \
    else if (_vk_n <= 1024) { constexpr static int ELEMS = 16, WARPS = 2; return __VA_ARGS__(); }    \
    else if (_vk_n <= 1536) { constexpr static int ELEMS = 24, WARPS = 2; return __VA_ARGS__(); }    \
    else if (_vk_n <= 2048) { constexpr static int ELEMS = 16, WARPS = 4; return __VA_ARGS__(); }    \
    else if (_vk_n <= 4096) { constexpr static int ELEMS = 16, WARPS = 8; return __VA_ARGS__(); }    \
    else if (_vk_n <= 8192) { constexpr static int ELEMS = 16, WARPS = 16; return __VA_ARGS__(); }   \
    else { TORCH_CHECK(false, "vitkern: LayerNorm row width ", _vk_n, " > 8192 is not compiled"); } \
  }()
