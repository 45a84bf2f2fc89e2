// Tensor-core building blocks shared by the attention forward kernels (csrc/ops/attention.cuh: plain / packed-qkv
// attention; csrc/ops/window_attention.cuh: Swin shifted-window attention).
//
// Everything is warp-level FlashAttention-2: a warp owns 16 query rows, holds its Q tile as mma A-fragments in
// registers, and streams key blocks from shared memory with
//     S = Q Kᵀ (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate)  ->  online softmax in fp32 (exp2, log2 domain)
//     ->  O += P V (P re-packed from the S accumulators straight into A fragments, no shared-memory round trip).
// Operands reach registers through ldmatrix (.trans for V). This runs on sm_80 and sm_90. The sm_90a kernel of
// csrc/ops/attention_wgmma.cuh reuses the softmax (online_softmax, p_fragment, RowState) and the epilogue (write_rows)
// with warpgroup MMAs whose accumulators have the same per-warp fragment layout.
//
// Shared-memory tiles: row-major [rows][D] with a row stride of D + 8 elements. The 16 padding bytes shift
// consecutive rows by 4 banks, so the 8 row addresses of every ldmatrix 8x8 phase hit 8 distinct 16-byte bank
// groups for every supported D (32/64/80/96/128): conflict-free without a swizzle. Rows stay 16-byte aligned for
// cp.async.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), lane = threadIdx.x % 32, g = lane / 4, q = lane % 4:
//   A (16x16, row): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B (16x8, col):  b0 = (k 2q..2q+1, n g), b1 = (k 2q+8.., n g)
//   C (16x8):       c0,c1 = (g, 2q..2q+1), c2,c3 = (g+8, 2q..2q+1)
// so a thread owns query rows g and g+8 of its warp's tile, and the C fragments of S for key tiles 2c and 2c+1
// are exactly the A fragment of P for the 16-key chunk c.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "vitkern attention kernels need sm_80 or newer (mma.sync m16n8k16 bf16, ldmatrix, cp.async)"
#endif

namespace vitkern {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kRowsPerWarp = 16;  // query rows of one warp tile (the mma M)
constexpr int kKeyChunk = 16;     // keys per PV k-step (the mma K); key rows in shared memory are padded to this

// Compile-time facts of one head dim.
template <int D>
struct Dim {
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 (mma K) in [16, 256]");
  static constexpr int kStride = D + 8;  // shared-memory row stride in elements (see the header comment)
  static constexpr int kVecs = D / 8;    // 16-byte vectors per row
  static constexpr int kKSteps = D / 16; // k-steps of Q Kᵀ
  static constexpr int kNTiles = D / 8;  // 8-column tiles of O (always even: V is read two tiles per ldmatrix.x4)
};

// ------------------------------------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i. "memory": it reads shared memory that
// other threads (or cp.async) wrote, so the compiler must not move it across our own shared-memory stores.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr))
               : "memory");
}

// d += a · b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy, asynchronous; valid == false writes 16 zero bytes and reads nothing (src-size 0),
// which is how every tail row / padded token is zero-filled (V rows past N must be 0, not garbage: P = 0 times a
// NaN bit pattern would still be NaN). `src` must be a valid address even when !valid.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// 2^x on the SFU (MUFU.EX2). ex2(-inf) = +0, which is what masked scores need. Denormal results flush to 0: they
// are < 2^-126 relative to the row maximum's 1 and cannot change a row sum that is >= 1.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (lo) in the low 16 bits: the lower column / address
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ------------------------------------------------------------------------------------------------ tiles

// Asynchronously copy `rows` rows of D elements into a shared tile (row stride Dim<D>::kStride); rows >= valid_rows
// are zero-filled. Global row r starts at g + r * row_stride (unit stride inside a row, 16-byte aligned: checked on
// the host). Called by `nthreads` threads with ids `tid`; the caller commits / waits.
template <typename T, int D>
__device__ __forceinline__ void load_rows_async(T* smem, const T* g, int64_t row_stride, int rows, int valid_rows,
                                                int tid, int nthreads) {
  using Di = Dim<D>;
  for (int i = tid; i < rows * Di::kVecs; i += nthreads) {
    const int r = i / Di::kVecs, c = i % Di::kVecs;
    const bool ok = r < valid_rows;
    cp_async_16(smem + r * Di::kStride + c * 8, ok ? g + r * row_stride + c * 8 : g, ok);
  }
}

