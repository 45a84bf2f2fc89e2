// vitkern_C::patch_embed_fwd (+ .out): image -> token buffer, forward only. Contract (identical to
// vitkern/ops/patch_embed.py's forward, so its Triton/reference backward runs after this forward):
//   patch_embed_fwd(x [B, C, H, W] (any strides; uint8/fp16/bf16/fp32; H % ph == W % pw == 0), norm [2, C] fp32?
//       (mean, 1/std: pixels are (x - mean)·istd in fp32), weight [D, C, ph, pw] (contiguous, compute dtype T =
//       fp16/bf16/fp32), bias [D]?, pos [L, D]?, prefix [P, D]?, pos_covers_prefix, pos_impl)
//   -> out [B, P + Np, D] (T, contiguous), Np = (H/ph)·(W/pw):
//       out[:, :P] = prefix (+ pos[:P] when pos_covers_prefix, L = P + Np)
//       out[:, P:] = patches @ weightᵀ + bias + (pos[P:] when pos_covers_prefix, else pos with L = Np)
//
// Pipeline (two launches):
//   1. patch_embed_prep_kernel (csrc/ops/patch_embed.cuh): gathers the pixels into patch rows [B·Np, K] in T
//      (K = C·ph·pw in Conv2d's (c, i, j) order; dtype cast and optional normalisation in fp32), and writes the
//      prefix token rows, in the same pass;
//   2. one cuBLASLt GEMM whose D is the patch-token part of `out` at its final offset: strided-batched over the
//      B images, ldd = D, batch stride (P + Np)·D, pointer out + P·D; the bias through the BIAS epilogue; the
//      position embedding through beta·C with C = the pos rows of the patches, ldc = D and batch stride 0 (one pos
//      for every image). Without prefix rows and pos embedding it is a single GEMM over all B·Np rows.
//   pos_impl: 0 auto, 1 C with batch stride 0 (an error if cuBLASLt has no algorithm for it), 2 fallback: step 1
//   also writes the pos rows into out and the GEMM accumulates onto them in place (C = D). Auto tries 1 and falls
//   back to 2 when cuBLASLt offers no algorithm for the broadcast C.
// Operand alignment: when K·sizeof(T) is not a multiple of 16 (p = 14: K = 588), the patch rows are written with a
// row stride rounded up to 16 bytes and the GEMM reads a copy of the weight padded the same way (D·K elements, ~1%
// of the GEMM's traffic at ViT sizes), so both operands have 16-byte aligned rows, which Hopper's TMA-based cuBLASLt
// kernels require; the padding columns are never read (k = K).
// Numerics: one rounding of acc + bias + pos (the eager reference rounds the conv output, then the sum with pos).
//
// Schema: csrc/vitkern_C.cpp.
#include <cstdint>
#include <optional>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cublaslt.h"
#include "common/dispatch.h"
#include "ops/patch_embed.cuh"

