// Compile-time dispatch switches: turn a runtime value (dtype, head dim, flag) into a compile-time constant/type so a
// kernel template is instantiated once per supported value, without copy-pasting launch code. Same idea as
// FlashAttention's FP16_SWITCH / HEADDIM_SWITCH / BOOL_SWITCH.
//
// Each macro evaluates an immediately-invoked lambda and returns what the body returns, so it can be used as an
// expression. The body is a lambda written at the call site; inside it the switch's name is a constant / type alias:
//
//   VITKERN_FLOAT_SWITCH(q.scalar_type(), T, [&] {          // T = float / __half / __nv_bfloat16
//     VITKERN_HEADDIM_SWITCH(q.size(-1), kHeadDim, [&] {    // kHeadDim = 32 / 64 / 80 / 96 / 128
//       VITKERN_BOOL_SWITCH(causal, kCausal, [&] {
//         attn_kernel<T, kHeadDim, kCausal><<<grid, block, smem, stream>>>(...);
//       });
//     });
//   });
//
// Unsupported values fail with a TORCH_CHECK naming the value and the supported set (validate user input with
// common/checks.h first to get a message naming the argument). Each switch multiplies compile time and binary size
// by its number of cases: nest only what a kernel really specialises on.
//
// Element types are the CUDA-native ones (__half, __nv_bfloat16, float) because kernels use their intrinsics;
// at::Half / at::BFloat16 have identical layout, so `static_cast<const T*>(t.data_ptr())` is fine.
// This header is usable from .cu (host side) and from plain .cpp (g++) translation units.
#pragma once

#include <cuda_runtime_api.h>  // __host__ / __device__ also when compiled by g++
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace vitkern {

// Head dims the attention-style kernels are instantiated for. ViT/DeiT-S/B/L use 64, ViT-H/14 uses 80, Swin uses 32,
// 96/128 cover EVA/DINOv2-style and wider variants. Keep in sync with HEAD_DIMS in vitkern/_build_config.py.
constexpr int kSupportedHeadDims[] = {32, 64, 80, 96, 128};

// Per-element-type facts + float conversions usable on host and device.
template <typename T>
struct DTypeTraits;

template <>
struct DTypeTraits<float> {
  static constexpr c10::ScalarType kScalarType = c10::ScalarType::Float;
  static constexpr const char* kName = "float32";
  static __host__ __device__ inline float to_float(float v) { return v; }
  static __host__ __device__ inline float from_float(float v) { return v; }
};

template <>
struct DTypeTraits<__half> {
  static constexpr c10::ScalarType kScalarType = c10::ScalarType::Half;
  static constexpr const char* kName = "float16";
  static __host__ __device__ inline float to_float(__half v) { return __half2float(v); }
  static __host__ __device__ inline __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct DTypeTraits<__nv_bfloat16> {
  static constexpr c10::ScalarType kScalarType = c10::ScalarType::BFloat16;
  static constexpr const char* kName = "bfloat16";
  static __host__ __device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __host__ __device__ inline __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace vitkern

// COND (bool, runtime) -> `constexpr bool CONST_NAME`.
#define VITKERN_BOOL_SWITCH(COND, CONST_NAME, ...)  \
  [&] {                                             \
    if (COND) {                                     \
      constexpr static bool CONST_NAME = true;      \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr static bool CONST_NAME = false;     \
      return __VA_ARGS__();                         \
    }                                               \
  }()

// c10::ScalarType in {Half, BFloat16} -> `using TYPE = __half | __nv_bfloat16` (tensor-core kernels).
#define VITKERN_HALF_SWITCH(SCALAR_TYPE, TYPE, ...)                                                     \
  [&] {                                                                                                 \
    const ::c10::ScalarType _vk_st = (SCALAR_TYPE);                                                     \
    if (_vk_st == ::c10::ScalarType::Half) {                                                            \
      using TYPE = __half;                                                                              \
      return __VA_ARGS__();                                                                             \
    } else if (_vk_st == ::c10::ScalarType::BFloat16) {                                                 \
      using TYPE = __nv_bfloat16;                                                                       \
      return __VA_ARGS__();                                                                             \
    } else {                                                                                            \
      TORCH_CHECK(false, "vitkern: unsupported dtype ", _vk_st, " (this kernel supports float16, bfloat16)"); \
    }                                                                                                   \
  }()

// c10::ScalarType in {Half, BFloat16, Float} -> `using TYPE = __half | __nv_bfloat16 | float`.
#define VITKERN_FLOAT_SWITCH(SCALAR_TYPE, TYPE, ...)                                                    \
  [&] {                                                                                                 \
    const ::c10::ScalarType _vk_st = (SCALAR_TYPE);                                                     \
    if (_vk_st == ::c10::ScalarType::Half) {                                                            \
      using TYPE = __half;                                                                              \
      return __VA_ARGS__();                                                                             \
    } else if (_vk_st == ::c10::ScalarType::BFloat16) {                                                 \
      using TYPE = __nv_bfloat16;                                                                       \
      return __VA_ARGS__();                                                                             \
    } else if (_vk_st == ::c10::ScalarType::Float) {                                                    \
      using TYPE = float;                                                                               \
      return __VA_ARGS__();                                                                             \
    } else {                                                                                            \
      TORCH_CHECK(false, "vitkern: unsupported dtype ", _vk_st,                                         \
                  " (this kernel supports float16, bfloat16, float32)");                                \
    }                                                                                                   \
  }()

// Head dim (exact match, no rounding up: a kernel that wants padding does it explicitly) -> `constexpr int CONST_NAME`.
#define VITKERN_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...)                                           \
  [&] {                                                                                            \
    const int64_t _vk_hd = (HEADDIM);                                                              \
    if (_vk_hd == 32) {                                                                            \
      constexpr static int CONST_NAME = 32;                                                        \
      return __VA_ARGS__();                                                                        \
    } else if (_vk_hd == 64) {                                                                     \
      constexpr static int CONST_NAME = 64;                                                        \
      return __VA_ARGS__();                                                                        \
    } else if (_vk_hd == 80) {                                                                     \
      constexpr static int CONST_NAME = 80;                                                        \
      return __VA_ARGS__();                                                                        \
    } else if (_vk_hd == 96) {                                                                     \
      constexpr static int CONST_NAME = 96;                                                        \
      return __VA_ARGS__();                                                                        \
    } else if (_vk_hd == 128) {                                                                    \
      constexpr static int CONST_NAME = 128;                                                       \
      return __VA_ARGS__();                                                                        \
    } else {                                                                                       \
      TORCH_CHECK(false, "vitkern: unsupported head_dim ", _vk_hd,                                 \
                  " (compiled for 32, 64, 80, 96, 128)");                                          \
    }                                                                                              \
  }()
