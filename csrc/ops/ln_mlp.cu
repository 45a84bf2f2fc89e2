// vitkern_C::ln_linear_fwd and vitkern_C::ln_mlp_fwd (+ .out variants): LayerNorm fused in front of cuBLASLt GEMMs
// with epilogues, forward only; and vitkern_C::linear_residual_fwd (+ .out), LayerNorm+MLP's fc2 step on its own.
// Contracts (identical to vitkern/ops/ln_linear.py, vitkern/ops/ln_mlp.py and vitkern/ops/linear_residual.py, so the
// Triton/reference backwards consume these forwards' outputs):
//   ln_linear_fwd(x [M, D], ln_weight [D]?, ln_bias [D]?, weight [N, D], bias [N]?, eps) -> y [M, N], mean [M] fp32,
//       rstd [M] fp32
//   ln_mlp_fwd(x [M, D], ln_weight?, ln_bias?, fc1_weight [H, D], fc1_bias [H]?, fc2_weight [D, H], fc2_bias [D]?,
//       layer_scale [D]?, eps, approximate "none"|"tanh", save_for_backward, gelu_impl, ls_impl)
//       -> y = x + γ·fc2(GELU(fc1(LN(x)))) [M, D], pre [M, H] (fc1 output before GELU), h [M, H] (after GELU)
//          (pre and h: [0] when not saved), mean [M], rstd [M]
//   linear_residual_fwd(x [M, K], weight [N, K], bias [N]?, residual [M, N], layer_scale [N]?, ls_impl)
//       -> y = residual + γ·(x @ weightᵀ + bias) [M, N] (a ViT block's x + ls1(attn.proj(o)): step 3 below alone)
// x: fp16/bf16/fp32 with unit column stride (rows may be strided); every parameter has x's dtype, unit column stride;
// linear_residual's residual likewise (any row stride). No LayerNorm in linear_residual, so no width limit on K.
//
// Pipeline:
//   1. LayerNorm (csrc/ops/layer_norm.cuh's forward kernel, fp32 statistics) writes LN(x) into a scratch [M, D]
//      buffer in x's dtype (what the unfused LayerNorm output holds; cuBLASLt has no LN prologue) and mean/rstd.
//   2. fc1: cuBLASLt, either with the GELU epilogue (GELU_AUX_BIAS when training: the aux output is the
//      pre-activation; GELU_BIAS for inference) or with the plain BIAS epilogue writing pre followed by gelu_kernel.
//      cuBLASLt's GELU epilogue is the tanh approximation (PyTorch's _addmm_activation computes gelu(.., "tanh") on
//      its non-cuBLASLt path for the same reason; the GPU test test_gelu_epilogue_is_tanh checks it), so it is used
//      only for approximate="tanh"; the exact erf GELU (timm's default) always takes the kernel. gelu_impl selects
//      (0 auto, 1 epilogue, 2 kernel) so the GPU session can measure both and keep the faster.
//   3. fc2 (launch_linear_residual, shared with linear_residual_fwd: y = residual + γ·(a @ Wᵀ + b) for a [M, K],
//      W [N, K]; here a = h, K = H, N = D, residual = x): cuBLASLt with the BIAS epilogue and the residual through
//      beta·C (C = residual, beta = 1, D = y). The layer scale γ cannot go through beta (it scales the GEMM product,
//      not C). ls_impl (0 auto, 1 fold, 2 kernel): fold γ into W's rows and b on the fly (scale_rows_kernel: reads
//      and writes N·K elements, independent of M), or let the GEMM write a @ Wᵀ + b into y and add residual + γ·y in
//      residual_scale_kernel (reads y and writes it again: two extra M·N passes; the residual read moves from the
//      GEMM's epilogue into the kernel). Each adds one launch. Auto folds when 2·N·K <= 2·M·N, i.e. M >= K, where
//      the fold is the cheaper of the two (fc2: M >= H; linear_residual: M >= in_features, e.g. ViT-B's proj,
//      K = 768, from 4 images of 197 tokens on). Folding rounds γ·W to x's dtype, i.e. one rounding of the branch's
//      weights: an error of the size of one output rounding of the branch, which the residual then dwarfs (tests
//      hold it to the same bound as the Triton forward). Not in fp16 (auto never folds there): its exponent range
//      flushes γ·W to zero for the small γ layer scales start from (1e-5, 1e-6: DeiT III, CaiT), where the
//      post kernel's fp32 γ·y keeps them.
// Scratch (LN output; the GELU output when not saved; the folded W and b) comes from the CUDA caching allocator.
//
// Schemas: csrc/vitkern_C.cpp.
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cublaslt.h"
#include "common/dispatch.h"
#include "ops/layer_norm.cuh"
#include "ops/ln_mlp.cuh"
#include "vitkern_C.h"

