// vitkern_C::layer_norm_fwd / layer_norm_bwd (+ .out variants): LayerNorm over the last dim of [M, N] rows with an
// optional fused residual add. Kernels and their layout: csrc/ops/layer_norm.cuh. Contract (identical to the Triton
// and reference backends, vitkern/ops/layer_norm.py):
//   fwd(x [M,N], weight [N]?, bias [N]?, residual [M,N]?, eps) -> y [M,N], sum [M,N] (x + residual rounded to x's
//       dtype; [0] without residual), mean [M] fp32, rstd [M] fp32
//   bwd(dy, dsum?, xs, weight?, mean, rstd, need_dw, need_db) -> dx [M,N] (xs's dtype), dweight [N] fp32, dbias [N]
//       fp32 ([0] when not needed)
// x/dy/...: fp16, bf16 or fp32 with unit column stride (rows may be strided); weight/bias: x's dtype or fp32 (both
// the same); N <= 8192. The .out variants write into caller-allocated outputs (vitkern's Python backend allocates
// them with vitkern.memory.empty so tests can poison them).
#include <algorithm>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ops/layer_norm.cuh"

namespace vitkern {
namespace {

constexpr const char* kFwd = "vitkern_C::layer_norm_fwd";
constexpr const char* kBwd = "vitkern_C::layer_norm_bwd";

using OptTensor = std::optional<at::Tensor>;

// ------------------------------------------------------------------------------------------------ argument checks
// (shared by the CUDA and Meta kernels; device checks are separate)

void check_rows(const at::Tensor& t, const char* op, const char* name, c10::ScalarType dtype, int64_t m, int64_t n) {
  check::ndim(t, 2, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", check::dtype_name(dtype), ", got ",
              check::dtype_name(t.scalar_type()));
  check::shape(t, {m, n}, op, name);
  check::last_dim_contiguous(t, op, name);
}

void check_stats(const at::Tensor& t, const char* op, const char* name, int64_t m) {
  check::dtype_in(t, {at::kFloat}, op, name);
  check::shape(t, {m}, op, name);
  check::contiguous(t, op, name);
}

// weight / bias: [N], unit stride, x's dtype or fp32, both the same dtype.
void check_params(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const char* op) {
  const int64_t n = x.size(1);
  auto check_one = [&](const OptTensor& t, const char* name) {
    if (!t.has_value()) return;
    check::ndim(*t, 1, op, name);
    check::size(*t, 0, n, op, name);
    check::dtype_in(*t, {x.scalar_type(), at::kFloat}, op, name);
    check::last_dim_contiguous(*t, op, name);
  };
  check_one(weight, "weight");
  check_one(bias, "bias");
  if (weight.has_value() && bias.has_value()) check::same_dtype(*weight, "weight", *bias, "bias", op);
}

void check_x(const at::Tensor& x, const char* op, const char* name) {
  check::ndim(x, 2, op, name);
  check::dtype_in(x, {at::kHalf, at::kBFloat16, at::kFloat}, op, name);
  check::last_dim_contiguous(x, op, name);
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= layer_norm::kMaxWidth, op, ": ", name, ".size(1) (the row width) must be in [1, ",
              layer_norm::kMaxWidth, "], got ", x.size(1));
}

void check_fwd_args(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                    double eps) {
  check_x(x, kFwd, "x");
  check_params(x, weight, bias, kFwd);
  if (residual.has_value()) check_rows(*residual, kFwd, "residual", x.scalar_type(), x.size(0), x.size(1));
  TORCH_CHECK(eps >= 0, kFwd, ": eps must be >= 0, got ", eps);
}

void check_bwd_args(const at::Tensor& dy, const OptTensor& dsum, const at::Tensor& xs, const OptTensor& weight,
                    const at::Tensor& mean, const at::Tensor& rstd) {
  check_x(xs, kBwd, "xs");
  const int64_t m = xs.size(0), n = xs.size(1);
  check_rows(dy, kBwd, "dy", xs.scalar_type(), m, n);
  if (dsum.has_value()) check_rows(*dsum, kBwd, "dsum", xs.scalar_type(), m, n);
  check_params(xs, weight, std::nullopt, kBwd);
  check_stats(mean, kBwd, "mean", m);
  check_stats(rstd, kBwd, "rstd", m);
}

// The caller's outputs of the .out variants (sum: exactly when there is a residual).
void check_fwd_outputs(const at::Tensor& x, const OptTensor& residual, const at::Tensor& y, const OptTensor& sum,
                       const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t m = x.size(0), n = x.size(1);
  check_rows(y, kFwd, "y", x.scalar_type(), m, n);
  check_stats(mean, kFwd, "mean", m);
  check_stats(rstd, kFwd, "rstd", m);
  TORCH_CHECK(sum.has_value() == residual.has_value(), kFwd, ": sum must be given exactly when residual is");
  if (sum.has_value()) check_rows(*sum, kFwd, "sum", x.scalar_type(), m, n);
}

void check_bwd_outputs(const at::Tensor& xs, const at::Tensor& dx) {
  check_rows(dx, kBwd, "dx", xs.scalar_type(), xs.size(0), xs.size(1));
}

struct Arg {
  const at::Tensor* t;  // nullptr: an absent optional
  const char* name;
};
Arg arg(const at::Tensor& t, const char* name) { return {&t, name}; }
Arg arg(const OptTensor& t, const char* name) { return {t.has_value() ? &*t : nullptr, name}; }

// ref and every present arg are CUDA tensors on ref's device.
void check_devices(const at::Tensor& ref, const char* ref_name, const char* op, std::initializer_list<Arg> args) {
  check::cuda(ref, op, ref_name);
  for (const Arg& a : args) {
    if (a.t == nullptr) continue;
    check::cuda(*a.t, op, a.name);
    check::same_device(ref, ref_name, *a.t, a.name, op);
  }
}

// ------------------------------------------------------------------------------------------------ launch helpers

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// 16-byte packs are legal when N and every row stride are multiples of the pack and every base pointer is aligned.
bool can_vectorize(int64_t n, int64_t elem_size, std::initializer_list<std::pair<const void*, int64_t>> rows,
                   std::initializer_list<const void*> params) {
  const int64_t vec = 16 / elem_size;
  if (n % vec != 0) return false;
  for (const auto& [ptr, stride] : rows) {
    if (!aligned16(ptr) || (ptr != nullptr && stride % vec != 0)) return false;
  }
  for (const void* ptr : params) {
    if (!aligned16(ptr)) return false;
  }
  return true;
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }
int64_t stride_or_zero(const OptTensor& t) { return t.has_value() ? t->stride(0) : 0; }

template <typename X>
struct Tag {
  using type = X;
};

// T (activations) x P (params: T or float) x vectorised x width: calls body(Tag<T>, Tag<P>, Tag<RowConfig<...>>).
template <bool kBackward, typename Body>
void dispatch_layer_norm(c10::ScalarType x_dtype, bool params_fp32, bool vectorized, int64_t n, Body&& body) {
  VITKERN_FLOAT_SWITCH(x_dtype, T, [&] {
    VITKERN_BOOL_SWITCH(params_fp32, kParamsFp32, [&] {
      using P = std::conditional_t<kParamsFp32, float, T>;
      VITKERN_BOOL_SWITCH(vectorized, kVectorized, [&] {
        if constexpr (kBackward) {
          VITKERN_LN_BWD_WIDTH_SWITCH(n, kElems, kWarps, [&] {
            body(Tag<T>{}, Tag<P>{}, Tag<layer_norm::RowConfig<T, kElems, kWarps, kVectorized>>{});
          });
        } else {
          VITKERN_LN_FWD_WIDTH_SWITCH(n, kElems, kWarps, [&] {
            body(Tag<T>{}, Tag<P>{}, Tag<layer_norm::RowConfig<T, kElems, kWarps, kVectorized>>{});
          });
        }
      });
    });
  });
}

bool params_are_fp32(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias) {
  const OptTensor& p = weight.has_value() ? weight : bias;
  return p.has_value() && p->scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
}

// ------------------------------------------------------------------------------------------------ forward

void layer_norm_fwd_out_cuda(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& residual, double eps, const at::Tensor& y, const OptTensor& sum,
                             const at::Tensor& mean, const at::Tensor& rstd) {
  check_devices(x, "x", kFwd, {arg(weight, "weight"), arg(bias, "bias"), arg(residual, "residual"), arg(y, "y"),
                               arg(sum, "sum"), arg(mean, "mean"), arg(rstd, "rstd")});
  check_fwd_args(x, weight, bias, residual, eps);
  check_fwd_outputs(x, residual, y, sum, mean, rstd);
  const int64_t m = x.size(0), n = x.size(1);
  if (m == 0) return;

  c10::cuda::CUDAGuard guard(x.device());
  layer_norm::FwdParams p{};
  p.x = x.const_data_ptr();
  p.residual = ptr_or_null(residual);
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = y.data_ptr();
  p.sum = sum.has_value() ? sum->data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = m;
  p.cols = static_cast<int>(n);
  p.x_stride = x.stride(0);
  p.res_stride = stride_or_zero(residual);
  p.y_stride = y.stride(0);
  p.sum_stride = stride_or_zero(sum);
  p.eps = static_cast<float>(eps);
  const bool vec = can_vectorize(n, x.element_size(),
                                 {{p.x, p.x_stride}, {p.residual, p.res_stride}, {p.y, p.y_stride}, {p.sum, p.sum_stride}},
                                 {p.weight, p.bias});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_layer_norm<false>(x.scalar_type(), params_are_fp32(x, weight, bias), vec, n, [&](auto t_tag, auto p_tag, auto cfg_tag) {
    using T = typename decltype(t_tag)::type;
    using P = typename decltype(p_tag)::type;
    using Cfg = typename decltype(cfg_tag)::type;
    const int64_t blocks = (m + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta;
    layer_norm::layer_norm_fwd_kernel<T, P, Cfg><<<static_cast<unsigned>(blocks), Cfg::kThreads, 0, stream>>>(p);
  });
  VITKERN_CUDA_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_outputs(const at::Tensor& x, bool has_residual) {
  const int64_t m = x.size(0), n = x.size(1);
  const auto stats = x.options().dtype(at::kFloat);
  return {at::empty({m, n}, x.options()), has_residual ? at::empty({m, n}, x.options()) : at::empty({0}, x.options()),
          at::empty({m}, stats), at::empty({m}, stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x,
                                                                               const OptTensor& weight,
                                                                               const OptTensor& bias,
                                                                               const OptTensor& residual, double eps) {
  check::cuda(x, kFwd, "x");
  check_fwd_args(x, weight, bias, residual, eps);
  auto out = fwd_outputs(x, residual.has_value());
  const OptTensor sum = residual.has_value() ? OptTensor(std::get<1>(out)) : std::nullopt;
  layer_norm_fwd_out_cuda(x, weight, bias, residual, eps, std::get<0>(out), sum, std::get<2>(out), std::get<3>(out));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_meta(const at::Tensor& x,
                                                                               const OptTensor& weight,
                                                                               const OptTensor& bias,
                                                                               const OptTensor& residual, double eps) {
  check_fwd_args(x, weight, bias, residual, eps);
  return fwd_outputs(x, residual.has_value());
}

void layer_norm_fwd_out_meta(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& residual, double eps, const at::Tensor& y, const OptTensor& sum,
                             const at::Tensor& mean, const at::Tensor& rstd) {
  check_fwd_args(x, weight, bias, residual, eps);
  check_fwd_outputs(x, residual, y, sum, mean, rstd);
}

// ------------------------------------------------------------------------------------------------ backward

// CTAs of the backward: one full wave (occupancy x SMs), each owning a contiguous chunk of rows and writing one row
// of fp32 partials; fewer when there are few rows. Deterministic for a given device and shape.
template <typename T, typename P, typename Cfg>
int64_t bwd_ctas(int64_t m) {
  // once per kernel: occupancy depends only on the kernel and the arch (the binary is arch-specific)
  static const int per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, layer_norm::layer_norm_bwd_kernel<T, P, Cfg>,
                                                                 Cfg::kThreads, 0));
    return n;
  }();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t row_blocks = (m + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta;
  return std::max<int64_t>(1, std::min<int64_t>(row_blocks, sms * std::max(per_sm, 1)));
}

std::tuple<at::Tensor, at::Tensor> layer_norm_bwd_out_cuda(const at::Tensor& dy, const OptTensor& dsum,
                                                           const at::Tensor& xs, const OptTensor& weight,
                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                           bool need_dw, bool need_db, const at::Tensor& dx) {
  check_devices(xs, "xs", kBwd, {arg(dy, "dy"), arg(dsum, "dsum"), arg(weight, "weight"), arg(mean, "mean"),
                                 arg(rstd, "rstd"), arg(dx, "dx")});
  check_bwd_args(dy, dsum, xs, weight, mean, rstd);
  check_bwd_outputs(xs, dx);
  const int64_t m = xs.size(0), n = xs.size(1);
  const auto f32 = xs.options().dtype(at::kFloat);
  if (m == 0) {
    return {need_dw ? at::zeros({n}, f32) : at::empty({0}, f32), need_db ? at::zeros({n}, f32) : at::empty({0}, f32)};
  }

  c10::cuda::CUDAGuard guard(xs.device());
  layer_norm::BwdParams p{};
  p.dy = dy.const_data_ptr();
  p.dsum = ptr_or_null(dsum);
  p.xs = xs.const_data_ptr();
  p.weight = ptr_or_null(weight);
  p.mean = mean.const_data_ptr<float>();
  p.rstd = rstd.const_data_ptr<float>();
  p.dx = dx.data_ptr();
  p.rows = m;
  p.cols = static_cast<int>(n);
  p.dy_stride = dy.stride(0);
  p.dsum_stride = stride_or_zero(dsum);
  p.xs_stride = xs.stride(0);
  p.dx_stride = dx.stride(0);
  const bool vec = can_vectorize(
      n, xs.element_size(), {{p.dy, p.dy_stride}, {p.dsum, p.dsum_stride}, {p.xs, p.xs_stride}, {p.dx, p.dx_stride}},
      {p.weight});
  at::Tensor dw_part, db_part;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_layer_norm<true>(xs.scalar_type(), params_are_fp32(xs, weight, std::nullopt), vec, n, [&](auto t_tag, auto p_tag, auto cfg_tag) {
    using T = typename decltype(t_tag)::type;
    using P = typename decltype(p_tag)::type;
    using Cfg = typename decltype(cfg_tag)::type;
    const auto kernel = layer_norm::layer_norm_bwd_kernel<T, P, Cfg>;
    int64_t ctas = bwd_ctas<T, P, Cfg>(m);
    // rows per CTA: a multiple of the CTA's row groups; recount so that no CTA is empty
    p.rows_per_cta = ((m + ctas - 1) / ctas + Cfg::kRowsPerCta - 1) / Cfg::kRowsPerCta * Cfg::kRowsPerCta;
    ctas = (m + p.rows_per_cta - 1) / p.rows_per_cta;
    if (need_dw) dw_part = at::empty({ctas, n}, f32);
    if (need_db) db_part = at::empty({ctas, n}, f32);
    p.dw_part = need_dw ? dw_part.data_ptr<float>() : nullptr;
    p.db_part = need_db ? db_part.data_ptr<float>() : nullptr;
    kernel<<<static_cast<unsigned>(ctas), Cfg::kThreads, 0, stream>>>(p);
  });
  VITKERN_CUDA_LAUNCH_CHECK();
  // the partials are summed by torch on the same stream: a fixed-order reduction, so results are reproducible
  return {need_dw ? at::sum(dw_part, 0) : at::empty({0}, f32), need_db ? at::sum(db_part, 0) : at::empty({0}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy, const OptTensor& dsum,
                                                                   const at::Tensor& xs, const OptTensor& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool need_dw, bool need_db) {
  check::cuda(xs, kBwd, "xs");
  check_bwd_args(dy, dsum, xs, weight, mean, rstd);
  at::Tensor dx = at::empty(xs.sizes(), xs.options());
  auto [dw, db] = layer_norm_bwd_out_cuda(dy, dsum, xs, weight, mean, rstd, need_dw, need_db, dx);
  return {dx, dw, db};
}

// dweight / dbias are allocated by the op (not caller outputs): [N] fp32 when needed, else [0].
std::tuple<at::Tensor, at::Tensor> layer_norm_bwd_out_meta(const at::Tensor& dy, const OptTensor& dsum,
                                                           const at::Tensor& xs, const OptTensor& weight,
                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                           bool need_dw, bool need_db, const at::Tensor& dx) {
  check_bwd_args(dy, dsum, xs, weight, mean, rstd);
  check_bwd_outputs(xs, dx);
  const auto f32 = xs.options().dtype(at::kFloat);
  const int64_t n = xs.size(1);
  return {at::empty({need_dw ? n : 0}, f32), at::empty({need_db ? n : 0}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_meta(const at::Tensor& dy, const OptTensor& dsum,
                                                                   const at::Tensor& xs, const OptTensor& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool need_dw, bool need_db) {
  check_bwd_args(dy, dsum, xs, weight, mean, rstd);
  at::Tensor dx = at::empty(xs.sizes(), xs.options());
  auto [dw, db] = layer_norm_bwd_out_meta(dy, dsum, xs, weight, mean, rstd, need_dw, need_db, dx);
  return {dx, dw, db};
}

}  // namespace
}  // namespace vitkern

TORCH_LIBRARY_IMPL(vitkern_C, CUDA, m) {
  m.impl("layer_norm_fwd", &vitkern::layer_norm_fwd_cuda);
  m.impl("layer_norm_fwd.out", &vitkern::layer_norm_fwd_out_cuda);
  m.impl("layer_norm_bwd", &vitkern::layer_norm_bwd_cuda);
  m.impl("layer_norm_bwd.out", &vitkern::layer_norm_bwd_out_cuda);
}
TORCH_LIBRARY_IMPL(vitkern_C, Meta, m) {
  m.impl("layer_norm_fwd", &vitkern::layer_norm_fwd_meta);
  m.impl("layer_norm_fwd.out", &vitkern::layer_norm_fwd_out_meta);
  m.impl("layer_norm_bwd", &vitkern::layer_norm_bwd_meta);
  m.impl("layer_norm_bwd.out", &vitkern::layer_norm_bwd_out_meta);
}