namespace vitkern {
namespace {

constexpr const char* kOp = "vitkern_C::patch_embed_fwd";

using OptTensor = std::optional<at::Tensor>;

enum PosImpl : int64_t { kPosAuto = 0, kPosBroadcastC = 1, kPosInPlace = 2 };

// ------------------------------------------------------------------------------------------------ argument checks
// (shared by the CUDA and Meta kernels; device checks are separate)

struct Shape {
  int64_t B, C, H, W, D, ph, pw, gh, gw, np, P, K;
};

void check_vector_rows(const OptTensor& t, const at::Tensor& weight, int64_t rows, const char* name) {
  if (!t.has_value()) return;
  check::ndim(*t, 2, kOp, name);
  TORCH_CHECK(t->scalar_type() == weight.scalar_type(), kOp, ": ", name, " must have weight's dtype ",
              check::dtype_name(weight.scalar_type()), ", got ", check::dtype_name(t->scalar_type()));
  check::shape(*t, {rows, weight.size(0)}, kOp, name);
  check::contiguous(*t, kOp, name);
}

Shape check_args(const at::Tensor& x, const OptTensor& norm, const at::Tensor& weight, const OptTensor& bias,
                 const OptTensor& pos, const OptTensor& prefix, bool pos_covers_prefix, int64_t pos_impl) {
  check::ndim(x, 4, kOp, "x");
  check::dtype_in(x, {at::kByte, at::kHalf, at::kBFloat16, at::kFloat}, kOp, "x");
  check::ndim(weight, 4, kOp, "weight");
  check::dtype_in(weight, {at::kHalf, at::kBFloat16, at::kFloat}, kOp, "weight");
  check::contiguous(weight, kOp, "weight");
  Shape s{};
  s.B = x.size(0);
  s.C = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.D = weight.size(0);
  s.ph = weight.size(2);
  s.pw = weight.size(3);
  TORCH_CHECK(weight.size(1) == s.C, kOp, ": weight [D, C, ph, pw] has C = ", weight.size(1), " but x has ", s.C,
              " channels");
  TORCH_CHECK(s.C >= 1 && s.D >= 1 && s.ph >= 1 && s.pw >= 1, kOp, ": need C, D, ph, pw >= 1, got weight shape ",
              weight.sizes());
  TORCH_CHECK(s.H % s.ph == 0 && s.W % s.pw == 0, kOp, ": image size ", s.H, "x", s.W,
              " is not a multiple of the patch size ", s.ph, "x", s.pw);
  s.gh = s.H / s.ph;
  s.gw = s.W / s.pw;
  s.np = s.gh * s.gw;
  s.K = s.C * s.ph * s.pw;
  TORCH_CHECK(s.K <= INT32_MAX && s.D <= INT32_MAX && s.np <= INT32_MAX, kOp, ": patch/embedding sizes too large");
  if (norm.has_value()) {
    check::dtype_in(*norm, {at::kFloat}, kOp, "norm");
    check::shape(*norm, {2, s.C}, kOp, "norm");
    check::contiguous(*norm, kOp, "norm");
  }
  if (bias.has_value()) {
    check::ndim(*bias, 1, kOp, "bias");
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), kOp, ": bias must have weight's dtype ",
                check::dtype_name(weight.scalar_type()), ", got ", check::dtype_name(bias->scalar_type()));
    check::size(*bias, 0, s.D, kOp, "bias");
    check::contiguous(*bias, kOp, "bias");
  }
  s.P = prefix.has_value() ? prefix->size(0) : 0;
  check_vector_rows(prefix, weight, s.P, "prefix");
  const int64_t pos_rows = (pos_covers_prefix ? s.P : 0) + s.np;
  if (pos.has_value()) {
    TORCH_CHECK(pos->dim() == 2, kOp, ": pos must be 2-D [L, D], got shape ", pos->sizes());
    TORCH_CHECK(pos->size(0) == pos_rows, kOp, ": pos must have ", pos_rows, " rows (",
                pos_covers_prefix ? "prefix + patches: pos_covers_prefix" : "one per patch", "), got ", pos->size(0));
  }
  check_vector_rows(pos, weight, pos_rows, "pos");
  TORCH_CHECK(pos_impl >= kPosAuto && pos_impl <= kPosInPlace, kOp,
              ": pos_impl must be 0 (auto), 1 (broadcast C) or 2 (in place), got ", pos_impl);
  return s;
}

void check_out(const at::Tensor& out, const at::Tensor& weight, const Shape& s) {
  check::ndim(out, 3, kOp, "out");
  TORCH_CHECK(out.scalar_type() == weight.scalar_type(), kOp, ": out must have weight's dtype ",
              check::dtype_name(weight.scalar_type()), ", got ", check::dtype_name(out.scalar_type()));
  check::shape(out, {s.B, s.P + s.np, s.D}, kOp, "out");
  check::contiguous(out, kOp, "out");
}

void check_devices(const at::Tensor& x, std::initializer_list<std::pair<const OptTensor*, const char*>> args) {
  check::cuda(x, kOp, "x");
  for (const auto& [t, name] : args) {
    if (!t->has_value()) continue;
    check::cuda(**t, kOp, name);
    check::same_device(x, "x", **t, name, kOp);
  }
}

// ------------------------------------------------------------------------------------------------ launch

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename Tin, typename T>
void launch_prep(const patch_embed::Params& p, int64_t units_upper_bound, cudaStream_t stream) {
  constexpr int kVec16 = 16 / sizeof(T), kVec8 = 8 / sizeof(T);
  const int64_t ctas_needed = (units_upper_bound + patch_embed::kThreads - 1) / patch_embed::kThreads;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min(ctas_needed, cap)));
  // patch rows in 16-byte packs when K allows it (p = 16), else 8-byte (e.g. p = 14: K = 588 = 4·147), else scalars
  if (p.K % kVec16 == 0) {
    patch_embed::patch_embed_prep_kernel<Tin, T, kVec16><<<grid, patch_embed::kThreads, 0, stream>>>(p);
  } else if (p.K % kVec8 == 0) {
    patch_embed::patch_embed_prep_kernel<Tin, T, kVec8><<<grid, patch_embed::kThreads, 0, stream>>>(p);
  } else {
    patch_embed::patch_embed_prep_kernel<Tin, T, 1><<<grid, patch_embed::kThreads, 0, stream>>>(p);
  }
  VITKERN_CUDA_LAUNCH_CHECK();
}