namespace vitkern {
namespace {

constexpr const char* kLinear = "vitkern_C::ln_linear_fwd";
constexpr const char* kMlp = "vitkern_C::ln_mlp_fwd";
constexpr const char* kResidual = "vitkern_C::linear_residual_fwd";

using OptTensor = std::optional<at::Tensor>;

// ------------------------------------------------------------------------------------------------ argument checks
// (shared by the CUDA and Meta kernels; device checks are separate)

// The rows of a 2-D t do not overlap (any row stride >= its width; a single row may carry any stride), so it is a
// valid cuBLASLt matrix with leading dimension row_ld(t).
void check_disjoint_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), op, ": ", name, " rows overlap (stride(0) ", t.stride(0),
              " < ", t.size(1), "); call .contiguous() first");
}

void check_x(const at::Tensor& x, const char* op) {
  check::ndim(x, 2, op, "x");
  check::dtype_in(x, {at::kHalf, at::kBFloat16, at::kFloat}, op, "x");
  check::last_dim_contiguous(x, op, "x");
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= layer_norm::kMaxWidth, op,
              ": x.size(1) (the LayerNorm width) must be in [1, ", layer_norm::kMaxWidth, "], got ", x.size(1));
  check_disjoint_rows(x, op, "x");
}

// Row stride of a [rows, cols] matrix as cuBLASLt's leading dimension (a single row may carry any stride).
int64_t row_ld(const at::Tensor& t) { return t.size(0) <= 1 ? std::max<int64_t>(t.stride(0), t.size(1)) : t.stride(0); }

void check_dtype(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
              check::dtype_name(x.scalar_type()), ", got ", check::dtype_name(t.scalar_type()));
}

// An optional [n] parameter vector in x's dtype, contiguous.
void check_vector(const OptTensor& t, const at::Tensor& x, int64_t n, const char* op, const char* name) {
  if (!t.has_value()) return;
  check::ndim(*t, 1, op, name);
  check::size(*t, 0, n, op, name);
  check_dtype(*t, x, op, name);
  check::contiguous(*t, op, name);
}

// A [rows, cols] matrix in x's dtype with unit column stride and disjoint rows of any stride (a weight in
// nn.Linear's layout; linear_residual's residual).
void check_matrix(const at::Tensor& w, const at::Tensor& x, int64_t rows, int64_t cols, const char* op,
                  const char* name) {
  check::ndim(w, 2, op, name);
  check_dtype(w, x, op, name);
  check::shape(w, {rows, cols}, op, name);
  check::last_dim_contiguous(w, op, name);
  check_disjoint_rows(w, op, name);
}

// A contiguous [rows, cols] output in x's dtype.
void check_output(const at::Tensor& t, const at::Tensor& x, int64_t rows, int64_t cols, const char* op,
                  const char* name) {
  check::ndim(t, 2, op, name);
  check_dtype(t, x, op, name);
  check::shape(t, {rows, cols}, op, name);
  check::contiguous(t, op, name);
}

void check_stats(const at::Tensor& t, int64_t m, const char* op, const char* name) {
  check::dtype_in(t, {at::kFloat}, op, name);
  check::shape(t, {m}, op, name);
  check::contiguous(t, op, name);
}

void check_ln(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, double eps, const char* op) {
  check_x(x, op);
  check_vector(ln_weight, x, x.size(1), op, "ln_weight");
  check_vector(ln_bias, x, x.size(1), op, "ln_bias");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

// ls_impl (ln_mlp::ScaleImpl) is 0, 1 or 2; `target`: what the layer scale is folded into.
void check_ls_impl(int64_t ls_impl, const char* op, const char* target) {
  TORCH_CHECK(ls_impl >= ln_mlp::kScaleAuto && ls_impl <= ln_mlp::kScaleKernel, op,
              ": ls_impl must be 0 (auto), 1 (fold into ", target, ") or 2 (separate kernel), got ", ls_impl);
}

bool tanh_gelu(std::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", kMlp,
              ": approximate must be \"none\" (exact erf GELU) or \"tanh\", got \"", std::string(approximate), "\"");
  return approximate == "tanh";
}

void check_linear_args(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                       const at::Tensor& weight, const OptTensor& bias, double eps) {
  check_ln(x, ln_weight, ln_bias, eps, kLinear);
  check::ndim(weight, 2, kLinear, "weight");
  TORCH_CHECK(weight.size(0) >= 1, kLinear, ": weight must have at least one row (out_features), got shape ",
              weight.sizes());
  check_matrix(weight, x, weight.size(0), x.size(1), kLinear, "weight");
  check_vector(bias, x, weight.size(0), kLinear, "bias");
}

