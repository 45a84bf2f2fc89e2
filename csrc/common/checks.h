// Input validation for vitkern ops, on top of TORCH_CHECK (failures surface in Python as RuntimeError carrying the
// message below).
//
// Every helper takes the op name and the argument name, so a failure reads e.g.
//   vitkern_C::add_rowwise: x must be a CUDA tensor, got a tensor on cpu
//   vitkern_C::add_rowwise: bias must have dtype float16, bfloat16 or float32, got Double
// Usage (inside an op):
//   constexpr const char* kOp = "vitkern_C::my_op";
//   vitkern::check::cuda(q, kOp, "q");
//   vitkern::check::dtype_in(q, {at::kHalf, at::kBFloat16}, kOp, "q");
//   ...launch...
//   VITKERN_CUDA_LAUNCH_CHECK();
#pragma once

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "common/config.h"

namespace vitkern {
namespace check {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    default: return c10::toString(t);
  }
}

inline std::string join_dtypes(std::initializer_list<at::ScalarType> allowed) {
  std::ostringstream s;
  size_t i = 0;
  for (auto t : allowed) {
    if (i > 0) s << (i + 1 == allowed.size() ? " or " : ", ");
    s << dtype_name(t);
    ++i;
  }
  return s.str();
}

// t lives on a CUDA device.
inline void cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
}

// t.dtype() is one of `allowed`.
inline void dtype_in(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed, const char* op,
                     const char* name) {
  for (auto a : allowed) {
    if (t.scalar_type() == a) return;
  }
  TORCH_CHECK(false, op, ": ", name, " must have dtype ", join_dtypes(allowed), ", got ", dtype_name(t.scalar_type()));
}

// a and b have the same dtype.
inline void same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name, " must have the same dtype, got ",
              dtype_name(a.scalar_type()), " and ", dtype_name(b.scalar_type()));
}

// a and b are on the same device (same CUDA ordinal, not just both CUDA).
inline void same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                        const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

// t.dim() == n.
inline void ndim(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == n, op, ": ", name, " must be ", n, "-D, got ", t.dim(), "-D tensor of shape ", t.sizes());
}

// lo <= t.dim() <= hi.
inline void ndim_between(const at::Tensor& t, int64_t lo, int64_t hi, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= lo && t.dim() <= hi, op, ": ", name, " must have between ", lo, " and ", hi,
              " dims, got shape ", t.sizes());
}

// t.size(dim) == expected (dim may be negative).
inline void size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name) {
  TORCH_CHECK(t.dim() > 0, op, ": ", name, " must have at least 1 dim, got a 0-D tensor");
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must be ", expected, ", got ", t.size(dim),
              " (shape ", t.sizes(), ")");
}

// t.sizes() == expected exactly.
inline void shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// Unit stride in the last dim (rows may be strided, e.g. a q/k/v slice of a fused qkv projection).
inline void last_dim_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() > 0, op, ": ", name, " must have at least 1 dim, got a 0-D tensor");
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, op, ": ", name,
              " must be contiguous in its last dim (stride(-1) == 1), got strides ", t.strides(),
              " for shape ", t.sizes(), "; call .contiguous() first");
}

// Fully contiguous (row-major).
inline void contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides(), " for shape ",
              t.sizes(), "; call .contiguous() first");
}

// data_ptr() aligned to `bytes` (for vectorised 8/16-byte loads, TMA needs 16).
inline void aligned(const at::Tensor& t, int64_t bytes, const char* op, const char* name) {
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % static_cast<std::uintptr_t>(bytes) == 0, op, ": ",
              name, " must be ", bytes, "-byte aligned (storage offset ", t.storage_offset(), " elements breaks it)");
}

// After a <<<>>> launch. Turns "no kernel image is available" (the .so was compiled for other archs, e.g. only
// sm_90a and this is an A100) into an actionable message; everything else goes through c10's standard check
// (device-side assertion info, c10::AcceleratorError).
inline void kernel_launch(const char* file, int line) {
  const cudaError_t err = cudaPeekAtLastError();
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // launch errors are not sticky: clear it so the next CUDA call is unaffected
    int dev = -1, major = 0, minor = 0;
    (void)cudaGetDevice(&dev);
    (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    TORCH_CHECK(false, "vitkern CUDA kernel launch failed at ", file, ":", line, ": ", cudaGetErrorString(err),
                ". vitkern._C was compiled for [", compiled_cuda_archs(), "] but this device is sm_", major, minor,
                "; rebuild with e.g. VITKERN_CUDA_ARCHS=\"90a;", major, minor, "\" (or use the Triton backend)");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace check
}  // namespace vitkern

// Call right after every kernel launch.
#define VITKERN_CUDA_LAUNCH_CHECK() ::vitkern::check::kernel_launch(__FILE__, __LINE__)
