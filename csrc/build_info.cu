// build_info() and the device arch probe. Compiled by nvcc so the CUDA compile-time facts are the real ones.
#include <sstream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/version.h>

#include "common/checks.h"
#include "common/config.h"
#include "common/dispatch.h"
#include "vitkern_C.h"

namespace vitkern {

std::string build_info() {
  std::ostringstream s;
  s << "{";
  s << "\"torch\": \"" << TORCH_VERSION << "\", ";
  s << "\"cuda_runtime_headers\": \"" << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10 << "\", ";
  s << "\"nvcc\": \"" << __CUDACC_VER_MAJOR__ << "." << __CUDACC_VER_MINOR__ << "." << __CUDACC_VER_BUILD__ << "\", ";
  // One entry per -gencode target (sm_90a = arch-specific Hopper features: wgmma, setmaxnreg, TMA multicast).
  s << "\"cuda_archs\": \"" << compiled_cuda_archs() << "\", ";
  s << "\"csrc_digest\": \"" << VITKERN_CSRC_DIGEST_STR << "\", ";
#ifdef __CUDA_ARCH_LIST__
  s << "\"cuda_arch_list\": \"" << VITKERN_STRINGIFY(__CUDA_ARCH_LIST__) << "\", ";  // nvcc's own view, e.g. 900
#endif
#if defined(__clang__)
  s << "\"host_compiler\": \"clang " << __clang_major__ << "." << __clang_minor__ << "\", ";
#elif defined(__GNUC__)
  s << "\"host_compiler\": \"gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "." << __GNUC_PATCHLEVEL__ << "\", ";
#endif
#ifdef __USE_FAST_MATH__
  s << "\"fast_math\": true, ";
#else
  s << "\"fast_math\": false, ";
#endif
  s << "\"dtypes\": [\"float16\", \"bfloat16\", \"float32\"], ";
  s << "\"head_dims\": [";
  for (size_t i = 0; i < sizeof(kSupportedHeadDims) / sizeof(kSupportedHeadDims[0]); ++i) {
    s << (i ? ", " : "") << kSupportedHeadDims[i];
  }
  s << "]}";
  return s.str();
}

namespace {

// Writes which compiled image is running. __CUDA_ARCH_FEAT_SM90_ALL is defined only when compiling for the
// arch-specific sm_90a target, i.e. exactly when wgmma/setmaxnreg are usable by later Hopper kernels.
__global__ void arch_probe_kernel(int* out) {
#ifdef __CUDA_ARCH__
  out[0] = __CUDA_ARCH__;
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
  out[1] = 1;
#else
  out[1] = 0;
#endif
#endif
}

}  // namespace

std::vector<int64_t> device_arch_probe(c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "vitkern_C::_device_arch_probe: device must be a CUDA device, got ", device);
  if (!device.has_index()) device = c10::Device(c10::kCUDA, c10::cuda::current_device());
  c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::zeros({2}, at::TensorOptions().dtype(at::kInt).device(device));
  arch_probe_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<int>());
  VITKERN_CUDA_LAUNCH_CHECK();
  at::Tensor host = out.cpu();
  const int* v = host.data_ptr<int>();
  return {v[0], v[1]};
}

}  // namespace vitkern
