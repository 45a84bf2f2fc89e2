// The hand-written part of the CUDA patch embedding (csrc/ops/patch_embed.cu): one kernel that, in a single launch,
//   1. gathers the image into GEMM rows: patches[b·Np + gy·gw + gx, c·ph·pw + i·pw + j] = pixel(b, c, gy·ph + i,
//      gx·pw + j) (Conv2d's (c, i, j) weight order), converted to the compute dtype T in fp32, optionally normalised
//      ((v - mean[c]) · istd[c]); any input strides (NCHW, channels_last, views), input uint8/fp16/bf16/fp32;
//   2. writes the prefix token rows out[b, p, :] = prefix[p] (+ pos[p] when the position embedding covers them);
//   3. only in the fallback mode where cuBLASLt cannot broadcast the position embedding as C: writes
//      out[b, P + n, :] = pos row of patch n, so the GEMM can accumulate onto it in place.
// The GEMM (cuBLASLt, in the .cu) then writes the patch tokens at their final offset in out.
//
// Work is a flat list of "units" (a pack of kVecK patch columns, or a pack of token-row columns), walked by a
// grid-stride loop: the gather's packs first, then the prefix rows, then the pos rows. Writes are row-contiguous
// (coalesced); reads follow the image layout: for NCHW a pack reads pixels along one image row, for channels_last
// neighbouring threads read neighbouring pixels of a row (the C interleaved channels share 32-byte sectors).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "ops/layer_norm.cuh"  // Pack / load_pack / store_pack

namespace vitkern {
namespace patch_embed {

constexpr int kThreads = 256;

struct Params {
  const void* x;  // [B, C, H, W] image, element strides below
  int64_t sb, sc, sh, sw;
  const float* norm;  // [2, C]: mean, 1/std (fp32) or nullptr
  void* patches;      // [B·Np, K] T, row stride ldp >= K
  const void* prefix;  // [P, D] T or nullptr
  const void* pos;     // [L, D] T or nullptr; L = P + Np when pos_covers_prefix, else Np
  void* out;           // [B, P + Np, D] T, contiguous
  int64_t batch;
  int C, ph, pw, gw, np;  // channels, patch size, patch grid width, patches per image
  int K;                  // C·ph·pw
  int64_t ldp;            // patch row stride (K rounded up to 16 bytes, so the GEMM operand rows are aligned)
  int P, D;
  bool pos_covers_prefix;
  bool gather, prefix_rows, pos_rows;  // which of the three parts this launch does
  bool tokens_vec;                     // token rows in 16-byte packs (D and every row start aligned)
};

template <typename U>
__device__ __forceinline__ float pixel_to_float(const U* p) {
  if constexpr (std::is_same_v<U, uint8_t>) {
    return static_cast<float>(*p);
  } else {
    return DTypeTraits<U>::to_float(*p);
  }
}

// dst[0 .. n) = a[0 .. n) (+ b[0 .. n)), fp32 sum rounded once; kVec-wide packs or scalars.
template <typename T, int kVec>
__device__ __forceinline__ void add_rows(T* dst, const T* a, const T* b) {
  float va[kVec], vb[kVec];
  layer_norm::load_pack<T, kVec>(a, va);
  if (b != nullptr) {
    layer_norm::load_pack<T, kVec>(b, vb);
#pragma unroll
    for (int e = 0; e < kVec; ++e) va[e] += vb[e];
  }
  layer_norm::store_pack<T, kVec>(dst, va);
}

// Tin: image element type; T: compute/output type; kVecK: patch columns per unit (K % kVecK == 0).
template <typename Tin, typename T, int kVecK>
__global__ void __launch_bounds__(kThreads) patch_embed_prep_kernel(const Params p) {
  constexpr int kVecD = 16 / sizeof(T);
  const int64_t gather_units = p.gather ? p.batch * p.np * (p.K / kVecK) : 0;
  const int units_per_token = p.tokens_vec ? p.D / kVecD : p.D;
  const int64_t prefix_units = p.prefix_rows ? p.batch * p.P * int64_t(units_per_token) : 0;
  const int64_t pos_units = p.pos_rows ? p.batch * p.np * int64_t(units_per_token) : 0;
  const int64_t total = gather_units + prefix_units + pos_units;
  const int64_t tokens = p.P + p.np;
  const int patch_area = p.ph * p.pw;
  const Tin* x = static_cast<const Tin*>(p.x);
  T* out = static_cast<T*>(p.out);
  const T* pos = static_cast<const T*>(p.pos);

  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t u = int64_t(blockIdx.x) * kThreads + threadIdx.x; u < total; u += step) {
    if (u < gather_units) {
      // 1. one pack of kVecK consecutive columns of patch row r
      const int per_row = p.K / kVecK;
      const int64_t r = u / per_row;
      const int k0 = static_cast<int>(u - r * per_row) * kVecK;
      const int64_t b = r / p.np;
      const int n = static_cast<int>(r - b * p.np);
      const int gy = n / p.gw, gx = n - gy * p.gw;
      const Tin* img = x + b * p.sb + int64_t(gy) * p.ph * p.sh + int64_t(gx) * p.pw * p.sw;
      float v[kVecK];
#pragma unroll
      for (int e = 0; e < kVecK; ++e) {
        const int k = k0 + e;
        const int c = k / patch_area, rem = k - c * patch_area;
        const int i = rem / p.pw, j = rem - i * p.pw;
        float val = pixel_to_float(img + c * p.sc + i * p.sh + j * p.sw);
        if (p.norm != nullptr) val = (val - p.norm[c]) * p.norm[p.C + c];
        v[e] = val;
      }
      layer_norm::store_pack<T, kVecK>(static_cast<T*>(p.patches) + r * p.ldp + k0, v);
      continue;
    }
    // 2./3. token rows: prefix (+ its pos rows), or the patch tokens' pos rows
    const bool is_prefix = u < gather_units + prefix_units;
    const int64_t w = u - gather_units - (is_prefix ? 0 : prefix_units);
    const int64_t r = w / units_per_token;
    const int col = static_cast<int>(w - r * units_per_token) * (p.tokens_vec ? kVecD : 1);
    const int rows_per_batch = is_prefix ? p.P : p.np;
    const int64_t b = r / rows_per_batch;
    const int t = static_cast<int>(r - b * rows_per_batch);
    T* dst = out + (b * tokens + (is_prefix ? t : p.P + t)) * p.D + col;
    const T* a;
    const T* add = nullptr;
    if (is_prefix) {
      a = static_cast<const T*>(p.prefix) + int64_t(t) * p.D + col;
      if (pos != nullptr && p.pos_covers_prefix) add = pos + int64_t(t) * p.D + col;
    } else {
      a = pos + int64_t((p.pos_covers_prefix ? p.P : 0) + t) * p.D + col;
    }
    if (p.tokens_vec) {
      add_rows<T, kVecD>(dst, a, add);
    } else {
      add_rows<T, 1>(dst, a, add);
    }
  }
}

}  // namespace patch_embed
}  // namespace vitkern
