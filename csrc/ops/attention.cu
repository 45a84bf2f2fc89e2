// vitkern_C::attention_fwd (+ .out): tensor-core flash-attention forward for fp16/bf16, head dims 32/64/80/96/128.
// Kernels and their design: csrc/ops/attention.cuh (+ csrc/ops/attention_mma.cuh). Contract (the backend contract of
// vitkern/ops/attention.py, identical to the Triton and reference forwards):
//   attention_fwd(q [B,H,N_Q,D], k [B,H,N_K,D], v [B,H,N_K,D], scale, kernel_path=0)
//       -> out [B,H,N_Q,D] (contiguous, q's dtype), lse [B,H,N_Q] fp32 (natural-log logsumexp of the scaled scores)
//   attention_fwd.out(..., *, out, lse): writes caller-provided views (out may be any [B,H,N_Q,D] view, e.g. of the
//       [B,N,H·D] proj input; lse must be contiguous).
// q/k/v/out: unit stride in the last dim, batch/head/row strides multiples of 8 elements and 16-byte aligned data
// (16-byte cp.async / vector stores): true for the packed qkv linear output and every contiguous layout; the Python
// backend copies anything else. kernel_path: 0 = automatic, 1 = resident K/V (errors if it does not fit in shared
// memory), 2 = streaming, 3 / 4 = wgmma with 2 / 1 warpgroups per CTA (sm_90a warpgroup MMAs,
// csrc/ops/attention_wgmma.cuh; errors on other devices or builds without sm_90a); 1-4 exist for tests, benchmarks
// and tuning. Auto never picks 3 or 4 until they have passed their GPU parity tests (see that header).
// No backward here: the lse is exactly the Triton backward's input, and vitkern/ops/attention_cuda.py rejects
// backward problems so the dispatcher (and vitkern.explain) routes them to Triton.
#include <algorithm>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/config.h"
#include "common/dispatch.h"
#include "ops/attention.cuh"
#include "ops/attention_launch.cuh"
#include "ops/attention_wgmma.cuh"

namespace vitkern {
namespace {

constexpr const char* kOp = "vitkern_C::attention_fwd";
constexpr int kAuto = 0, kResident = 1, kStreaming = 2, kWgmma2 = 3, kWgmma1 = 4;
// The resident kernel is chosen when at least this many of its CTAs fit on an SM (shared memory bound): with one
// 4-warp CTA per SM there is too little to hide load latency, and the streaming kernel wins.
constexpr int kResidentMinCtasPerSm = 2;

bool head_dim_supported(int64_t d) {
  for (int s : kSupportedHeadDims) {
    if (d == s) return true;
  }
  return false;
}

// strides (b, h, n) are multiples of 8 elements: every row starts 16 bytes after an aligned base
void check_row_strides(const at::Tensor& t, const char* name) {
  check::last_dim_contiguous(t, kOp, name);
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(t.stride(i) % 8 == 0 || t.size(i) == 1, kOp, ": ", name, ".stride(", i,
                ") must be a multiple of 8 elements (16-byte rows for vector loads), got strides ", t.strides(),
                " for shape ", t.sizes(), "; call .contiguous() first");
  }
}

// Shapes, dtypes, strides (shared by the CUDA and Meta kernels).
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t path) {
  check::ndim(q, 4, kOp, "q");
  check::ndim(k, 4, kOp, "k");
  check::ndim(v, 4, kOp, "v");
  check::dtype_in(q, {at::kHalf, at::kBFloat16}, kOp, "q");
  check::same_dtype(q, "q", k, "k", kOp);
  check::same_dtype(q, "q", v, "v", kOp);
  TORCH_CHECK(k.sizes() == v.sizes(), kOp, ": k and v must have the same shape [B, H, N_K, D], got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), kOp,
              ": q [B, H, N_Q, D] and k [B, H, N_K, D] must agree in B, H and D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(head_dim_supported(q.size(3)), kOp, ": head_dim (q.size(3)) must be one of 32, 64, 80, 96, 128, got ",
              q.size(3));
  TORCH_CHECK(k.size(2) > 0 || q.size(2) == 0 || q.size(0) * q.size(1) == 0, kOp,
              ": k has no keys (N_K = 0) but q has ", q.size(2), " queries: softmax over an empty set");
  TORCH_CHECK(q.size(2) < (int64_t(1) << 30) && k.size(2) < (int64_t(1) << 30), kOp, ": sequence length too long");
  check_row_strides(q, "q");
  check_row_strides(k, "k");
  check_row_strides(v, "v");
  TORCH_CHECK(scale == scale && scale > -1e30 && scale < 1e30, kOp, ": scale must be finite, got ", scale);
  TORCH_CHECK(path == kAuto || path == kResident || path == kStreaming || path == kWgmma2 || path == kWgmma1, kOp,
              ": kernel_path must be 0 (auto), 1 (resident K/V), 2 (streaming), 3 or 4 (wgmma with 2 or 1 warpgroups, "
              "sm_90a), got ", path);
}

