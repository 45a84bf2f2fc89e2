// sm_90a attention forward with warpgroup MMAs (wgmma.mma_async), kernel_path 3 of csrc/ops/attention.cu. Same
// contract and parameters (AttnParams) as the mma.sync kernels of csrc/ops/attention.cuh.
//
// One CTA = kGroups warpgroups (2: kernel_path 3, 1: kernel_path 4) = 64·kGroups query rows of one (batch, head);
// each warpgroup owns a 64-row query tile (the wgmma M). 64-key K/V blocks stream through shared memory,
// double-buffered with cp.async (all threads load). Two warpgroups share each K/V block (half the K/V traffic); one
// warpgroup per CTA fits more CTAs per SM (registers: 140 per thread at D=64), whose barriers and MMA waits then
// overlap. Which is faster is for the GPU benchmark to say. Per key block and warpgroup:
//     S[64 x 64] = Q Kᵀ   wgmma m64n64k16 x D/16, A = the Q tile in registers, B = K from shared memory (K-major)
//     online softmax      the mma.sync kernels' code (online_softmax): the wgmma accumulator of each warp has the
//                         m16n8 C-fragment layout of its 16 rows, exactly what that code expects
//     O[64 x D] += P V    wgmma m64nDk16 x 4, A = P packed from S in registers (p_fragment), B = V (N-major)
// The Q tile reaches registers once, through ldmatrix (load_q_frags), as for the mma.sync kernels.
//
// Shared-memory operand layout: the no-swizzle "core matrix" layout of the PTX ISA (Shared Memory Matrix Layout,
// canonical layouts). A core matrix is 8 rows x 16 bytes (8 keys x 8 head-dim elements), 128 contiguous bytes;
// a block of 64 keys is stored [key / 8][d / 8][key % 8][d % 8]. The same bytes serve both products:
//   K as B of Q Kᵀ (K-major: B[k = d][n = key]):     LBO = next 8 d (128 B), SBO = next 8 keys (16·D B);
//   V as B of P V  (N-major: B[k = key][n = d]):      LBO = next 8 keys (16·D B), SBO = next 8 d (128 B).
// (For N-major without swizzle the PTX prose is ambiguous; its canonical layout ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))
// and CUTLASS's make_gmma_desc<Major::MN> for INTERLEAVE agree: SBO strides along N, LBO along K.)
// A k-step advances the start address: 16 d = two core matrices (256 B) for K, 16 keys = two key groups (32·D B)
// for V. cp.async fills the block in exactly this order (thread i writes bytes 16i..16i+15), so the shared-memory
// stores are conflict-free and each warp reads 64 contiguous bytes of each of 8 global rows.
//
// Ordering: cp.async writes through the generic proxy and wgmma reads through the async proxy, so every thread
// issues fence.proxy.async after its copies landed and before the barrier that publishes them. wgmma_fence() comes
// before each batch of MMAs (their accumulator / A registers were written by ordinary instructions) and
// wgmma_wait<0>() after it; fence_operands() keeps the compiler from moving accumulator (and A-register) reads or writes across the
// asynchronous window.
//
// Validation status: compiled for sm_90a in CI; parity and sanitizer runs are GPU tests (tests/test_attention_cuda.py,
// kernel_path 3). Until they pass on a GPU the automatic path (0) never picks this kernel.
#pragma once

#include <cstdint>

#include "ops/attention.cuh"
#include "ops/attention_mma.cuh"
#include "ops/wgmma_ops.cuh"

namespace vitkern {
namespace attn {

constexpr int kWgmmaBlockN = 64;               // keys per block: the N of S = Q Kᵀ
constexpr int kWgmmaTiles = kWgmmaBlockN / 8;  // 8-key tiles of S

// K/V stages (2 each, core-matrix layout) then the Q staging tile [64·kGroups][D + 8].
template <typename T, int D, int kGroups>
__host__ __device__ constexpr int64_t wgmma_smem_bytes() {
  return (4 * int64_t(kWgmmaBlockN) * D + int64_t(64 * kGroups) * Dim<D>::kStride) * int64_t(sizeof(T));
}

#if VITKERN_WGMMA_ENABLED

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Make this thread's generic-proxy shared-memory writes (cp.async included) visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The register-A operands too: their packing must be ordered before wgmma_fence() (FlashAttention-3 does the same).
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
  }
}

// Shared-memory matrix descriptor, no swizzle (bits 0-13 start >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4; base offset
// and swizzle mode 0).
__device__ __forceinline__ uint64_t smem_desc(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((smem_u32(start) & 0x3FFFFu) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFFu) << 32);
}

// One 64-key block of K or V into the core-matrix layout (header comment); rows >= valid_rows are zero-filled (V rows
// past N_K must be 0: P = 0 times a NaN bit pattern is NaN). Thread i of the CTA copies 16-byte pieces
// i, i + kThreads, ... in shared-memory order: piece i = (key group, d chunk, key % 8).
template <typename T, int D, int kThreads>
__device__ __forceinline__ void load_kv_block_async(T* smem, const T* g, int64_t row_stride, int valid_rows, int tid) {
  constexpr int kChunks = D / 8;
  for (int i = tid; i < kWgmmaBlockN * kChunks; i += kThreads) {
    const int r = (i / (8 * kChunks)) * 8 + i % 8, c = (i / 8) % kChunks;
    const bool ok = r < valid_rows;
    cp_async_16(smem + i * 8, ok ? g + r * row_stride + c * 8 : g, ok);
  }
}

