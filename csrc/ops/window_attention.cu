// vitkern_C::window_attention_fwd (+ .out): Swin (shifted-)window attention forward on the un-partitioned layout,
// fp16/bf16, head dims 32/64/80/96/128, windows of up to 256 tokens. Kernel: csrc/ops/window_attention.cuh.
// Contract (the forward of vitkern/ops/window_attention.py, identical to the Triton and reference backends):
//   window_attention_fwd(qkv [B,H,W,3·heads·D] contiguous, qkv_bias [3·heads·D]? (qkv's dtype), table
//       [(2wh-1)(2ww-1), heads] fp32 contiguous, heads, window [wh, ww], shift [sh, sw], scale, mask_value, pad_first)
//       -> out [B,H,W,heads·D] (qkv's dtype), lse [B·nW, heads, wh·ww] fp32 (natural-log logsumexp of every window
//          token's scores, padded tokens included: the Triton backward reads them)
//   .out(..., *, out, lse) writes caller-allocated contiguous outputs.
// No backward here: vitkern/ops/window_attention_cuda.py rejects backward problems, so autograd runs the Triton
// backward (which recomputes P from this lse) and vitkern.explain says so.
#include <cmath>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ops/attention_launch.cuh"
#include "ops/window_attention.cuh"

namespace vitkern {
namespace {

constexpr const char* kOp = "vitkern_C::window_attention_fwd";
using OptTensor = std::optional<at::Tensor>;

struct Geometry {
  int64_t B, H, W, C, D, Hp, Wp, wh, ww, sh, sw, nwx, nw, n, table_size;
};

// Shapes, dtypes, layouts and attributes (shared by the CUDA and Meta kernels).
Geometry check_inputs(const at::Tensor& qkv, const OptTensor& qkv_bias, const at::Tensor& table, int64_t heads,
                      at::IntArrayRef window, at::IntArrayRef shift, double scale, double mask_value) {
  check::ndim(qkv, 4, kOp, "qkv");
  check::dtype_in(qkv, {at::kHalf, at::kBFloat16}, kOp, "qkv");
  check::contiguous(qkv, kOp, "qkv");
  TORCH_CHECK(heads >= 1, kOp, ": heads must be >= 1, got ", heads);
  TORCH_CHECK(window.size() == 2 && shift.size() == 2, kOp, ": window and shift must have 2 entries, got ", window,
              " and ", shift);
  Geometry g{};
  g.B = qkv.size(0), g.H = qkv.size(1), g.W = qkv.size(2);
  TORCH_CHECK(qkv.size(3) % (3 * heads) == 0, kOp, ": qkv.size(3) must be 3 * heads * head_dim, got ", qkv.size(3),
              " with heads=", heads);
  g.C = qkv.size(3) / 3, g.D = g.C / heads;
  TORCH_CHECK(g.D == 32 || g.D == 64 || g.D == 80 || g.D == 96 || g.D == 128, kOp,
              ": head_dim (qkv.size(3) / (3 * heads)) must be one of 32, 64, 80, 96, 128, got ", g.D);
  g.wh = window[0], g.ww = window[1], g.sh = shift[0], g.sw = shift[1];
  TORCH_CHECK(g.wh >= 1 && g.ww >= 1, kOp, ": window must be >= 1 per axis, got ", window);
  g.n = g.wh * g.ww;
  TORCH_CHECK(g.n <= attn::kWinMaxTokens, kOp, ": window ", window, " has ", g.n, " tokens; at most ",
              attn::kWinMaxTokens, " fit on chip");
  TORCH_CHECK(g.sh >= 0 && g.sh < g.wh && g.sw >= 0 && g.sw < g.ww, kOp, ": shift ", shift,
              " must satisfy 0 <= shift < window ", window, " per axis");
  g.Hp = (g.H + g.wh - 1) / g.wh * g.wh, g.Wp = (g.W + g.ww - 1) / g.ww * g.ww;
  g.nwx = g.Wp / g.ww, g.nw = (g.Hp / g.wh) * g.nwx;
  g.table_size = (2 * g.wh - 1) * (2 * g.ww - 1);
  check::dtype_in(table, {at::kFloat}, kOp, "table");
  check::shape(table, {g.table_size, heads}, kOp, "table");
  check::contiguous(table, kOp, "table");
  if (qkv_bias.has_value()) {
    TORCH_CHECK(qkv_bias->scalar_type() == qkv.scalar_type(), kOp, ": qkv_bias must have qkv's dtype ",
                check::dtype_name(qkv.scalar_type()), ", got ", check::dtype_name(qkv_bias->scalar_type()));
    check::shape(*qkv_bias, {3 * g.C}, kOp, "qkv_bias");
    check::contiguous(*qkv_bias, kOp, "qkv_bias");
  }
  TORCH_CHECK(std::isfinite(scale), kOp, ": scale must be finite, got ", scale);
  TORCH_CHECK(!std::isnan(mask_value) && mask_value <= 0, kOp, ": mask_value must be <= 0 (Swin: -100, or -inf), got ",
              mask_value);
  TORCH_CHECK(g.H * g.W < (int64_t(1) << 31), kOp, ": feature map too large (H*W >= 2^31)");
  TORCH_CHECK(g.B * g.nw * heads < (int64_t(1) << 31), kOp, ": B * windows * heads = ", g.B * g.nw * heads,
              " exceeds the grid limit 2^31-1");
  return g;
}

void check_outputs(const at::Tensor& qkv, const Geometry& g, int64_t heads, const at::Tensor& out,
                   const at::Tensor& lse) {
  TORCH_CHECK(out.scalar_type() == qkv.scalar_type(), kOp, ": out must have qkv's dtype ",
              check::dtype_name(qkv.scalar_type()), ", got ", check::dtype_name(out.scalar_type()));
  check::shape(out, {g.B, g.H, g.W, g.C}, kOp, "out");
  check::contiguous(out, kOp, "out");
  check::dtype_in(lse, {at::kFloat}, kOp, "lse");
  check::shape(lse, {g.B * g.nw, heads, g.n}, kOp, "lse");
  check::contiguous(lse, kOp, "lse");
}

void window_attention_fwd_out_cuda(const at::Tensor& qkv, const OptTensor& qkv_bias, const at::Tensor& table,
                                   int64_t heads, at::IntArrayRef window, at::IntArrayRef shift, double scale,
                                   double mask_value, bool pad_first, const at::Tensor& out, const at::Tensor& lse) {
  check::cuda(qkv, kOp, "qkv");
  auto same_device = [&](const at::Tensor& t, const char* name) {
    check::cuda(t, kOp, name);
    check::same_device(qkv, "qkv", t, name, kOp);
  };
  if (qkv_bias.has_value()) same_device(*qkv_bias, "qkv_bias");
  same_device(table, "table");
  same_device(out, "out");
  same_device(lse, "lse");
  const Geometry g = check_inputs(qkv, qkv_bias, table, heads, window, shift, scale, mask_value);
  check_outputs(qkv, g, heads, out, lse);
  check::aligned(qkv, 16, kOp, "qkv");
  check::aligned(out, 16, kOp, "out");
  if (qkv_bias.has_value()) check::aligned(*qkv_bias, 16, kOp, "qkv_bias");
  if (g.B * g.H * g.W == 0) return;

  c10::cuda::CUDAGuard guard(qkv.device());
  attn::WindowParams p{};
  p.qkv = qkv.const_data_ptr();
  p.qkv_bias = qkv_bias.has_value() ? qkv_bias->const_data_ptr() : nullptr;
  p.table = table.const_data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.H = static_cast<int>(g.H), p.W = static_cast<int>(g.W), p.Hp = static_cast<int>(g.Hp);
  p.Wp = static_cast<int>(g.Wp);
  p.wh = static_cast<int>(g.wh), p.ww = static_cast<int>(g.ww), p.sh = static_cast<int>(g.sh);
  p.sw = static_cast<int>(g.sw);
  p.nwx = static_cast<int>(g.nwx), p.nw = static_cast<int>(g.nw);
  p.heads = static_cast<int>(heads), p.n = static_cast<int>(g.n);
  p.n16 = static_cast<int>((g.n + attn::kKeyChunk - 1) / attn::kKeyChunk * attn::kKeyChunk);
  p.table_size = static_cast<int>(g.table_size);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // in double, as the Triton launcher
  p.mask_log2 = static_cast<float>(mask_value * 1.4426950408889634);
  p.has_mask = g.sh != 0 || g.sw != 0;
  p.pad_first = pad_first;

  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = g.B * g.nw * heads;
  const int device = qkv.device().index();
  VITKERN_HALF_SWITCH(qkv.scalar_type(), T, [&] {
    VITKERN_HEADDIM_SWITCH(g.D, kD, [&] {
      const int64_t smem = attn::window_smem_bytes<T, kD>(p.n16, p.table_size);
      TORCH_CHECK(smem <= static_cast<int64_t>(prop->sharedMemPerBlockOptin), kOp, ": a ", g.wh, "x", g.ww,
                  " window at head_dim ", kD, " needs ", smem, " bytes of shared memory; this device allows ",
                  prop->sharedMemPerBlockOptin, " per block");
      if (smem > 48 * 1024) attn::allow_max_dynamic_smem<attn::window_attention_fwd_kernel<T, kD>>(device);
      attn::window_attention_fwd_kernel<T, kD><<<static_cast<unsigned>(grid), attn::kWinThreads,
                                                 static_cast<size_t>(smem), stream>>>(p);
    });
  });
  VITKERN_CUDA_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fwd_outputs(const at::Tensor& qkv, const Geometry& g, int64_t heads) {
  return {at::empty({g.B, g.H, g.W, g.C}, qkv.options()),
          at::empty({g.B * g.nw, heads, g.n}, qkv.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cuda(const at::Tensor& qkv, const OptTensor& qkv_bias,
                                                             const at::Tensor& table, int64_t heads,
                                                             at::IntArrayRef window, at::IntArrayRef shift,
                                                             double scale, double mask_value, bool pad_first) {
  check::cuda(qkv, kOp, "qkv");
  const Geometry g = check_inputs(qkv, qkv_bias, table, heads, window, shift, scale, mask_value);
  auto out = fwd_outputs(qkv, g, heads);
  window_attention_fwd_out_cuda(qkv, qkv_bias, table, heads, window, shift, scale, mask_value, pad_first,
                                std::get<0>(out), std::get<1>(out));
  return out;
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_meta(const at::Tensor& qkv, const OptTensor& qkv_bias,
                                                             const at::Tensor& table, int64_t heads,
                                                             at::IntArrayRef window, at::IntArrayRef shift,
                                                             double scale, double mask_value, bool pad_first) {
  const Geometry g = check_inputs(qkv, qkv_bias, table, heads, window, shift, scale, mask_value);
  return fwd_outputs(qkv, g, heads);
}

void window_attention_fwd_out_meta(const at::Tensor& qkv, const OptTensor& qkv_bias, const at::Tensor& table,
                                   int64_t heads, at::IntArrayRef window, at::IntArrayRef shift, double scale,
                                   double mask_value, bool pad_first, const at::Tensor& out, const at::Tensor& lse) {
  const Geometry g = check_inputs(qkv, qkv_bias, table, heads, window, shift, scale, mask_value);
  check_outputs(qkv, g, heads, out, lse);
}

}  // namespace
}  // namespace vitkern

TORCH_LIBRARY_IMPL(vitkern_C, CUDA, m) {
  m.impl("window_attention_fwd", &vitkern::window_attention_fwd_cuda);
  m.impl("window_attention_fwd.out", &vitkern::window_attention_fwd_out_cuda);
}
TORCH_LIBRARY_IMPL(vitkern_C, Meta, m) {
  m.impl("window_attention_fwd", &vitkern::window_attention_fwd_meta);
  m.impl("window_attention_fwd.out", &vitkern::window_attention_fwd_out_meta);
}
