// vitkern_C::add_rowwise(x, bias) -> x + bias (bias broadcast over the last dim).
//
// Purpose: the smallest op that exercises the whole C++/CUDA chain end to end — device code compiled by nvcc for
// sm_90a, input validation (common/checks.h), dtype dispatch (common/dispatch.h), device guard + current stream,
// launch check, CUDA and Meta dispatch-key registration — so the GPU suite can prove vitkern._C loads and launches
// (tests/test_extension.py), and so new ops have a template to copy. It is NOT a performance kernel (one element
// per thread, 64-bit index math); don't route model code through it.
//
// Numerics: each element is computed as float(x) + float(bias) and rounded once to the output dtype, which is what
// PyTorch's `x + bias` does for fp16/bf16/fp32, so results are bit-identical.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"

namespace vitkern {
namespace {

constexpr const char* kOp = "vitkern_C::add_rowwise";

template <typename T>
__global__ void add_rowwise_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                                   int64_t rows, int64_t cols, int64_t x_row_stride) {
  const int64_t n = rows * cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t r = i / cols;
    const int64_t c = i - r * cols;
    const float v = DTypeTraits<T>::to_float(x[r * x_row_stride + c]) + DTypeTraits<T>::to_float(bias[c]);
    out[i] = DTypeTraits<T>::from_float(v);
  }
}

// Checks shared by the CUDA and Meta kernels (everything except "is on a CUDA device").
void check_args(const at::Tensor& x, const at::Tensor& bias) {
  check::dtype_in(x, {at::kHalf, at::kBFloat16, at::kFloat}, kOp, "x");
  check::same_dtype(x, "x", bias, "bias", kOp);
  check::last_dim_contiguous(x, kOp, "x");
  check::ndim(bias, 1, kOp, "bias");
  check::size(bias, 0, x.size(-1), kOp, "bias");
  check::last_dim_contiguous(bias, kOp, "bias");
}

at::Tensor add_rowwise_cuda(const at::Tensor& x, const at::Tensor& bias) {
  check::cuda(x, kOp, "x");
  check::cuda(bias, kOp, "bias");
  check::same_device(x, "x", bias, "bias", kOp);
  check_args(x, bias);

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t cols = x.size(-1);
  if (out.numel() == 0) return out;
  // (rows, cols) view with unit column stride; reshape only copies if the rows are not uniformly strided.
  const at::Tensor x2 = x.reshape({-1, cols});
  const int64_t rows = x2.size(0);

  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, int64_t{1} << 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  VITKERN_FLOAT_SWITCH(x.scalar_type(), T, [&] {
    add_rowwise_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(x2.const_data_ptr()), static_cast<const T*>(bias.const_data_ptr()),
        static_cast<T*>(out.data_ptr()), rows, cols, x2.stride(0));
  });
  VITKERN_CUDA_LAUNCH_CHECK();
  return out;
}

// Shape/dtype inference for torch.compile / FakeTensor tracing.
at::Tensor add_rowwise_meta(const at::Tensor& x, const at::Tensor& bias) {
  check_args(x, bias);
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace
}  // namespace vitkern

TORCH_LIBRARY_IMPL(vitkern_C, CUDA, m) { m.impl("add_rowwise", &vitkern::add_rowwise_cuda); }
TORCH_LIBRARY_IMPL(vitkern_C, Meta, m) { m.impl("add_rowwise", &vitkern::add_rowwise_meta); }