void check_outputs(const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  check::ndim(out, 4, kOp, "out");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), kOp, ": out must have q's dtype ",
              check::dtype_name(q.scalar_type()), ", got ", check::dtype_name(out.scalar_type()));
  check::shape(out, q.sizes(), kOp, "out");
  check_row_strides(out, "out");
  check::dtype_in(lse, {at::kFloat}, kOp, "lse");
  check::shape(lse, q.sizes().slice(0, 3), kOp, "lse");
  check::contiguous(lse, kOp, "lse");
}

enum class Kernel { kResident, kStreaming, kWgmma2, kWgmma1 };

struct Plan {
  Kernel kernel;
  int64_t smem;
  int64_t grid;
  int ctas_per_head, tiles_per_cta;
};

// The mma.sync kernels: resident K/V or streaming, and how the grid covers B·H heads (SM count, shared memory).
template <typename T, int D>
void plan_mma_sync(Plan& plan, const cudaDeviceProp* prop, int64_t bh, int64_t n_q, int64_t n_k, int64_t path) {
  const int64_t smem_res = attn::resident_smem_bytes<T, D>(static_cast<int>(n_k));
  const int64_t per_cta = smem_res + static_cast<int64_t>(prop->reservedSharedMemPerBlock);
  const int64_t res_per_sm = smem_res <= static_cast<int64_t>(prop->sharedMemPerBlockOptin)
                                 ? static_cast<int64_t>(prop->sharedMemPerMultiprocessor) / per_cta
                                 : 0;
  bool resident = path == kResident || (path == kAuto && res_per_sm >= kResidentMinCtasPerSm);
  TORCH_CHECK(!resident || res_per_sm >= 1, kOp, ": kernel_path=1 (resident K/V) needs ", smem_res,
              " bytes of shared memory for N_K=", n_k, ", head_dim=", D, " but this device allows ",
              prop->sharedMemPerBlockOptin, " per block; use kernel_path 0 or 2");
  plan.kernel = resident ? Kernel::kResident : Kernel::kStreaming;
  if (resident) {
    const int64_t tiles = (n_q + attn::kRowsPerWarp - 1) / attn::kRowsPerWarp;
    // Enough CTAs for one full wave: split a head's query tiles over several CTAs only when there are fewer heads
    // than CTA slots (each split reloads K/V). Tiles per CTA: a multiple of the warp count, so warps stay balanced.
    const int64_t slots = static_cast<int64_t>(prop->multiProcessorCount) * std::max<int64_t>(res_per_sm, 1);
    int64_t splits = std::min<int64_t>((tiles + attn::kAttnWarps - 1) / attn::kAttnWarps,
                                       std::max<int64_t>(1, (slots + bh - 1) / bh));
    splits = std::max<int64_t>(splits, 1);
    int64_t per = (tiles + splits - 1) / splits;
    per = (per + attn::kAttnWarps - 1) / attn::kAttnWarps * attn::kAttnWarps;
    plan.tiles_per_cta = static_cast<int>(per);
    plan.ctas_per_head = static_cast<int>((tiles + per - 1) / per);
    plan.smem = smem_res;
  } else {
    plan.ctas_per_head = static_cast<int>((n_q + attn::kStreamBlockM - 1) / attn::kStreamBlockM);
    plan.tiles_per_cta = attn::kStreamBlockM / attn::kRowsPerWarp;
    plan.smem = attn::streaming_smem_bytes<T, D>();
  }
}

// Which kernel, and how the grid covers B·H heads. Depends on the device (SM count, shared memory).
template <typename T, int D>
Plan make_plan(int64_t bh, int64_t n_q, int64_t n_k, int64_t path) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  Plan plan{};
  if (path == kWgmma2 || path == kWgmma1) {
    // sm_90a SASS runs on compute capability 9.0 only, and only a build with the 90a target has the kernel's body
    TORCH_CHECK(prop->major == 9 && prop->minor == 0, kOp, ": kernel_path=", path,
                " (wgmma) needs an sm_90 GPU (H100/H200), this device is sm_", prop->major, prop->minor,
                "; use kernel_path 0");
    TORCH_CHECK(compiled_cuda_archs().find("sm_90a") != std::string::npos, kOp, ": kernel_path=", path,
                " (wgmma) needs vitkern._C built for sm_90a, it was built for ", compiled_cuda_archs());
    const int groups = path == kWgmma2 ? 2 : 1;
    plan.kernel = path == kWgmma2 ? Kernel::kWgmma2 : Kernel::kWgmma1;
    plan.ctas_per_head = static_cast<int>((n_q + 64 * groups - 1) / (64 * groups));
    plan.tiles_per_cta = 64 * groups / attn::kRowsPerWarp;
    plan.smem = groups == 2 ? attn::wgmma_smem_bytes<T, D, 2>() : attn::wgmma_smem_bytes<T, D, 1>();
  } else {
    plan_mma_sync<T, D>(plan, prop, bh, n_q, n_k, path);
  }
  plan.grid = bh * plan.ctas_per_head;
  TORCH_CHECK(plan.grid < (int64_t(1) << 31), kOp, ": B*H*query tiles = ", plan.grid, " exceeds the grid limit 2^31-1");
  return plan;
}