void check_mlp_args(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                    const at::Tensor& fc1_weight, const OptTensor& fc1_bias, const at::Tensor& fc2_weight,
                    const OptTensor& fc2_bias, const OptTensor& layer_scale, double eps, std::string_view approximate,
                    int64_t gelu_impl, int64_t ls_impl) {
  check_ln(x, ln_weight, ln_bias, eps, kMlp);
  const int64_t d = x.size(1);
  check::ndim(fc1_weight, 2, kMlp, "fc1_weight");
  const int64_t hidden = fc1_weight.size(0);
  TORCH_CHECK(hidden >= 1, kMlp, ": fc1_weight must have at least one row (the hidden size), got shape ",
              fc1_weight.sizes());
  check_matrix(fc1_weight, x, hidden, d, kMlp, "fc1_weight");
  check_vector(fc1_bias, x, hidden, kMlp, "fc1_bias");
  check_matrix(fc2_weight, x, d, hidden, kMlp, "fc2_weight");
  check_vector(fc2_bias, x, d, kMlp, "fc2_bias");
  check_vector(layer_scale, x, d, kMlp, "layer_scale");
  const bool tanh = tanh_gelu(approximate);
  TORCH_CHECK(gelu_impl >= ln_mlp::kGeluAuto && gelu_impl <= ln_mlp::kGeluKernel, kMlp,
              ": gelu_impl must be 0 (auto), 1 (cuBLASLt epilogue) or 2 (separate kernel), got ", gelu_impl);
  TORCH_CHECK(gelu_impl != ln_mlp::kGeluEpilogue || tanh, kMlp,
              ": gelu_impl=1 (cuBLASLt GELU epilogue) computes the tanh approximation; approximate=\"none\" "
              "(exact erf) needs gelu_impl 0 or 2");
  check_ls_impl(ls_impl, kMlp, "fc2");
}

void check_linear_residual_args(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                const at::Tensor& residual, const OptTensor& layer_scale, int64_t ls_impl) {
  check::ndim(x, 2, kResidual, "x");
  check::dtype_in(x, {at::kHalf, at::kBFloat16, at::kFloat}, kResidual, "x");
  check::last_dim_contiguous(x, kResidual, "x");
  TORCH_CHECK(x.size(1) >= 1, kResidual, ": x.size(1) (in_features) must be >= 1, got shape ", x.sizes());
  check_disjoint_rows(x, kResidual, "x");
  const int64_t m = x.size(0), k = x.size(1);
  check::ndim(weight, 2, kResidual, "weight");
  TORCH_CHECK(weight.size(0) >= 1, kResidual, ": weight must have at least one row (out_features), got shape ",
              weight.sizes());
  const int64_t n = weight.size(0);
  check_matrix(weight, x, n, k, kResidual, "weight");
  check_vector(bias, x, n, kResidual, "bias");
  check_matrix(residual, x, m, n, kResidual, "residual");
  check_vector(layer_scale, x, n, kResidual, "layer_scale");
  check_ls_impl(ls_impl, kResidual, "the weight");
}

// The caller's outputs of the .out variants. (Memory overlap with the inputs is checked at launch.)
void check_linear_outputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y, const at::Tensor& mean,
                          const at::Tensor& rstd) {
  const int64_t m = x.size(0);
  check_output(y, x, m, weight.size(0), kLinear, "y");
  check_stats(mean, m, kLinear, "mean");
  check_stats(rstd, m, kLinear, "rstd");
}

void check_mlp_outputs(const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& y, const OptTensor& pre,
                       const OptTensor& h, const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t m = x.size(0);
  check_output(y, x, m, x.size(1), kMlp, "y");
  TORCH_CHECK(pre.has_value() == h.has_value(), kMlp, ": pre and h are saved together (both given or neither)");
  if (pre.has_value()) {
    check_output(*pre, x, m, fc1_weight.size(0), kMlp, "pre");
    check_output(*h, x, m, fc1_weight.size(0), kMlp, "h");
  }
  check_stats(mean, m, kMlp, "mean");
  check_stats(rstd, m, kMlp, "rstd");
}

void check_linear_residual_output(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y) {
  check_output(y, x, x.size(0), weight.size(0), kResidual, "y");
}

struct Arg {
  const at::Tensor* t;  // nullptr: an absent optional
  const char* name;
};
Arg arg(const at::Tensor& t, const char* name) { return {&t, name}; }
Arg arg(const OptTensor& t, const char* name) { return {t.has_value() ? &*t : nullptr, name}; }

