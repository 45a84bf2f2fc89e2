// Host-side launch helper shared by csrc/ops/attention.cu and csrc/ops/window_attention.cu.
#pragma once

#include <atomic>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace vitkern {
namespace attn {

// Kernels with more than 48 KiB of dynamic shared memory must opt in: allow the device's opt-in maximum, once per
// kernel and device (kKernel is a template argument, so each kernel instantiation has its own flags). Two threads
// may both set the same value (idempotent); the flags are atomics so that this is not a C++ data race.
template <auto kKernel>
void allow_max_dynamic_smem(int device) {
  static std::atomic<bool> done[64] = {};
  const bool cached = device >= 0 && device < 64;
  if (cached && done[device].load(std::memory_order_acquire)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin)));
  if (cached) done[device].store(true, std::memory_order_release);
}

}  // namespace attn
}  // namespace vitkern
