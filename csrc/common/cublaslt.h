// Small cuBLASLt helper: RAII descriptors, a status check that names the call, and one `matmul` entry point that
// runs D = alpha·op(A)·op(B) + beta·C with an epilogue (bias, GELU, GELU + aux) on the current stream, with the
// algorithm chosen by cuBLASLt's heuristic once per problem signature and cached.
//
// Linking: torch.utils.cpp_extension links extensions against c10/torch/cudart only, not cuBLASLt, and torch loads
// the pip wheel's libcublasLt.so.<major> with RTLD_LOCAL, so undefined cublasLt* symbols in vitkern._C would not
// resolve at load time (checked: "undefined symbol: cublasLtGetVersion"). Instead of adding a link dependency (which
// needs an unversioned libcublasLt.so at build time and changes in setup.py / load_jit), the entry points are looked
// up once with dlopen(RTLD_NOLOAD) + dlsym in the libcublasLt that torch has already loaded. That is also exactly
// the library whose handle at::cuda::getCurrentCUDABlasLtHandle() returns, so handle and calls never come from two
// different copies.
//
// Conventions: cuBLASLt is column-major. A row-major [R, C] tensor with row stride ld IS a column-major C x R matrix
// with leading dimension ld, so row-major Y[M, N] = X[M, K] @ W[N, K]ᵀ is computed as the column-major
// Yᵀ (N x M) = op(W)·Xᵀ with op = transpose: m = N, n = M, k = K (see `linear_args`). The bias epilogue adds a vector
// of length m (= N, one value per output feature) and the aux (pre-activation) matrix has the layout of D.
//
// Workspace: torch's per-(handle, stream) cuBLASLt workspace (at::cuda::getCUDABlasLtWorkspace(), allocated from the
// CUDA caching allocator; the same buffer torch's own cuBLASLt matmuls use on this stream, so no extra memory and no
// allocation per call).
#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include <cublasLt.h>

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

namespace vitkern {
namespace lt {

#define VITKERN_LT_FUNCS(X)                    \
  X(cublasLtGetVersion)                        \
  X(cublasLtGetStatusString)                   \
  X(cublasLtMatmul)                            \
  X(cublasLtMatmulAlgoGetHeuristic)            \
  X(cublasLtMatmulDescCreate)                  \
  X(cublasLtMatmulDescDestroy)                 \
  X(cublasLtMatmulDescSetAttribute)            \
  X(cublasLtMatrixLayoutCreate)                \
  X(cublasLtMatrixLayoutDestroy)               \
  X(cublasLtMatrixLayoutSetAttribute)          \
  X(cublasLtMatmulPreferenceCreate)            \
  X(cublasLtMatmulPreferenceDestroy)           \
  X(cublasLtMatmulPreferenceSetAttribute)

// The cuBLASLt entry points vitkern uses, resolved from the already-loaded library.
struct Api {
#define VITKERN_LT_MEMBER(name) decltype(&::name) name = nullptr;
  VITKERN_LT_FUNCS(VITKERN_LT_MEMBER)
#undef VITKERN_LT_MEMBER
};

inline const Api& api() {
  static const Api table = [] {
    Api a;
    const std::string soname = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) {
      const char* why = dlerror();
      TORCH_CHECK(false, "vitkern: ", soname, " is not loaded in this process (", why ? why : "dlopen failed",
                  "). vitkern._C was compiled against cuBLAS ", CUBLAS_VER_MAJOR, ".x headers and calls the cuBLASLt "
                  "that torch loads (torch's CUDA build links it); is this torch built for another CUDA major "
                  "version? Rebuild vitkern._C against it.");
    }
#define VITKERN_LT_RESOLVE(name)                                                                              \
  a.name = reinterpret_cast<decltype(a.name)>(dlsym(lib, #name));                                            \
  TORCH_CHECK(a.name != nullptr, "vitkern: symbol " #name " not found in ", soname, " (cuBLASLt too old?)");
    VITKERN_LT_FUNCS(VITKERN_LT_RESOLVE)
#undef VITKERN_LT_RESOLVE
    return a;
  }();
  return table;
}

inline const char* status_string(cublasStatus_t s) {
  const char* msg = api().cublasLtGetStatusString ? api().cublasLtGetStatusString(s) : nullptr;
  return msg ? msg : "unknown cuBLAS status";
}

}  // namespace lt
}  // namespace vitkern

// Checks a cublasStatus_t and names the failing call (and where it was made) in the error.
#define VITKERN_CUBLAS_CHECK(EXPR)                                                                               \
  do {                                                                                                          \
    const cublasStatus_t _vk_status = (EXPR);                                                                   \
    TORCH_CHECK(_vk_status == CUBLAS_STATUS_SUCCESS, "vitkern: cuBLASLt call `" #EXPR "` failed with ",         \
                ::vitkern::lt::status_string(_vk_status), " (status ", static_cast<int>(_vk_status), ") at ",   \
                __FILE__, ":", __LINE__);                                                                       \
  } while (0)

namespace vitkern {
namespace lt {

// --------------------------------------------------------------------------------------------------- RAII handles
class MatmulDesc {
 public:
  MatmulDesc(cublasComputeType_t compute, cudaDataType_t scale) {
    VITKERN_CUBLAS_CHECK(api().cublasLtMatmulDescCreate(&desc_, compute, scale));
  }
  ~MatmulDesc() {
    if (desc_ != nullptr) api().cublasLtMatmulDescDestroy(desc_);
  }
  MatmulDesc(const MatmulDesc&) = delete;
  MatmulDesc& operator=(const MatmulDesc&) = delete;
  template <typename V>
  void set(cublasLtMatmulDescAttributes_t attr, const V& value) {
    VITKERN_CUBLAS_CHECK(api().cublasLtMatmulDescSetAttribute(desc_, attr, &value, sizeof(V)));
  }
  cublasLtMatmulDesc_t get() const { return desc_; }

