// Attention forward kernels, used by csrc/ops/attention.cu. Same contract as the Triton forward
// (vitkern/kernels/triton/attention_fwd.py): o = softmax(q kᵀ · scale) v and lse = the natural-log logsumexp of each
// query's scaled scores, fp32 [B, H, N_Q] — exactly what the Triton (and reference) backward consumes, so autograd
// runs either of them on this forward's outputs.
//
// q/o: [B, H, N_Q, D], k/v: [B, H, N_K, D] addressed through their batch / head / row strides (unit stride inside a
// row): the packed qkv linear output [B, N, 3·H·D] is read per head without a copy and o is written straight into
// the [B, N, H·D] layout the proj linear reads. Any N_Q, N_K >= 1 (tails zero-filled and masked).
//
// Two kernels, both 4 warps, one warp = 16 query rows (csrc/ops/attention_mma.cuh does the math):
//  * resident (ViT lengths, the specialisation): a CTA loads the WHOLE K and V of one (batch, head) into shared
//    memory once and its warps walk several 16-row query tiles against it, so K/V are read from global/L2 once per
//    CTA instead of once per 64-row query tile. The host picks it when K+V of a head fit with >= 2 CTAs per SM
//    (sm_90, D=64: N_K <= ~380, e.g. ViT-S/B at 197, ViT-H/14 at 257 with D=80). When there are fewer heads than
//    CTA slots, a head's query tiles are split over several CTAs (each loads K/V once).
//  * streaming (long sequences, D=128 at ViT lengths): one CTA = 64 query rows; 64-key K/V blocks double-buffered
//    through cp.async while the previous block is multiplied.
#pragma once

#include <cstdint>

#include "ops/attention_mma.cuh"

