// Host entry points of vitkern._C that are defined in one translation unit and registered in vitkern_C.cpp.
// (Ops whose only implementations live next to their kernel register themselves there with TORCH_LIBRARY_IMPL.)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/Device.h>

namespace vitkern {

// JSON object describing how this binary was built (csrc/build_info.cu).
std::string build_info();

// Runs a 1-thread kernel on `device` and returns {__CUDA_ARCH__, sm90a_features} of the SASS image the driver
// picked (csrc/build_info.cu).
std::vector<int64_t> device_arch_probe(c10::Device device);

// cublasLtGetVersion() of the cuBLASLt the ops call, resolved at run time (csrc/ops/ln_mlp.cu).
int64_t cublaslt_version();

}  // namespace vitkern