 private:
  cublasLtMatmulDesc_t desc_ = nullptr;
};

class Layout {
 public:
  // rows x cols column-major matrix with leading dimension ld; batch > 1: strided batch with `stride` elements.
  Layout(cudaDataType_t type, uint64_t rows, uint64_t cols, int64_t ld, int32_t batch = 1, int64_t stride = 0) {
    VITKERN_CUBLAS_CHECK(api().cublasLtMatrixLayoutCreate(&layout_, type, rows, cols, ld));
    if (batch > 1) {
      VITKERN_CUBLAS_CHECK(api().cublasLtMatrixLayoutSetAttribute(layout_, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch,
                                                                  sizeof(batch)));
      VITKERN_CUBLAS_CHECK(api().cublasLtMatrixLayoutSetAttribute(
          layout_, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
  }
  ~Layout() {
    if (layout_ != nullptr) api().cublasLtMatrixLayoutDestroy(layout_);
  }
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
  cublasLtMatrixLayout_t get() const { return layout_; }

 private:
  cublasLtMatrixLayout_t layout_ = nullptr;
};

class Preference {
 public:
  Preference() { VITKERN_CUBLAS_CHECK(api().cublasLtMatmulPreferenceCreate(&pref_)); }
  ~Preference() {
    if (pref_ != nullptr) api().cublasLtMatmulPreferenceDestroy(pref_);
  }
  Preference(const Preference&) = delete;
  Preference& operator=(const Preference&) = delete;
  template <typename V>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const V& value) {
    VITKERN_CUBLAS_CHECK(api().cublasLtMatmulPreferenceSetAttribute(pref_, attr, &value, sizeof(V)));
  }
  cublasLtMatmulPreference_t get() const { return pref_; }

 private:
  cublasLtMatmulPreference_t pref_ = nullptr;
};

// --------------------------------------------------------------------------------------------------- one matmul
inline cudaDataType_t cuda_type(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Half: return CUDA_R_16F;
    case c10::ScalarType::BFloat16: return CUDA_R_16BF;
    case c10::ScalarType::Float: return CUDA_R_32F;
    default: TORCH_CHECK(false, "vitkern cuBLASLt: unsupported dtype ", t, " (float16, bfloat16, float32)");
  }
}

// Largest power of two <= 256 (cuBLASLt's default assumption) dividing every address the matmul will form from
// `ptr` (the base and each batch's offset).
inline uint32_t alignment(const void* ptr, int64_t batch_stride_bytes = 0) {
  if (ptr == nullptr) return 256;
  uint64_t v = reinterpret_cast<uintptr_t>(ptr) | static_cast<uint64_t>(batch_stride_bytes) | 256u;
  return static_cast<uint32_t>(v & (~v + 1));  // lowest set bit
}

// D = alpha·op(A)·op(B) + beta·C, then the epilogue; column-major cuBLASLt terms (see the top of this file).
struct MatmulArgs {
  c10::ScalarType dtype;  // A, B, C, D, bias and aux all have it; fp32 accumulation (TF32 if torch allows it)
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  int32_t batch = 1;
  const void* a = nullptr;  // op(A): m x k; stored k x m (trans_a) or m x k
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;  // op(B): k x n; stored n x k (trans_b) or k x n
  int64_t ldb = 0, stride_b = 0;
  const void* c = nullptr;  // m x n or nullptr (beta = 0); stride_c = 0 broadcasts one C to every batch
  int64_t ldc = 0, stride_c = 0;
  void* d = nullptr;  // m x n
  int64_t ldd = 0, stride_d = 0;
  float beta = 1.f;  // used when c != nullptr
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // [m], for the *BIAS epilogues (broadcast over n and the batch)
  void* aux = nullptr;         // m x n pre-activation output of the *_AUX epilogues
  int64_t aux_ld = 0, aux_stride = 0;
};

namespace detail {

struct CachedAlgo {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};

inline std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
inline std::unordered_map<std::string, CachedAlgo>& cache() {
  static std::unordered_map<std::string, CachedAlgo> c;
  return c;
}

}  // namespace detail

// torch's own setting decides TF32 for fp32 matmuls, as for torch.matmul (off by default), read the way torch's
// cuBLAS calls read it: the fp32-precision setting (the legacy allowTF32CuBLAS getter throws when a program mixed
// the legacy and new APIs) and NoTF32Guard, which torch's own backward formulas use to keep exact fp32.
inline bool torch_matmul_allows_tf32() {
  if (at::NoTF32Guard::should_disable_tf32()) return false;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

// Runs the matmul. Returns false (and launches nothing) when cuBLASLt has no algorithm for it, e.g. an epilogue
// that this cuBLASLt / dtype / layout combination does not support, so the caller can take another path; throws
// on every other failure. `what` names the GEMM in error messages.
inline bool try_matmul(const MatmulArgs& g, const char* what) {
  TORCH_CHECK(g.m > 0 && g.n > 0 && g.k > 0 && g.batch > 0, "vitkern cuBLASLt (", what,
              "): empty problem m=", g.m, " n=", g.n, " k=", g.k, " batch=", g.batch, " must be handled by the caller");
  const cudaDataType_t type = cuda_type(g.dtype);
  const int64_t elem = c10::elementSize(g.dtype);
  const bool fp32 = g.dtype == c10::ScalarType::Float;
  const cublasComputeType_t compute =
      fp32 && torch_matmul_allows_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const bool has_c = g.c != nullptr;
  const void* c_ptr = has_c ? g.c : g.d;
  const float alpha = 1.f, beta = has_c ? g.beta : 0.f;

  MatmulDesc op(compute, CUDA_R_32F);
  const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  op.set(CUBLASLT_MATMUL_DESC_TRANSA, ta);
  op.set(CUBLASLT_MATMUL_DESC_TRANSB, tb);
  op.set(CUBLASLT_MATMUL_DESC_EPILOGUE, g.epilogue);
  if (g.bias != nullptr) op.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  if (g.aux != nullptr) {
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.aux_ld);
    if (g.batch > 1) op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, g.aux_stride);
  }