void check_devices(const at::Tensor& x, const char* op, std::initializer_list<Arg> args) {
  check::cuda(x, op, "x");
  for (const Arg& a : args) {
    if (a.t == nullptr) continue;
    check::cuda(*a.t, op, a.name);
    check::same_device(x, "x", *a.t, a.name, op);
  }
}

// at::assert_no_overlap(out, in), with a message naming both arguments.
void check_no_overlap(const at::Tensor& out, const char* out_name, const at::Tensor& in, const char* in_name,
                      const char* op) {
  const at::MemOverlapStatus lap = at::get_overlap_status(out, in);
  TORCH_CHECK(lap != at::MemOverlapStatus::Partial && lap != at::MemOverlapStatus::Full, op, ": ", out_name,
              " (written) and ", in_name, " (read) share memory; pass a separate output or clone() the input");
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

// ------------------------------------------------------------------------------------------------ launches

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// A grid for the grid-stride kernels: enough CTAs to fill the GPU a few times over, no more.
unsigned grid_for(int64_t items) {
  const int64_t ctas = (items + ln_mlp::kThreads - 1) / ln_mlp::kThreads;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ctas, cap)));
}

// LN(x) -> xn (contiguous [M, D]), mean, rstd: the LayerNorm op's forward kernel with parameters in x's dtype.
template <typename T>
void launch_layer_norm(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps, T* xn,
                       float* mean, float* rstd, cudaStream_t stream) {
  const int64_t m = x.size(0), n = x.size(1);
  layer_norm::FwdParams p{};
  p.x = x.const_data_ptr();
  p.residual = nullptr;
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = xn;
  p.sum = nullptr;
  p.mean = mean;
  p.rstd = rstd;
  p.rows = m;
  p.cols = static_cast<int>(n);
  p.x_stride = x.stride(0);
  p.y_stride = n;
  p.eps = static_cast<float>(eps);
  constexpr int kPack = 16 / sizeof(T);
  const bool vec = n % kPack == 0 && x.stride(0) % kPack == 0 && aligned16(p.x) && aligned16(xn) &&
                   (p.weight == nullptr || aligned16(p.weight)) && (p.bias == nullptr || aligned16(p.bias));
  VITKERN_BOOL_SWITCH(vec, kVectorized, [&] {
    VITKERN_LN_FWD_WIDTH_SWITCH(n, kElems, kWarps, [&] {
      using Cfg = layer_norm::RowConfig<T, kElems, kWarps, kVectorized>;
      const int64_t blocks = (m + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta;
      layer_norm::layer_norm_fwd_kernel<T, T, Cfg><<<static_cast<unsigned>(blocks), Cfg::kThreads, 0, stream>>>(p);
    });
  });
  VITKERN_CUDA_LAUNCH_CHECK();
}

// h = GELU(pre), elementwise over `count` contiguous elements (h may be pre).
template <typename T>
void launch_gelu(const T* pre, T* h, int64_t count, bool tanh, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const bool vec = count % kPack == 0 && aligned16(pre) && aligned16(h);
  VITKERN_BOOL_SWITCH(tanh, kTanh, [&] {
    if (vec) {
      const int64_t packs = count / kPack;
      ln_mlp::gelu_kernel<T, kPack, kTanh><<<grid_for(packs), ln_mlp::kThreads, 0, stream>>>(pre, h, packs);
    } else {
      ln_mlp::gelu_kernel<T, 1, kTanh><<<grid_for(count), ln_mlp::kThreads, 0, stream>>>(pre, h, count);
    }
  });
  VITKERN_CUDA_LAUNCH_CHECK();
}

// out = γ[:, None] · w ([rows, cols], w row stride ldw), bias_out = γ · bias (when bias).
template <typename T>
void launch_scale_rows(const T* w, int64_t ldw, const T* scale, T* out, int64_t rows, int64_t cols, const T* bias,
                       T* bias_out, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const bool vec = cols % kPack == 0 && ldw % kPack == 0 && aligned16(w) && aligned16(out);
  if (vec) {
    ln_mlp::scale_rows_kernel<T, kPack><<<grid_for(rows * cols / kPack), ln_mlp::kThreads, 0, stream>>>(
        w, ldw, scale, out, rows, cols, bias, bias_out);
  } else {
    ln_mlp::scale_rows_kernel<T, 1><<<grid_for(rows * cols), ln_mlp::kThreads, 0, stream>>>(
        w, ldw, scale, out, rows, cols, bias, bias_out);
  }
  VITKERN_CUDA_LAUNCH_CHECK();
}

// y = x + γ · y ([rows, cols]; x row stride ldx, y contiguous).
template <typename T>
void launch_residual_scale(const T* x, int64_t ldx, const T* scale, T* y, int64_t rows, int64_t cols,
                           cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const bool vec = cols % kPack == 0 && ldx % kPack == 0 && aligned16(x) && aligned16(scale) && aligned16(y);
  if (vec) {
    ln_mlp::residual_scale_kernel<T, kPack><<<grid_for(rows * cols / kPack), ln_mlp::kThreads, 0, stream>>>(
        x, ldx, scale, y, rows, cols);
  } else {
    ln_mlp::residual_scale_kernel<T, 1><<<grid_for(rows * cols), ln_mlp::kThreads, 0, stream>>>(
        x, ldx, scale, y, rows, cols);
  }
  VITKERN_CUDA_LAUNCH_CHECK();
}

// Whether the layer scale of y = residual + γ·(a @ Wᵀ + b), a [M, K], W [N, K], is folded into W's rows (else
// residual_scale_kernel applies it after the GEMM). Auto: the fold reads and writes N·K elements, the kernel two
// extra M·N passes, so fold when M >= K (the top of this file).
bool fold_layer_scale(int64_t ls_impl, int64_t m, int64_t k, at::ScalarType dtype) {
  return ls_impl == ln_mlp::kScaleFold || (ls_impl == ln_mlp::kScaleAuto && m >= k && dtype != at::kHalf);
}

// y = residual + γ·(a @ weightᵀ + bias): LayerNorm+MLP's fc2 step and all of linear_residual_fwd. a [M, K] and
// residual [M, N] with unit column stride and any row stride (row_ld), weight [N, K] likewise, bias/γ [N]
// contiguous, y contiguous [M, N] and disjoint from the inputs; all T; M, N, K >= 1 (checked by the callers). The
// bias rides in cuBLASLt's BIAS epilogue and the residual in beta·C; γ is folded into W's rows and b
// (scale_rows_kernel) or applied with the residual afterwards (residual_scale_kernel), per ls_impl
// (fold_layer_scale). `what` names the GEMM in cuBLASLt errors.
template <typename T>
void launch_linear_residual(const at::Tensor& a, const at::Tensor& weight, const OptTensor& bias,
                            const at::Tensor& residual, const OptTensor& layer_scale, int64_t ls_impl,
                            const at::Tensor& y, cudaStream_t stream, const char* what) {
  const int64_t m = a.size(0), k = a.size(1), n = weight.size(0);
  const bool fold = layer_scale.has_value() && fold_layer_scale(ls_impl, m, k, weight.scalar_type());
  at::Tensor w = weight;
  OptTensor b = bias;
  if (fold) {
    const auto opts = weight.options().memory_format(at::MemoryFormat::Contiguous);
    w = at::empty({n, k}, opts);
    if (bias.has_value()) b = at::empty({n}, opts);
    launch_scale_rows<T>(static_cast<const T*>(weight.const_data_ptr()), row_ld(weight),
                         static_cast<const T*>(layer_scale->const_data_ptr()), static_cast<T*>(w.data_ptr()), n, k,
                         static_cast<const T*>(ptr_or_null(bias)),
                         b.has_value() ? static_cast<T*>(b->data_ptr()) : nullptr, stream);
  }
  lt::MatmulArgs g = lt::linear_args(a.scalar_type(), m, n, k, a.const_data_ptr(), row_ld(a), w.const_data_ptr(),
                                     row_ld(w), y.data_ptr(), n);
  if (b.has_value()) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;
    g.bias = b->const_data_ptr();
  }
  const bool post_scale = layer_scale.has_value() && !fold;
  if (!post_scale) {  // residual through beta·C: y = (a @ Wᵀ + b) + 1·residual
    g.c = residual.const_data_ptr();
    g.ldc = row_ld(residual);
    g.beta = 1.f;
  }
  lt::matmul(g, what);
  if (post_scale) {
    launch_residual_scale<T>(static_cast<const T*>(residual.const_data_ptr()), row_ld(residual),
                             static_cast<const T*>(layer_scale->const_data_ptr()), static_cast<T*>(y.data_ptr()), m, n,
                             stream);
  }
}