void attention_fwd_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t kernel_path, const at::Tensor& out, const at::Tensor& lse) {
  check::cuda(q, kOp, "q");
  auto same_device = [&](const at::Tensor& t, const char* name) {
    check::cuda(t, kOp, name);
    check::same_device(q, "q", t, name, kOp);
  };
  same_device(k, "k");
  same_device(v, "v");
  same_device(out, "out");
  same_device(lse, "lse");
  check_inputs(q, k, v, scale, kernel_path);
  check_outputs(q, out, lse);
  check::aligned(q, 16, kOp, "q");
  check::aligned(k, 16, kOp, "k");
  check::aligned(v, 16, kOp, "v");
  check::aligned(out, 16, kOp, "out");
  const int64_t B = q.size(0), H = q.size(1), n_q = q.size(2), n_k = k.size(2);
  if (B * H * n_q == 0) return;

  c10::cuda::CUDAGuard guard(q.device());
  attn::AttnParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sn = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sn = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sn = v.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sn = out.stride(2);
  p.heads = static_cast<int>(H);
  p.n_q = static_cast<int>(n_q);
  p.n_k = static_cast<int>(n_k);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // in double, as the Triton launcher
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int device = q.device().index();
  VITKERN_HALF_SWITCH(q.scalar_type(), T, [&] {
    VITKERN_HEADDIM_SWITCH(q.size(3), kD, [&] {
      const Plan plan = make_plan<T, kD>(B * H, n_q, n_k, kernel_path);
      p.ctas_per_head = plan.ctas_per_head;
      p.tiles_per_cta = plan.tiles_per_cta;
      const dim3 grid(static_cast<unsigned>(plan.grid));
      const size_t smem = static_cast<size_t>(plan.smem);
      if (plan.kernel == Kernel::kWgmma2) {
        attn::allow_max_dynamic_smem<attn::attention_fwd_wgmma_kernel<T, kD, 2>>(device);
        attn::attention_fwd_wgmma_kernel<T, kD, 2><<<grid, 256, smem, stream>>>(p);
      } else if (plan.kernel == Kernel::kWgmma1) {
        attn::allow_max_dynamic_smem<attn::attention_fwd_wgmma_kernel<T, kD, 1>>(device);
        attn::attention_fwd_wgmma_kernel<T, kD, 1><<<grid, 128, smem, stream>>>(p);
      } else if (plan.kernel == Kernel::kResident) {
        attn::allow_max_dynamic_smem<attn::attention_fwd_resident_kernel<T, kD>>(device);
        attn::attention_fwd_resident_kernel<T, kD><<<grid, attn::kAttnThreads, smem, stream>>>(p);
      } else {
        attn::allow_max_dynamic_smem<attn::attention_fwd_streaming_kernel<T, kD>>(device);
        attn::attention_fwd_streaming_kernel<T, kD><<<grid, attn::kAttnThreads, smem, stream>>>(p);
      }
    });
  });
  VITKERN_CUDA_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fwd_outputs(const at::Tensor& q) {
  return {at::empty(q.sizes(), q.options()), at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale, int64_t kernel_path) {
  check::cuda(q, kOp, "q");
  check_inputs(q, k, v, scale, kernel_path);
  auto out = fwd_outputs(q);
  attention_fwd_out_cuda(q, k, v, scale, kernel_path, std::get<0>(out), std::get<1>(out));
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale, int64_t kernel_path) {
  check_inputs(q, k, v, scale, kernel_path);
  return fwd_outputs(q);
}

void attention_fwd_out_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t kernel_path, const at::Tensor& out, const at::Tensor& lse) {
  check_inputs(q, k, v, scale, kernel_path);
  check_outputs(q, out, lse);
}

}  // namespace
}  // namespace vitkern

TORCH_LIBRARY_IMPL(vitkern_C, CUDA, m) {
  m.impl("attention_fwd", &vitkern::attention_fwd_cuda);
  m.impl("attention_fwd.out", &vitkern::attention_fwd_out_cuda);
}
TORCH_LIBRARY_IMPL(vitkern_C, Meta, m) {
  m.impl("attention_fwd", &vitkern::attention_fwd_meta);
  m.impl("attention_fwd.out", &vitkern::attention_fwd_out_meta);
}