  const Layout la(type, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda, g.batch, g.stride_a);
  const Layout lb(type, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb, g.batch, g.stride_b);
  const Layout lc(type, g.m, g.n, has_c ? g.ldc : g.ldd, g.batch, has_c ? g.stride_c : g.stride_d);
  const Layout ld(type, g.m, g.n, g.ldd, g.batch, g.stride_d);

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const uint64_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  const uint32_t align_a = alignment(g.a, g.stride_a * elem), align_b = alignment(g.b, g.stride_b * elem),
                 align_c = alignment(c_ptr, (has_c ? g.stride_c : g.stride_d) * elem),
                 align_d = alignment(g.d, g.stride_d * elem);
  const uint32_t align_epi = std::min(alignment(g.bias), alignment(g.aux, g.aux_stride * elem));

  // Heuristic once per signature: everything the choice depends on except the pointers' values.
  const int64_t key_fields[] = {
      static_cast<int64_t>(g.dtype), compute, g.trans_a, g.trans_b, g.m, g.n, g.k, g.batch,
      g.lda, g.stride_a, g.ldb, g.stride_b, has_c, has_c ? g.ldc : 0, has_c ? g.stride_c : 0, g.ldd, g.stride_d,
      static_cast<int64_t>(g.epilogue), g.bias != nullptr, g.aux != nullptr, g.aux_ld, g.aux_stride,
      align_a, align_b, align_c, align_d, align_epi, static_cast<int64_t>(workspace_size),
      at::cuda::current_device()};
  const std::string key(reinterpret_cast<const char*>(key_fields), sizeof(key_fields));
  detail::CachedAlgo choice;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(detail::cache_mutex());
    auto it = detail::cache().find(key);
    if (it != detail::cache().end()) {
      choice = it->second;
      cached = true;
    }
  }
  if (!cached) {
    Preference pref;
    pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_size);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, std::min(align_d, align_epi));
    // Split-K partial sums only in fp32 (never in fp16/bf16 output precision, never "in place" in D): accuracy
    // first, and it keeps a K-reduction's rounding independent of the split.
    const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    pref.set(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions);
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = api().cublasLtMatmulAlgoGetHeuristic(handle, op.get(), la.get(), lb.get(), lc.get(),
                                                                    ld.get(), pref.get(), 1, &result, &found);
    // "No algorithm" (the caller's other path runs) is NOT_SUPPORTED, and also INVALID_VALUE: cuBLASLt reports a
    // layout it rejects for this epilogue / batch stride (e.g. a batch-stride-0 C) that way too. Anything else
    // throws. A returned algorithm counts only if its own state is SUCCESS (cublasLt.h: inspect results[i].state).
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
      TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "vitkern: cuBLASLt call `cublasLtMatmulAlgoGetHeuristic` (", what,
                  ") failed with ", status_string(st), " (status ", static_cast<int>(st), ")");
    }
    choice.found = st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (choice.found) choice.algo = result.algo;
    std::lock_guard<std::mutex> lock(detail::cache_mutex());
    detail::cache().emplace(key, choice);
  }
  if (!choice.found) return false;
  VITKERN_CUBLAS_CHECK(api().cublasLtMatmul(handle, op.get(), &alpha, g.a, la.get(), g.b, lb.get(), &beta, c_ptr,
                                            lc.get(), g.d, ld.get(), &choice.algo, workspace, workspace_size,
                                            at::cuda::getCurrentCUDAStream()));
  return true;
}

