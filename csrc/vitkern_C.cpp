// vitkern._C: op schemas (the public C++ API surface, all in one place) and the Python module stub.
//
// Ops live in the `vitkern_C` namespace: torch.ops.vitkern_C.<name>. Schemas are declared here; each op's kernels
// are registered next to their implementation (TORCH_LIBRARY_IMPL(vitkern_C, CUDA / Meta, m) in csrc/ops/*.cu).
//
// Adding a CUDA op:
//   1. m.def("my_op(Tensor x, ...) -> Tensor") below;
//   2. csrc/ops/my_op.cu: validate with common/checks.h, dispatch with common/dispatch.h, launch on
//      at::cuda::getCurrentCUDAStream(), VITKERN_CUDA_LAUNCH_CHECK(), then
//      TORCH_LIBRARY_IMPL(vitkern_C, CUDA, m) { m.impl("my_op", &my_op_cuda); } (+ a Meta impl for torch.compile);
//   3. a GPU test comparing against the PyTorch reference. setup.py picks up every csrc/**/*.cu|*.cpp.
#include <Python.h>

#include <sstream>
#include <string>

#include <torch/library.h>

#include "common/config.h"
#include "common/dispatch.h"
#include "vitkern_C.h"

namespace vitkern {
namespace {

// Self-test for common/dispatch.h: maps (dtype, head_dim) through VITKERN_FLOAT_SWITCH / VITKERN_HEADDIM_SWITCH and
// reports the compile-time type and constant that were selected, e.g. "bfloat16/2/64" (name/sizeof/head dim).
// Unsupported values raise the switches' own errors. Lets CPU tests check the instantiation table without a GPU.
std::string dispatch_selftest(c10::ScalarType dtype, int64_t head_dim) {
  return VITKERN_FLOAT_SWITCH(dtype, T, [&] {
    return VITKERN_HEADDIM_SWITCH(head_dim, kHeadDim, [&] {
      static_assert(kHeadDim % 16 == 0, "head dims must be multiples of 16 (MMA k-tile)");
      std::ostringstream s;
      s << DTypeTraits<T>::kName << "/" << sizeof(T) << "/" << kHeadDim;
      return s.str();
    });
  });
}

}  // namespace
}  // namespace vitkern

// The csrc/ digest in the library's bytes, read by vitkern._extension before it imports a built library: one built
// from other sources is reported stale instead of running old kernels (vitkern/_build_config.py built_digest).
extern "C" __attribute__((used, visibility("default"))) const char vitkern_csrc_digest_marker[] =
    "VITKERN_CSRC_DIGEST=" VITKERN_CSRC_DIGEST_STR ";";