void run_prep(const at::Tensor& x, c10::ScalarType dtype, const patch_embed::Params& p, cudaStream_t stream) {
  const int64_t units = (p.gather ? p.batch * p.np * int64_t(p.K) : 0) +
                        (p.prefix_rows ? p.batch * p.P * int64_t(p.D) : 0) +
                        (p.pos_rows ? p.batch * p.np * int64_t(p.D) : 0);
  if (units == 0) return;
  VITKERN_FLOAT_SWITCH(dtype, T, [&] {
    switch (x.scalar_type()) {
      case at::kByte: launch_prep<uint8_t, T>(p, units, stream); break;
      case at::kHalf: launch_prep<__half, T>(p, units, stream); break;
      case at::kBFloat16: launch_prep<__nv_bfloat16, T>(p, units, stream); break;
      case at::kFloat: launch_prep<float, T>(p, units, stream); break;
      default: TORCH_CHECK(false, kOp, ": unsupported image dtype ", x.scalar_type());
    }
  });
}

void patch_embed_fwd_out_cuda(const at::Tensor& x, const OptTensor& norm, const at::Tensor& weight,
                              const OptTensor& bias, const OptTensor& pos, const OptTensor& prefix,
                              bool pos_covers_prefix, int64_t pos_impl, const at::Tensor& out) {
  const OptTensor weight_opt(weight), out_opt(out);
  check_devices(x, {{&norm, "norm"}, {&weight_opt, "weight"}, {&bias, "bias"}, {&pos, "pos"}, {&prefix, "prefix"},
                    {&out_opt, "out"}});
  const Shape s = check_args(x, norm, weight, bias, pos, prefix, pos_covers_prefix, pos_impl);
  check_out(out, weight, s);
  if (out.numel() == 0) return;
  at::assert_no_overlap(out, x);

  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const c10::ScalarType dtype = weight.scalar_type();
  const int64_t tokens = s.P + s.np, patch_rows = s.B * s.np;
  const int64_t vec = 16 / c10::elementSize(dtype);
  const int64_t ldk = (s.K + vec - 1) / vec * vec;  // 16-byte aligned operand rows (see the top of the file)
  const at::Tensor patches = at::empty({patch_rows, ldk}, weight.options());
  at::Tensor w = weight.view({s.D, s.K});
  if (ldk != s.K) {
    at::Tensor padded = at::empty({s.D, ldk}, weight.options());
    padded.narrow(1, 0, s.K).copy_(w);
    w = padded;
    // the pad columns [K, ldk) are outside the GEMM's k range, but a vectorized operand load may still touch them:
    // defined zeros (a strided memset, ldk - K < 8 elements per row) keep compute-sanitizer's initcheck quiet
    const size_t elt = c10::elementSize(dtype), pitch = ldk * elt, pad = (ldk - s.K) * elt;
    C10_CUDA_CHECK(cudaMemset2DAsync(static_cast<char*>(w.data_ptr()) + s.K * elt, pitch, 0, pad, s.D, stream));
    if (patch_rows > 0) {
      C10_CUDA_CHECK(cudaMemset2DAsync(static_cast<char*>(patches.data_ptr()) + s.K * elt, pitch, 0, pad,
                                       patch_rows, stream));
    }
  }

  patch_embed::Params p{};
  p.x = x.const_data_ptr();
  p.sb = x.stride(0);
  p.sc = x.stride(1);
  p.sh = x.stride(2);
  p.sw = x.stride(3);
  p.norm = norm.has_value() ? norm->const_data_ptr<float>() : nullptr;
  p.patches = patches.data_ptr();
  p.prefix = prefix.has_value() ? prefix->const_data_ptr() : nullptr;
  p.pos = pos.has_value() ? pos->const_data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.batch = s.B;
  p.C = static_cast<int>(s.C);
  p.ph = static_cast<int>(s.ph);
  p.pw = static_cast<int>(s.pw);
  p.gw = static_cast<int>(s.gw);
  p.np = static_cast<int>(s.np);
  p.K = static_cast<int>(s.K);
  p.ldp = ldk;
  p.P = static_cast<int>(s.P);
  p.D = static_cast<int>(s.D);
  p.pos_covers_prefix = pos_covers_prefix;
  p.tokens_vec = s.D % vec == 0 && aligned16(p.out) && aligned16(p.prefix) && aligned16(p.pos);
  // 1. patches + prefix rows (+ the pos rows when the in-place mode is asked for up front)
  p.gather = patch_rows > 0;
  p.prefix_rows = s.P > 0;
  p.pos_rows = pos.has_value() && pos_impl == kPosInPlace && patch_rows > 0;
  run_prep(x, dtype, p, stream);
  if (patch_rows == 0) return;

  // 2. tokens = patches @ weightᵀ + bias (+ pos), straight into out[:, P:]
  const int64_t d = s.D;
  lt::MatmulArgs g = lt::linear_args(dtype, s.np, d, s.K, patches.const_data_ptr(), ldk, w.const_data_ptr(), ldk,
                                     static_cast<char*>(out.data_ptr()) + s.P * d * out.element_size(), d);
  if (bias.has_value()) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;
    g.bias = bias->const_data_ptr();
  }
  const bool batched = s.P > 0 || pos.has_value();
  if (batched) {  // one batch per image: B's own row offset in out, the same weight for all
    TORCH_CHECK(s.B <= INT32_MAX, kOp, ": batch ", s.B, " exceeds cuBLASLt's batch count limit");
    g.batch = static_cast<int32_t>(s.B);
    g.stride_a = 0;
    g.stride_b = s.np * ldk;
    g.stride_d = tokens * d;
  } else {  // contiguous patch tokens: one GEMM over all B·Np rows
    g.n = patch_rows;
  }
  if (!pos.has_value()) {
    lt::matmul(g, "patch_embed GEMM");
    return;
  }
  const void* pos_patches =
      static_cast<const char*>(pos->const_data_ptr()) + (pos_covers_prefix ? s.P : 0) * d * pos->element_size();
  if (pos_impl != kPosInPlace) {  // C = the pos rows, broadcast to every image (batch stride 0)
    lt::MatmulArgs gc = g;
    gc.c = pos_patches;
    gc.ldc = d;
    gc.stride_c = 0;
    gc.beta = 1.f;
    if (pos_impl == kPosBroadcastC) {
      lt::matmul(gc, "patch_embed GEMM with the position embedding as a batch-stride-0 C");
      return;
    }
    if (lt::try_matmul(gc, "patch_embed GEMM with the position embedding as a batch-stride-0 C")) return;
    // auto: cuBLASLt has no algorithm for the broadcast C; write the pos rows first and accumulate in place
    p.gather = p.prefix_rows = false;
    p.pos_rows = true;
    run_prep(x, dtype, p, stream);
  }
  g.c = g.d;  // in place: C = D, same layout
  g.ldc = g.ldd;
  g.stride_c = g.stride_d;
  g.beta = 1.f;
  lt::matmul(g, "patch_embed GEMM accumulating onto the position embedding in place");
}