// ------------------------------------------------------------------------------------------------ ln_linear

void ln_linear_fwd_out_cuda(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                            const at::Tensor& weight, const OptTensor& bias, double eps, const at::Tensor& y,
                            const at::Tensor& mean, const at::Tensor& rstd) {
  check_devices(x, kLinear, {arg(ln_weight, "ln_weight"), arg(ln_bias, "ln_bias"), arg(weight, "weight"),
                             arg(bias, "bias"), arg(y, "y"), arg(mean, "mean"), arg(rstd, "rstd")});
  check_linear_args(x, ln_weight, ln_bias, weight, bias, eps);
  check_linear_outputs(x, weight, y, mean, rstd);
  const int64_t m = x.size(0), d = x.size(1), n = weight.size(0);
  if (m == 0) return;
  check_no_overlap(y, "y", x, "x", kLinear);

  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor xn = at::empty({m, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  VITKERN_FLOAT_SWITCH(x.scalar_type(), T, [&] {
    launch_layer_norm<T>(x, ln_weight, ln_bias, eps, static_cast<T*>(xn.data_ptr()), mean.data_ptr<float>(),
                         rstd.data_ptr<float>(), stream);
  });
  lt::MatmulArgs g = lt::linear_args(x.scalar_type(), m, n, d, xn.const_data_ptr(), d, weight.const_data_ptr(),
                                     row_ld(weight), y.data_ptr(), n);
  if (bias.has_value()) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;
    g.bias = bias->const_data_ptr();
  }
  lt::matmul(g, "ln_linear GEMM");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_outputs(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t m = x.size(0);
  const auto stats = x.options().dtype(at::kFloat);
  return {at::empty({m, weight.size(0)}, x.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({m}, stats), at::empty({m}, stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_linear_fwd_cuda(const at::Tensor& x, const OptTensor& ln_weight,
                                                                  const OptTensor& ln_bias, const at::Tensor& weight,
                                                                  const OptTensor& bias, double eps) {
  check::cuda(x, kLinear, "x");
  check_linear_args(x, ln_weight, ln_bias, weight, bias, eps);
  auto out = linear_outputs(x, weight);
  ln_linear_fwd_out_cuda(x, ln_weight, ln_bias, weight, bias, eps, std::get<0>(out), std::get<1>(out),
                         std::get<2>(out));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ln_linear_fwd_meta(const at::Tensor& x, const OptTensor& ln_weight,
                                                                  const OptTensor& ln_bias, const at::Tensor& weight,
                                                                  const OptTensor& bias, double eps) {
  check_linear_args(x, ln_weight, ln_bias, weight, bias, eps);
  return linear_outputs(x, weight);
}

void ln_linear_fwd_out_meta(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                            const at::Tensor& weight, const OptTensor& bias, double eps, const at::Tensor& y,
                            const at::Tensor& mean, const at::Tensor& rstd) {
  check_linear_args(x, ln_weight, ln_bias, weight, bias, eps);
  check_linear_outputs(x, weight, y, mean, rstd);
}

// ------------------------------------------------------------------------------------------------ ln_mlp

void ln_mlp_fwd_out_cuda(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                         const at::Tensor& fc1_weight, const OptTensor& fc1_bias, const at::Tensor& fc2_weight,
                         const OptTensor& fc2_bias, const OptTensor& layer_scale, double eps,
                         c10::string_view approximate, int64_t gelu_impl, int64_t ls_impl, const at::Tensor& y,
                         const OptTensor& pre, const OptTensor& h, const at::Tensor& mean, const at::Tensor& rstd) {
  check_devices(x, kMlp, {arg(ln_weight, "ln_weight"), arg(ln_bias, "ln_bias"), arg(fc1_weight, "fc1_weight"),
                          arg(fc1_bias, "fc1_bias"), arg(fc2_weight, "fc2_weight"), arg(fc2_bias, "fc2_bias"),
                          arg(layer_scale, "layer_scale"), arg(y, "y"), arg(pre, "pre"), arg(h, "h"),
                          arg(mean, "mean"), arg(rstd, "rstd")});
  check_mlp_args(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate,
                 gelu_impl, ls_impl);
  check_mlp_outputs(x, fc1_weight, y, pre, h, mean, rstd);
  const int64_t m = x.size(0), d = x.size(1), hidden = fc1_weight.size(0);
  if (m == 0) return;
  // the kernels read x while writing y, and write pre / h between them (__restrict__ pointers): no aliasing
  check_no_overlap(y, "y", x, "x", kMlp);
  for (const auto& [buf, name] : {std::pair<const OptTensor*, const char*>{&pre, "pre"}, {&h, "h"}}) {
    if (!buf->has_value()) continue;
    check_no_overlap(**buf, name, x, "x", kMlp);
    check_no_overlap(y, "y", **buf, name, kMlp);
  }
  if (pre.has_value() && h.has_value()) check_no_overlap(*h, "h", *pre, "pre", kMlp);

  const bool tanh = approximate == "tanh";
  const bool save = pre.has_value();
  const c10::ScalarType dtype = x.scalar_type();
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);

  VITKERN_FLOAT_SWITCH(dtype, T, [&] {
    // 1. LN(x) -> xn
    const at::Tensor xn = at::empty({m, d}, opts);
    launch_layer_norm<T>(x, ln_weight, ln_bias, eps, static_cast<T*>(xn.data_ptr()), mean.data_ptr<float>(),
                         rstd.data_ptr<float>(), stream);

    // 2. fc1 (+ GELU): act = GELU(xn @ W1ᵀ + b1) [M, H]; pre kept when saving
    const at::Tensor act = save ? *h : at::empty({m, hidden}, opts);
    lt::MatmulArgs g1 = lt::linear_args(dtype, m, hidden, d, xn.const_data_ptr(), d, fc1_weight.const_data_ptr(),
                                        row_ld(fc1_weight), act.data_ptr(), hidden);
    g1.bias = ptr_or_null(fc1_bias);
    // the aux (pre-activation) leading dimension must be a multiple of 8 (cuBLASLt's GELU_AUX requirement)
    const bool epilogue_ok = tanh && (!save || hidden % 8 == 0);
    bool done = false;
    if (gelu_impl == ln_mlp::kGeluEpilogue) {
      TORCH_CHECK(epilogue_ok, kMlp, ": gelu_impl=1 (cuBLASLt GELU epilogue with the pre-activation as aux output) "
                  "needs the hidden size to be a multiple of 8 when saving for backward, got ", hidden);
    }
    if (gelu_impl == ln_mlp::kGeluEpilogue || (gelu_impl == ln_mlp::kGeluAuto && epilogue_ok && dtype != at::kFloat)) {
      // auto skips fp32: the precision of cuBLASLt's GELU epilogue is not documented, fp32 callers get fp32 GELU
      if (save) {
        g1.epilogue = fc1_bias.has_value() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
        g1.aux = pre->data_ptr();
        g1.aux_ld = hidden;
      } else {
        g1.epilogue = fc1_bias.has_value() ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
      }
      if (gelu_impl == ln_mlp::kGeluEpilogue) {
        lt::matmul(g1, "ln_mlp fc1 GEMM with the GELU epilogue");
        done = true;
      } else {
        done = lt::try_matmul(g1, "ln_mlp fc1 GEMM with the GELU epilogue");  // no algorithm: the kernel path
      }
    }
    if (!done) {
      // plain bias epilogue into pre (or straight into act when pre is not kept), then GELU in place / into h
      T* pre_ptr = save ? static_cast<T*>(pre->data_ptr()) : static_cast<T*>(act.data_ptr());
      g1.epilogue = fc1_bias.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      g1.d = pre_ptr;
      g1.aux = nullptr;
      g1.aux_ld = 0;
      lt::matmul(g1, "ln_mlp fc1 GEMM");
      launch_gelu<T>(pre_ptr, static_cast<T*>(act.data_ptr()), m * hidden, tanh, stream);
    }

    // 3. fc2 + bias + layer scale + residual -> y = x + γ·(act @ W2ᵀ + b2)
    launch_linear_residual<T>(act, fc2_weight, fc2_bias, x, layer_scale, ls_impl, y, stream, "ln_mlp fc2 GEMM");
  });
}

using MlpOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

MlpOutputs mlp_outputs(const at::Tensor& x, int64_t hidden, bool save) {
  const int64_t m = x.size(0);
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const auto stats = x.options().dtype(at::kFloat);
  auto act = [&] { return save ? at::empty({m, hidden}, opts) : at::empty({0}, opts); };
  return {at::empty({m, x.size(1)}, opts), act(), act(), at::empty({m}, stats), at::empty({m}, stats)};
}

MlpOutputs ln_mlp_fwd_cuda(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                           const at::Tensor& fc1_weight, const OptTensor& fc1_bias, const at::Tensor& fc2_weight,
                           const OptTensor& fc2_bias, const OptTensor& layer_scale, double eps,
                           c10::string_view approximate, bool save_for_backward, int64_t gelu_impl, int64_t ls_impl) {
  check::cuda(x, kMlp, "x");
  check_mlp_args(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate,
                 gelu_impl, ls_impl);
  auto out = mlp_outputs(x, fc1_weight.size(0), save_for_backward);
  const OptTensor pre = save_for_backward ? OptTensor(std::get<1>(out)) : std::nullopt;
  const OptTensor h = save_for_backward ? OptTensor(std::get<2>(out)) : std::nullopt;
  ln_mlp_fwd_out_cuda(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps,
                      approximate, gelu_impl, ls_impl, std::get<0>(out), pre, h, std::get<3>(out), std::get<4>(out));
  return out;
}

MlpOutputs ln_mlp_fwd_meta(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                           const at::Tensor& fc1_weight, const OptTensor& fc1_bias, const at::Tensor& fc2_weight,
                           const OptTensor& fc2_bias, const OptTensor& layer_scale, double eps,
                           c10::string_view approximate, bool save_for_backward, int64_t gelu_impl, int64_t ls_impl) {
  check_mlp_args(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate,
                 gelu_impl, ls_impl);
  return mlp_outputs(x, fc1_weight.size(0), save_for_backward);
}

void ln_mlp_fwd_out_meta(const at::Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                         const at::Tensor& fc1_weight, const OptTensor& fc1_bias, const at::Tensor& fc2_weight,
                         const OptTensor& fc2_bias, const OptTensor& layer_scale, double eps,
                         c10::string_view approximate, int64_t gelu_impl, int64_t ls_impl, const at::Tensor& y,
                         const OptTensor& pre, const OptTensor& h, const at::Tensor& mean, const at::Tensor& rstd) {
  check_mlp_args(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, eps, approximate,
                 gelu_impl, ls_impl);
  check_mlp_outputs(x, fc1_weight, y, pre, h, mean, rstd);
}

// ------------------------------------------------------------------------------------------------ linear_residual

void linear_residual_fwd_out_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                  const at::Tensor& residual, const OptTensor& layer_scale, int64_t ls_impl,
                                  const at::Tensor& y) {
  check_devices(x, kResidual, {arg(weight, "weight"), arg(bias, "bias"), arg(residual, "residual"),
                               arg(layer_scale, "layer_scale"), arg(y, "y")});
  check_linear_residual_args(x, weight, bias, residual, layer_scale, ls_impl);
  check_linear_residual_output(x, weight, y);
  if (x.size(0) == 0) return;
  check_no_overlap(y, "y", x, "x", kResidual);
  check_no_overlap(y, "y", residual, "residual", kResidual);

  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  VITKERN_FLOAT_SWITCH(x.scalar_type(), T, [&] {
    launch_linear_residual<T>(x, weight, bias, residual, layer_scale, ls_impl, y, stream, "linear_residual GEMM");
  });
}

at::Tensor linear_residual_output(const at::Tensor& x, const at::Tensor& weight) {
  return at::empty({x.size(0), weight.size(0)}, x.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor linear_residual_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                    const at::Tensor& residual, const OptTensor& layer_scale, int64_t ls_impl) {
  check::cuda(x, kResidual, "x");
  check_linear_residual_args(x, weight, bias, residual, layer_scale, ls_impl);
  at::Tensor y = linear_residual_output(x, weight);
  linear_residual_fwd_out_cuda(x, weight, bias, residual, layer_scale, ls_impl, y);
  return y;
}

at::Tensor linear_residual_fwd_meta(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                    const at::Tensor& residual, const OptTensor& layer_scale, int64_t ls_impl) {
  check_linear_residual_args(x, weight, bias, residual, layer_scale, ls_impl);
  return linear_residual_output(x, weight);
}

void linear_residual_fwd_out_meta(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                  const at::Tensor& residual, const OptTensor& layer_scale, int64_t ls_impl,
                                  const at::Tensor& y) {
  check_linear_residual_args(x, weight, bias, residual, layer_scale, ls_impl);
  check_linear_residual_output(x, weight, y);
}

}  // namespace

// Test hook: the version of the cuBLASLt these ops call (resolved with dlopen/dlsym, csrc/common/cublaslt.h). Needs
// no GPU, so CPU tests prove the symbol lookup works wherever the extension loads.
int64_t cublaslt_version() { return static_cast<int64_t>(lt::api().cublasLtGetVersion()); }

}  // namespace vitkern

TORCH_LIBRARY_IMPL(vitkern_C, CUDA, m) {
  m.impl("ln_linear_fwd", &vitkern::ln_linear_fwd_cuda);
  m.impl("ln_linear_fwd.out", &vitkern::ln_linear_fwd_out_cuda);
  m.impl("ln_mlp_fwd", &vitkern::ln_mlp_fwd_cuda);
  m.impl("ln_mlp_fwd.out", &vitkern::ln_mlp_fwd_out_cuda);
  m.impl("linear_residual_fwd", &vitkern::linear_residual_fwd_cuda);
  m.impl("linear_residual_fwd.out", &vitkern::linear_residual_fwd_out_cuda);
}
TORCH_LIBRARY_IMPL(vitkern_C, Meta, m) {
  m.impl("ln_linear_fwd", &vitkern::ln_linear_fwd_meta);
  m.impl("ln_linear_fwd.out", &vitkern::ln_linear_fwd_out_meta);
  m.impl("ln_mlp_fwd", &vitkern::ln_mlp_fwd_meta);
  m.impl("ln_mlp_fwd.out", &vitkern::ln_mlp_fwd_out_meta);
  m.impl("linear_residual_fwd", &vitkern::linear_residual_fwd_meta);
  m.impl("linear_residual_fwd.out", &vitkern::linear_residual_fwd_out_meta);
}
