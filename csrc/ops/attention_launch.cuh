// Host-side launch helper shared by csrc/ops/attention.cu and csrc/ops/window_attention.cu.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace vitkern {
namespace attn {

// Kernels with more than 48 KiB of dynamic shared memory must opt in: allow the device's opt-in maximum, once per
// kernel and device (kKernel is a template argument, so each kernel instantiation has its own flags). Two threads
// may race to set the same value: harmless.
template <auto kKernel>
void allow_max_dynamic_smem(int device) {
  static bool done[64] = {};
  const bool cached = device >= 0 && device < 64;
  if (cached && done[device]) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin)));
  if (cached) done[device] = true;
}

}  // namespace attn
}  // namespace vitkern