at::Tensor out_like(const at::Tensor& weight, const Shape& s) {
  return at::empty({s.B, s.P + s.np, s.D}, weight.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor patch_embed_fwd_cuda(const at::Tensor& x, const OptTensor& norm, const at::Tensor& weight,
                                const OptTensor& bias, const OptTensor& pos, const OptTensor& prefix,
                                bool pos_covers_prefix, int64_t pos_impl) {
  check::cuda(x, kOp, "x");
  const Shape s = check_args(x, norm, weight, bias, pos, prefix, pos_covers_prefix, pos_impl);
  at::Tensor out = out_like(weight, s);
  patch_embed_fwd_out_cuda(x, norm, weight, bias, pos, prefix, pos_covers_prefix, pos_impl, out);
  return out;
}

at::Tensor patch_embed_fwd_meta(const at::Tensor& x, const OptTensor& norm, const at::Tensor& weight,
                                const OptTensor& bias, const OptTensor& pos, const OptTensor& prefix,
                                bool pos_covers_prefix, int64_t pos_impl) {
  return out_like(weight, check_args(x, norm, weight, bias, pos, prefix, pos_covers_prefix, pos_impl));
}

void patch_embed_fwd_out_meta(const at::Tensor& x, const OptTensor& norm, const at::Tensor& weight,
                              const OptTensor& bias, const OptTensor& pos, const OptTensor& prefix,
                              bool pos_covers_prefix, int64_t pos_impl, const at::Tensor& out) {
  check_out(out, weight, check_args(x, norm, weight, bias, pos, prefix, pos_covers_prefix, pos_impl));
}

}  // namespace
}  // namespace vitkern

TORCH_LIBRARY_IMPL(vitkern_C, CUDA, m) {
  m.impl("patch_embed_fwd", &vitkern::patch_embed_fwd_cuda);
  m.impl("patch_embed_fwd.out", &vitkern::patch_embed_fwd_out_cuda);
}
TORCH_LIBRARY_IMPL(vitkern_C, Meta, m) {
  m.impl("patch_embed_fwd", &vitkern::patch_embed_fwd_meta);
  m.impl("patch_embed_fwd.out", &vitkern::patch_embed_fwd_out_meta);
}
