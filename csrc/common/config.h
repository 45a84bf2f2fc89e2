// Build-time facts baked into vitkern._C, shared by every translation unit.
#pragma once

#define VITKERN_STRINGIFY_(...) #__VA_ARGS__
#define VITKERN_STRINGIFY(...) VITKERN_STRINGIFY_(__VA_ARGS__)
#define VITKERN_CONCAT_(a, b) a##b
#define VITKERN_CONCAT(a, b) VITKERN_CONCAT_(a, b)

// setup.py / load_jit pass -DVITKERN_CUDA_ARCHS=90a+80 (one entry per -gencode target, from VITKERN_CUDA_ARCHS; see
// vitkern/_build_config.py archs_define for why this spelling: nvcc splits -D values at commas).
#ifdef VITKERN_CUDA_ARCHS
#define VITKERN_CUDA_ARCHS_RAW VITKERN_STRINGIFY(VITKERN_CUDA_ARCHS)
#else
#define VITKERN_CUDA_ARCHS_RAW ""
#endif

// ... and -DVITKERN_CSRC_DIGEST=0x<16 hex> (vitkern/_build_config.py csrc_digest: the sources this was built from).
#ifdef VITKERN_CSRC_DIGEST
#define VITKERN_CSRC_DIGEST_STR VITKERN_STRINGIFY(VITKERN_CSRC_DIGEST)
#else
#define VITKERN_CSRC_DIGEST_STR "unknown"
#endif

#include <string>

namespace vitkern {

// The SASS targets this binary was compiled for, e.g. "sm_90a,sm_80" ("unknown" if built without our flags).
inline std::string compiled_cuda_archs() {
  const std::string raw = VITKERN_CUDA_ARCHS_RAW;
  std::string out, cur;
  for (char c : raw + "+") {
    if (c == '+') {
      if (!cur.empty()) out += (out.empty() ? "sm_" : ",sm_") + cur;
      cur.clear();
    } else if (c != ' ') {
      cur += c;
    }
  }
  return out.empty() ? std::string("unknown") : out;
}

}  // namespace vitkern