TORCH_LIBRARY(vitkern_C, m) {
  // How this binary was built: JSON with torch / CUDA / nvcc versions and the compiled SM targets.
  m.def("build_info() -> str", &vitkern::build_info);

  // Smoke op for the build chain (not a performance kernel): out[..., j] = x[..., j] + bias[j], computed in fp32 and
  // rounded once, i.e. bit-identical to `x + bias` in PyTorch. x: CUDA fp16/bf16/fp32, unit stride in the last dim;
  // bias: 1-D, same dtype/device, size x.size(-1). Kernels: CUDA + Meta (csrc/ops/add_rowwise.cu).
  m.def("add_rowwise(Tensor x, Tensor bias) -> Tensor");

  // LayerNorm over the last dim of [M, N] rows (N <= 8192), optional fused residual add; the contract of
  // vitkern/ops/layer_norm.py. x/residual/dy/dsum/xs: fp16/bf16/fp32, unit column stride; weight/bias: x's dtype or
  // fp32. fwd -> (y, sum = x + residual ([0] without residual), mean fp32 [M], rstd fp32 [M]);
  // bwd -> (dx, dweight fp32 [N] or [0], dbias fp32 [N] or [0]). The .out variants write caller-allocated outputs.
  // Kernels: CUDA + Meta (csrc/ops/layer_norm.cu).
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_fwd.out(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, *, "
        "Tensor(a!) y, Tensor(b!)? sum, Tensor(c!) mean, Tensor(d!) rstd) -> ()");
  m.def("layer_norm_bwd(Tensor dy, Tensor? dsum, Tensor xs, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd.out(Tensor dy, Tensor? dsum, Tensor xs, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool need_dw, bool need_db, *, Tensor(a!) dx) -> (Tensor, Tensor)");

  // Attention forward (tensor cores, online softmax), the contract of vitkern/ops/attention.py's backends:
  // q [B, H, N_Q, D], k/v [B, H, N_K, D] as strided views (unit stride in D; batch/head/row strides multiples of 8;
  // the packed qkv linear output viewed per head qualifies), fp16/bf16, D in {32, 64, 80, 96, 128}
  // -> (out [B, H, N_Q, D], lse [B, H, N_Q] fp32 natural-log logsumexp: what the Triton backward consumes).
  // kernel_path: 0 auto, 1 resident K/V in shared memory (ViT lengths), 2 streaming. The .out variant writes a
  // caller-provided out view (e.g. of the [B, N, H·D] proj input) and contiguous lse.
  // Kernels: CUDA + Meta (csrc/ops/attention.cu). No backward: autograd runs the Triton one.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale, int kernel_path=0) -> (Tensor, Tensor)");
  m.def("attention_fwd.out(Tensor q, Tensor k, Tensor v, float scale, int kernel_path=0, *, Tensor(a!) out, "
        "Tensor(b!) lse) -> ()");

  // Swin (shifted-)window attention forward on the un-partitioned layout, the contract of
  // vitkern/ops/window_attention.py's backends: qkv [B, H, W, 3·heads·D] contiguous fp16/bf16, qkv_bias [3·heads·D]
  // (qkv's dtype; the q/k/v of padded tokens) or None, table [(2wh-1)(2ww-1), heads] fp32, wh·ww <= 256, D in
  // {32, 64, 80, 96, 128}, 0 <= shift < window, pad_first: torchvision/HF order (pad, then roll)
  // -> (out [B, H, W, heads·D], lse [B·nW, heads, wh·ww] fp32). Kernels: CUDA + Meta (csrc/ops/window_attention.cu).
  m.def("window_attention_fwd(Tensor qkv, Tensor? qkv_bias, Tensor table, int heads, int[2] window, int[2] shift, "
        "float scale, float mask_value, bool pad_first) -> (Tensor, Tensor)");
  m.def("window_attention_fwd.out(Tensor qkv, Tensor? qkv_bias, Tensor table, int heads, int[2] window, "
        "int[2] shift, float scale, float mask_value, bool pad_first, *, Tensor(a!) out, Tensor(b!) lse) -> ()");

  // LayerNorm + Linear forward (norm1 + qkv): the contract of vitkern/ops/ln_linear.py's forward.
  // x [M, D] fp16/bf16/fp32 (unit column stride), parameters in x's dtype, weight [N, D] (nn.Linear layout)
  // -> (y [M, N], mean [M] fp32, rstd [M] fp32). LN kernel + one cuBLASLt GEMM (bias epilogue). Kernels: CUDA + Meta
  // (csrc/ops/ln_mlp.cu).
  m.def("ln_linear_fwd(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ln_linear_fwd.out(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, float eps, *, "
        "Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd) -> ()");

  // LayerNorm + MLP + layer scale + residual forward: the contract of vitkern/ops/ln_mlp.py's forward.
  // -> (y [M, D], pre [M, H], h [M, H] ([0] each unless save_for_backward), mean [M] fp32, rstd [M] fp32).
  // approximate: "none" (erf) | "tanh". gelu_impl: 0 auto, 1 cuBLASLt GELU epilogue (tanh only), 2 bias epilogue +
  // GELU kernel. ls_impl: 0 auto, 1 fold γ into fc2's rows, 2 separate x + γ·y kernel. No backward kernel: the
  // Triton/reference backward consumes (pre, h, mean, rstd). Kernels: CUDA + Meta (csrc/ops/ln_mlp.cu).
  m.def("ln_mlp_fwd(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, "
        "Tensor fc2_weight, Tensor? fc2_bias, Tensor? layer_scale, float eps, str approximate, bool save_for_backward, "
        "int gelu_impl=0, int ls_impl=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ln_mlp_fwd.out(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, "
        "Tensor fc2_weight, Tensor? fc2_bias, Tensor? layer_scale, float eps, str approximate, int gelu_impl=0, "
        "int ls_impl=0, *, Tensor(a!) y, Tensor(b!)? pre, Tensor(c!)? h, Tensor(d!) mean, Tensor(e!) rstd) -> ()");

  // Linear + bias + layer scale + residual forward (a ViT block's x + ls1(attn.proj(o))): the contract of
  // vitkern/ops/linear_residual.py's forward, y = residual + layer_scale · (x @ weightᵀ + bias).
  // x [M, K] fp16/bf16/fp32, weight [N, K] (nn.Linear layout), residual [M, N]: unit column stride, any
  // non-overlapping row stride; bias [N]? and layer_scale [N]? contiguous; all in x's dtype -> y [M, N] (the .out
  // variant's y: contiguous, sharing no memory with x or residual). LayerNorm+MLP's fc2 step alone: one cuBLASLt
  // GEMM (bias epilogue, residual through beta·C); ls_impl: 0 auto (fold when M >= K), 1 fold γ into the weight's
  // rows, 2 separate residual + γ·y kernel. No backward kernel: the Triton/reference backward needs only the
  // inputs. Kernels: CUDA + Meta (csrc/ops/ln_mlp.cu).
  m.def("linear_residual_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? layer_scale, "
        "int ls_impl=0) -> Tensor");
  m.def("linear_residual_fwd.out(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? layer_scale, "
        "int ls_impl=0, *, Tensor(a!) y) -> ()");

  // Patch embedding forward: the contract of vitkern/ops/patch_embed.py's forward (see the top of
  // csrc/ops/patch_embed.cu). pos_impl: 0 auto, 1 pos as a batch-stride-0 C, 2 pos rows written first + in-place
  // GEMM. No backward kernel: the Triton/reference backward runs from (x, norm, weight). Kernels: CUDA + Meta.
  m.def("patch_embed_fwd(Tensor x, Tensor? norm, Tensor weight, Tensor? bias, Tensor? pos, Tensor? prefix, "
        "bool pos_covers_prefix, int pos_impl=0) -> Tensor");
  m.def("patch_embed_fwd.out(Tensor x, Tensor? norm, Tensor weight, Tensor? bias, Tensor? pos, Tensor? prefix, "
        "bool pos_covers_prefix, int pos_impl=0, *, Tensor(a!) out) -> ()");

  // Test hooks (leading underscore: not API).
  m.def("_cublaslt_version() -> int", &vitkern::cublaslt_version);
  m.def("_dispatch_selftest(ScalarType dtype, int head_dim) -> str", &vitkern::dispatch_selftest);
  m.def("_device_arch_probe(Device device) -> int[]", &vitkern::device_arch_probe);
}

// `import vitkern._C` is what loads the registrations above into the process; Python needs a module init function
// for that. The module itself is empty: everything is reached through torch.ops.vitkern_C. (The JIT build loads the
// same sources with torch.ops.load_library, which does not use this.)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
PyMODINIT_FUNC VITKERN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      VITKERN_STRINGIFY(TORCH_EXTENSION_NAME), /* m_name */
      "vitkern CUDA ops; use torch.ops.vitkern_C.*", /* m_doc */
      -1, /* m_size */
      nullptr, /* m_methods */
  };
  return PyModule_Create(&module_def);
}