namespace vitkern {
namespace attn {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = 32 * kAttnWarps;
// Register budget: >= 2 CTAs per SM (255 registers per thread at 128 threads). Without an explicit minimum, ptxas
// capped some instantiations (D=96 resident, D=128 streaming) at 168 registers and spilled.
constexpr int kAttnMinCtasPerSm = 2;
constexpr int kAttnBlockN = 64;                        // keys per online-softmax step
constexpr int kStreamBlockM = kAttnWarps * kRowsPerWarp;  // query rows per streaming CTA

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // [B, H, N_Q] contiguous
  int64_t q_sb, q_sh, q_sn;  // element strides (batch, head, row); unit stride inside a row
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t o_sb, o_sh, o_sn;
  int heads, n_q, n_k;
  float scale_log2;  // softmax scale · log2 e
  // grid decomposition
  int ctas_per_head;   // resident: CTAs sharing one (b, h); streaming: query tiles of 64 rows per (b, h)
  int tiles_per_cta;   // resident: 16-row query tiles per CTA
};

// Shared memory of the resident kernel: K and V rows (N_K rounded up to 16) + one 16-row Q / output staging tile
// per warp. Used by the host for the launch and by the kernel for the carve-up.
template <typename T, int D>
__host__ __device__ constexpr int64_t resident_smem_bytes(int n_k) {
  return (2 * int64_t((n_k + kKeyChunk - 1) / kKeyChunk * kKeyChunk) + kAttnWarps * kRowsPerWarp) *
         Dim<D>::kStride * int64_t(sizeof(T));
}

template <typename T, int D>
__host__ __device__ constexpr int64_t streaming_smem_bytes() {
  return int64_t(kStreamBlockM + 4 * kAttnBlockN) * Dim<D>::kStride * int64_t(sizeof(T));  // Q + 2 stages of K, V
}

// Key mask of the plain attention: keys past N_K score -inf, nothing else is added.
struct KeyTail {
  int key0, n_k;
  __device__ __forceinline__ float operator()(float x, int /*half*/, int key) const {
    return key0 + key < n_k ? x : -INFINITY;
  }
};

// Normalise the warp's 16 query rows row0.. of one head and write them (o: the head's output rows, row stride o_sn)
// and their logsumexp (lse: the head's [N_Q] row); rows >= n_q are skipped. `stage` is the warp's own staging tile.
template <typename T, int D>
__device__ __forceinline__ void write_rows(RowState<D>& st, T* stage, T* o, int64_t o_sn, float* lse, int row0,
                                           int n_q, int lane) {
  float row_lse[2];
  finish_rows<D>(st, row_lse);
  store_rows<T, D>(st, stage, [=](int r) { return row0 + r < n_q ? o + int64_t(row0 + r) * o_sn : nullptr; }, lane);
  if (lane % 4 == 0) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + lane / 4 + 8 * hh;
      if (row < n_q) lse[row] = row_lse[hh];
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinCtasPerSm) attention_fwd_resident_kernel(const AttnParams p) {
  using Di = Dim<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int kv_rows = (p.n_k + kKeyChunk - 1) / kKeyChunk * kKeyChunk;
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + kv_rows * Di::kStride;
  T* qs = vs + kv_rows * Di::kStride + warp * kRowsPerWarp * Di::kStride;  // this warp's staging tile

  const int64_t bh = blockIdx.x / p.ctas_per_head;
  const int split = blockIdx.x % p.ctas_per_head;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* o = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  float* lse = p.lse + bh * p.n_q;

  const int n_tiles = (p.n_q + kRowsPerWarp - 1) / kRowsPerWarp;
  const int tile_begin = split * p.tiles_per_cta;
  const int tile_end = min(tile_begin + p.tiles_per_cta, n_tiles);

  // 1. K, V of the head (all threads) and each warp's first Q tile, one cp.async group; then a CTA barrier, the
  //    only one: from here on warps work independently on K/V, which are read-only.
  load_rows_async<T, D>(ks, k, p.k_sn, kv_rows, p.n_k, tid, kAttnThreads);
  load_rows_async<T, D>(vs, v, p.v_sn, kv_rows, p.n_k, tid, kAttnThreads);
  int tile = tile_begin + warp;
  if (tile < tile_end) {
    load_rows_async<T, D>(qs, q + int64_t(tile) * kRowsPerWarp * p.q_sn, p.q_sn, kRowsPerWarp,
                          p.n_q - tile * kRowsPerWarp, lane, 32);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // 2. each warp: query tiles tile_begin + warp, + kAttnWarps, ... against all keys
  for (; tile < tile_end; tile += kAttnWarps) {
    const int row0 = tile * kRowsPerWarp;
    if (tile != tile_begin + warp) {  // the first tile came with K/V
      load_rows_async<T, D>(qs, q + int64_t(row0) * p.q_sn, p.q_sn, kRowsPerWarp, p.n_q - row0, lane, 32);
      cp_async_commit();
      cp_async_wait_all();
      __syncwarp();
    }
    uint32_t qf[D / 16][4];
    load_q_frags<T, D>(qf, qs, lane);
    RowState<D> st;
    st.init();
    for (int key0 = 0; key0 < p.n_k; key0 += kAttnBlockN) {
      const int chunks = (min(kAttnBlockN, p.n_k - key0) + kKeyChunk - 1) / kKeyChunk;
      attend_block<T, D, kAttnBlockN>(st, qf, ks + key0 * Di::kStride, vs + key0 * Di::kStride, chunks, p.scale_log2,
                                      KeyTail{key0, p.n_k}, lane);
    }
    write_rows<T, D>(st, qs, o, p.o_sn, lse, row0, p.n_q, lane);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads, kAttnMinCtasPerSm) attention_fwd_streaming_kernel(const AttnParams p) {
  using Di = Dim<D>;
  constexpr int kTile = kAttnBlockN * Di::kStride;  // elements of one K or V stage
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* qs = reinterpret_cast<T*>(smem_raw);  // [64][stride]; warp w's rows 16w.. are its staging tile at the end
  T* ks = qs + kStreamBlockM * Di::kStride;  // 2 stages
  T* vs = ks + 2 * kTile;                    // 2 stages

  const int64_t bh = blockIdx.x / p.ctas_per_head;
  const int row0 = (blockIdx.x % p.ctas_per_head) * kStreamBlockM;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* o = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;

  // prologue: Q tile and key block 0
  load_rows_async<T, D>(qs, q + int64_t(row0) * p.q_sn, p.q_sn, kStreamBlockM, p.n_q - row0, tid, kAttnThreads);
  load_rows_async<T, D>(ks, k, p.k_sn, kAttnBlockN, p.n_k, tid, kAttnThreads);
  load_rows_async<T, D>(vs, v, p.v_sn, kAttnBlockN, p.n_k, tid, kAttnThreads);
  cp_async_commit();

  T* q_warp = qs + warp * kRowsPerWarp * Di::kStride;
  uint32_t qf[D / 16][4];
  RowState<D> st;
  st.init();
  const int n_blocks = (p.n_k + kAttnBlockN - 1) / kAttnBlockN;
  for (int j = 0; j < n_blocks; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_blocks) {  // prefetch block j+1 into the other stage (freed by the barrier ending iteration j-1)
      const int next = (j + 1) * kAttnBlockN;
      load_rows_async<T, D>(ks + (stage ^ 1) * kTile, k + int64_t(next) * p.k_sn, p.k_sn, kAttnBlockN,
                            p.n_k - next, tid, kAttnThreads);
      load_rows_async<T, D>(vs + (stage ^ 1) * kTile, v + int64_t(next) * p.v_sn, p.v_sn, kAttnBlockN,
                            p.n_k - next, tid, kAttnThreads);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the prefetch has landed (this thread's copies)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // ... and every other thread's
    if (j == 0) load_q_frags<T, D>(qf, q_warp, lane);
    const int key0 = j * kAttnBlockN;
    const int chunks = (min(kAttnBlockN, p.n_k - key0) + kKeyChunk - 1) / kKeyChunk;
    attend_block<T, D, kAttnBlockN>(st, qf, ks + stage * kTile, vs + stage * kTile, chunks, p.scale_log2,
                                    KeyTail{key0, p.n_k}, lane);
    __syncthreads();  // stage j&1 is overwritten by the prefetch of iteration j+1
  }

  write_rows<T, D>(st, q_warp, o, p.o_sn, p.lse + bh * p.n_q, row0 + warp * kRowsPerWarp, p.n_q, lane);
}

}  // namespace attn
}  // namespace vitkern