// The warp's 16 query rows (shared tile at `qs`) as A fragments for the D/16 k-steps of Q Kᵀ.
// Lane l addresses row l % 16, column half l / 16: matrices 0..3 = (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15),
// (8-15, 8-15) = a0..a3.
template <typename T, int D>
__device__ __forceinline__ void load_q_frags(uint32_t (&qf)[D / 16][4], const T* qs, int lane) {
  using Di = Dim<D>;
#pragma unroll
  for (int kk = 0; kk < Di::kKSteps; ++kk) ldmatrix_x4(qf[kk], qs + (lane % 16) * Di::kStride + kk * 16 + (lane / 16) * 8);
}

// ------------------------------------------------------------------------------------------------ online softmax

// Running state of one warp's 16 query rows; this thread holds rows g = lane/4 (index 0) and g + 8 (index 1).
template <int D>
struct RowState {
  float o[D / 8][4];  // unnormalised output, C-fragment layout per 8-column tile
  float m[2];         // running row max of the log2-domain scores (-inf before the first key)
  float l[2];         // this thread's share of the row sum of exp2(s - m) (summed over the quad in finish())

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[t][i] = 0.f;
    }
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
  }
};

// The online-softmax step of one key block, shared by the mma.sync and wgmma kernels. s[t][i] holds the raw scores
// of 8-key tile t in C-fragment layout (rows g / g+8 of the warp's 16, keys 8t + 2q + (i & 1)); tiles of 16-key chunks
// >= `chunks` score -inf. On return s holds P = exp2(score - new max) (fp32, unnormalised), st.m / st.l are updated
// and st.o is rescaled by exp2(old max - new max). `score` as in attend_block.
template <int D, int kTiles, typename ScoreFn>
__device__ __forceinline__ void online_softmax(RowState<D>& st, float (&s)[kTiles][4], int chunks, float scale_log2,
                                               ScoreFn&& score, int lane) {
  using Di = Dim<D>;
  // scale, bias/mask, and the new running max (a row's 4 owners are the lanes of one quad: xor 1, 2)
  float mx[2] = {st.m[0], st.m[1]};
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = t * 8 + (lane % 4) * 2 + (i & 1);
      s[t][i] = (t / 2 < chunks) ? score(s[t][i] * scale_log2, i >> 1, key) : -INFINITY;
      mx[i >> 1] = fmaxf(mx[i >> 1], s[t][i]);
    }
  }
  float base[2], alpha[2], rowsum[2] = {0.f, 0.f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    base[h] = mx[h] == -INFINITY ? 0.f : mx[h];  // a row with no finite score yet: keep exp2 away from -inf - -inf
    alpha[h] = exp2_approx(st.m[h] - base[h]);   // 0 on the first block (m = -inf)
    st.m[h] = mx[h];
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[t][i] = exp2_approx(s[t][i] - base[i >> 1]);
      rowsum[i >> 1] += s[t][i];
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) st.l[h] = st.l[h] * alpha[h] + rowsum[h];
#pragma unroll
  for (int t = 0; t < Di::kNTiles; ++t) {
    st.o[t][0] *= alpha[0];
    st.o[t][1] *= alpha[0];
    st.o[t][2] *= alpha[1];
    st.o[t][3] *= alpha[1];
  }
}

// P of 16-key chunk c as an A fragment (m16n8k16 and, per warp, wgmma m64nNk16): the C fragments of 8-key tiles 2c
// and 2c+1, rounded to T (as the Triton kernel does; the row sums are of the unrounded fp32 values).
template <typename T, int kTiles>
__device__ __forceinline__ void p_fragment(uint32_t (&a)[4], const float (&s)[kTiles][4], int c) {
  a[0] = pack2<T>(s[2 * c][0], s[2 * c][1]);
  a[1] = pack2<T>(s[2 * c][2], s[2 * c][3]);
  a[2] = pack2<T>(s[2 * c + 1][0], s[2 * c + 1][1]);
  a[3] = pack2<T>(s[2 * c + 1][2], s[2 * c + 1][3]);
}