#endif  // VITKERN_WGMMA_ENABLED

template <typename T, int D, int kGroups>
__global__ void __launch_bounds__(128 * kGroups, 1) attention_fwd_wgmma_kernel(const AttnParams p) {
#if VITKERN_WGMMA_ENABLED
  constexpr int kThreads = 128 * kGroups, kBlockM = 64 * kGroups;
  using Di = Dim<D>;
  using MmaS = wgmma::WgmmaRS<T, kWgmmaBlockN>;
  using MmaO = wgmma::WgmmaRS<T, D>;
  constexpr int kBlock = kWgmmaBlockN * D;  // elements of one K or V stage
  static_assert(16 * D < (1 << 18), "LBO/SBO of 16·D bytes must fit the descriptor's 14-bit (>> 4) fields");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);  // 2 stages
  T* vs = ks + 2 * kBlock;                 // 2 stages
  T* qs = vs + 2 * kBlock;                 // [kBlockM][Di::kStride]; warp w's 16 rows are its staging tile at the end
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const int64_t bh = blockIdx.x / p.ctas_per_head;
  const int row0 = (blockIdx.x % p.ctas_per_head) * kBlockM;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* o = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  // A warpgroup whose 64 rows all lie past N_Q (in the last CTA, kGroups 2) still loads and meets every barrier, but
  // skips the math (warpgroup-uniform, as wgmma requires).
  const bool active = row0 + (warp / 4) * 64 < p.n_q;

  // prologue: the CTA's Q rows and key block 0
  load_rows_async<T, D>(qs, q + int64_t(row0) * p.q_sn, p.q_sn, kBlockM, p.n_q - row0, tid, kThreads);
  load_kv_block_async<T, D, kThreads>(ks, k, p.k_sn, p.n_k, tid);
  load_kv_block_async<T, D, kThreads>(vs, v, p.v_sn, p.n_k, tid);
  cp_async_commit();

  T* q_warp = qs + warp * kRowsPerWarp * Di::kStride;  // warp w: rows 16w.. (warpgroup w / 4, its warp w % 4)
  uint32_t qf[D / 16][4];
  RowState<D> st;
  st.init();
  const int n_blocks = (p.n_k + kWgmmaBlockN - 1) / kWgmmaBlockN;
  for (int j = 0; j < n_blocks; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_blocks) {  // prefetch block j+1 into the other stage (freed by the barrier ending iteration j-1)
      const int next = (j + 1) * kWgmmaBlockN;
      load_kv_block_async<T, D, kThreads>(ks + (stage ^ 1) * kBlock, k + int64_t(next) * p.k_sn, p.k_sn,
                                          p.n_k - next, tid);
      load_kv_block_async<T, D, kThreads>(vs + (stage ^ 1) * kBlock, v + int64_t(next) * p.v_sn, p.v_sn,
                                          p.n_k - next, tid);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the prefetch has landed (this thread's copies)
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async_smem();  // ... is visible to wgmma
    __syncthreads();           // ... and so is every other thread's
    if (active) {
      if (j == 0) load_q_frags<T, D>(qf, q_warp, lane);
      const T* kb = ks + stage * kBlock;
      const T* vb = vs + stage * kBlock;

      // S = Q Kᵀ
      float s[kWgmmaTiles][4];
#pragma unroll
      for (int t = 0; t < kWgmmaTiles; ++t) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[t][i] = 0.f;
      }
      auto& s_flat = reinterpret_cast<float(&)[MmaS::kAcc]>(s);
      fence_operands(s_flat);
      fence_operands(qf);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Di::kKSteps; ++kk) {
        MmaS::template mma<0>(s_flat, qf[kk], smem_desc(kb + kk * 128, 128, 16 * D));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(s_flat);

      const int key0 = j * kWgmmaBlockN;
      online_softmax<D, kWgmmaTiles>(st, s, kWgmmaBlockN / kKeyChunk, p.scale_log2, KeyTail{key0, p.n_k}, lane);

      // O += P V
      uint32_t pa[kWgmmaBlockN / kKeyChunk][4];
#pragma unroll
      for (int c = 0; c < kWgmmaBlockN / kKeyChunk; ++c) p_fragment<T>(pa[c], s, c);
      auto& o_flat = reinterpret_cast<float(&)[MmaO::kAcc]>(st.o);
      fence_operands(o_flat);
      fence_operands(pa);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < kWgmmaBlockN / kKeyChunk; ++c) {
        MmaO::template mma<1>(o_flat, pa[c], smem_desc(vb + c * 16 * D, 16 * D, 128));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o_flat);
    }
    __syncthreads();  // stage j&1 is overwritten by the prefetch of iteration j+1
  }

  if (!active) return;
  write_rows<T, D>(st, q_warp, o, p.o_sn, p.lse + bh * p.n_q, row0 + warp * kRowsPerWarp, p.n_q, lane);
#else
  __trap();  // built without sm_90a: the host never launches this (attention.cu checks the device and the build)
#endif
}

}  // namespace attn
}  // namespace vitkern