inline std::string describe(const MatmulArgs& g) {
  std::string s = "m=" + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) +
                  " batch=" + std::to_string(g.batch) + " lda=" + std::to_string(g.lda) +
                  " ldb=" + std::to_string(g.ldb) + " ldd=" + std::to_string(g.ldd) +
                  " epilogue=" + std::to_string(static_cast<int>(g.epilogue)) + " dtype=" + c10::toString(g.dtype);
  return s;
}

// try_matmul, but "no algorithm" is an error naming the GEMM and its shape.
inline void matmul(const MatmulArgs& g, const char* what) {
  TORCH_CHECK(try_matmul(g, what), "vitkern: cuBLASLt has no algorithm for ", what, " (", describe(g),
              "); this layout/epilogue is not supported by the installed cuBLASLt");
}

// Row-major Y[M, N] (row stride ldy) = X[M, K] (row stride ldx) @ W[N, K]ᵀ (row stride ldw), i.e. nn.Linear with
// W's layout, as the column-major Yᵀ = op(W)·Xᵀ (m = N, n = M, k = K). Callers add c / bias / epilogue / aux.
inline MatmulArgs linear_args(c10::ScalarType dtype, int64_t M, int64_t N, int64_t K, const void* x, int64_t ldx,
                              const void* w, int64_t ldw, void* y, int64_t ldy) {
  MatmulArgs g;
  g.dtype = dtype;
  g.trans_a = true;  // W stored K x N column-major (= row-major [N, K]); op(W) = N x K
  g.trans_b = false;  // X stored K x M column-major (= row-major [M, K])
  g.m = N;
  g.n = M;
  g.k = K;
  g.a = w;
  g.lda = ldw;
  g.b = x;
  g.ldb = ldx;
  g.d = y;
  g.ldd = ldy;
  return g;
}

}  // namespace lt
}  // namespace vitkern