// One key block of up to kBlockN keys: shared tiles `ks`/`vs` hold its rows (row stride Dim<D>::kStride). Only the
// first `chunks` 16-key chunks are read (rows past them may not exist: the caller sizes shared memory to the keys
// rounded up to 16); keys of later chunks get score -inf. `score(x, half, key)` turns the scaled log2-domain score
// x of (row g + 8*half of the warp tile, key `key` of the block) into the final one: it masks keys past the
// sequence (-inf) and adds biases / masks (already multiplied by log2 e).
template <typename T, int D, int kBlockN, typename ScoreFn>
__device__ __forceinline__ void attend_block(RowState<D>& st, const uint32_t (&qf)[D / 16][4], const T* ks,
                                             const T* vs, int chunks, float scale_log2, ScoreFn&& score, int lane) {
  using Di = Dim<D>;
  constexpr int kChunks = kBlockN / kKeyChunk;
  static_assert(kBlockN % kKeyChunk == 0, "key blocks are whole 16-key chunks");
  float s[2 * kChunks][4];
#pragma unroll
  for (int t = 0; t < 2 * kChunks; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) s[t][i] = 0.f;
  }

  // S = Q Kᵀ. K is stored [key][d], which is the col-major B operand: plain ldmatrix. Lane l addresses key row
  // 16c + 8*(l/16) + l%8, column half (l/8)%2: matrices = (b0, b1) of key tile 2c, then of key tile 2c+1.
  // k-steps outermost so consecutive mmas go to independent accumulators.
#pragma unroll
  for (int kk = 0; kk < Di::kKSteps; ++kk) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (c < chunks) {  // warp-uniform
        uint32_t b[4];
        ldmatrix_x4(b, ks + (c * 16 + (lane / 16) * 8 + lane % 8) * Di::kStride + kk * 16 + ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * c], qf[kk], b[0], b[1]);
        mma_16816<T>(s[2 * c + 1], qf[kk], b[2], b[3]);
      }
    }
  }

  online_softmax<D, 2 * kChunks>(st, s, chunks, scale_log2, score, lane);

  // O += P V. P is the A operand straight from the S accumulators (p_fragment). V is stored [key][d] = row-major
  // B: ldmatrix.trans. Lane l addresses key row 16c + 8*((l/8)%2) + l%8, column half l/16: matrices = (b0, b1) of
  // d tile 2p, then of 2p+1.
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (c < chunks) {
      uint32_t a[4];
      p_fragment<T>(a, s, c);
#pragma unroll
      for (int p = 0; p < Di::kNTiles / 2; ++p) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vs + (c * 16 + ((lane / 8) % 2) * 8 + lane % 8) * Di::kStride + p * 16 + (lane / 16) * 8);
        mma_16816<T>(st.o[2 * p], a, b[0], b[1]);
        mma_16816<T>(st.o[2 * p + 1], a, b[2], b[3]);
      }
    }
  }
}

// Normalise O by the row sums and return the natural-log logsumexp of each of the thread's two rows' scaled scores
// (the Triton kernels' LSE: (m + log2 l) · ln 2). Every row has >= 1 finite score, so l >= 1.
template <int D>
__device__ __forceinline__ void finish_rows(RowState<D>& st, float (&lse)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = st.l[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    lse[h] = (st.m[h] + log2f(l)) * kLn2;
    const float inv = 1.f / l;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      st.o[t][2 * h] *= inv;
      st.o[t][2 * h + 1] *= inv;
    }
  }
}

// Write the warp's normalised 16 x D output tile: C fragments -> the warp's own shared staging tile `stage` (16 rows,
// stride Dim<D>::kStride; free once the Q fragments are in registers) -> 16-byte stores of whole rows.
// row_ptr(r) gives the global address of tile row r, or nullptr for rows that must not be written.
template <typename T, int D, typename RowPtr>
__device__ __forceinline__ void store_rows(const RowState<D>& st, T* stage, RowPtr&& row_ptr, int lane) {
  using Di = Dim<D>;
  const int g = lane / 4, col = (lane % 4) * 2;
  __syncwarp();  // every lane is done reading `stage` (Q fragments) before it is overwritten
#pragma unroll
  for (int t = 0; t < Di::kNTiles; ++t) {
    *reinterpret_cast<uint32_t*>(stage + g * Di::kStride + t * 8 + col) = pack2<T>(st.o[t][0], st.o[t][1]);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * Di::kStride + t * 8 + col) = pack2<T>(st.o[t][2], st.o[t][3]);
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < kRowsPerWarp * Di::kVecs; i += 32) {
    const int r = i / Di::kVecs, c = i % Di::kVecs;
    T* dst = row_ptr(r);
    if (dst != nullptr) {
      *reinterpret_cast<uint4*>(dst + c * 8) = *reinterpret_cast<const uint4*>(stage + r * Di::kStride + c * 8);
    }
  }
  __syncwarp();  // `stage` may be refilled (next Q tile) only after every lane has read it
}

}  // namespace attn
}  // namespace vitkern
