// Swin shifted-window attention forward kernel, used by csrc/ops/window_attention.cu. Same semantics as the Triton
// kernel (vitkern/kernels/triton/window_attention.py) and the reference (vitkern/ops/window_attention.py):
//
//   one CTA = one (image, window, head). A window has N = wh·ww <= 256 tokens, so its whole Q, K and V (N rounded
//   up to 16 rows) and the head's column of the relative-position-bias table sit in shared memory; each of the 4
//   warps takes 16-row query tiles (tile w, w+4, ...) and runs the online softmax of csrc/ops/attention_mma.cuh over
//   64-key blocks of the window.
//
// Index math, all in-kernel (no roll / pad / partition / reverse / mask tensors in memory). Token t = (r, c) of
// window (wy, wx) sits at (py, px) = (wy·wh + r, wx·ww + c) of the rolled, padded map:
//   timm (pad_first = false): roll the image by -shift, then pad bottom/right:
//       real = py < H && px < W; image position ((py + sh) mod H, (px + sw) mod W);
//   torchvision / HF (pad_first = true): pad, then roll the padded map:
//       (sy, sx) = ((py + sh) mod Hp, (px + sw) mod Wp); real = sy < H && sx < W.
//   Padded (not real) tokens are zeros before the qkv linear, so their q/k/v are qkv_bias (zeros without one); they
//   are attended to, never masked, and their output is never written (their LSE is: the Triton backward reads it).
//   Shift mask (only when a shift is set): regions on the padded size, per axis [0, Lp-w), [Lp-w, Lp-s), [Lp-s, Lp);
//   scores between tokens of different regions get mask_value added (-100 in Swin, or -inf).
//   Relative position bias of (t1, t2): table[(r1-r2+wh-1)·(2ww-1) + (c1-c2+ww-1), head]
//     = table[rel(t1) - rel(t2) + (wh-1)·(2ww-1) + ww-1] with rel(t) = r·(2ww-1) + c precomputed per token.
// Scores in the log2 domain: (q·k)·scale·log2e + table·log2e + mask·log2e, exactly the Triton kernel's sum.
//
// Why mma.sync and not sm_90a wgmma here (a choice from arithmetic, to be checked by the GPU benchmark): a Swin
// (window, head) at ws 7, D 32 reads q, k, v (3·49·32·2 B = 9.4 KB) and writes 3.1 KB for 2·2·64·64·32 = 0.5 MFLOP
// of padded tile work, ~42 FLOP/B; at H100's ~3 TB/s that is ~130 TFLOP/s, a fraction of what mma.sync issues on
// sm_90: at Swin-T's ws 7 the kernel is bound by memory and latency, not by the tensor cores, and wgmma would add
// descriptor and warpgroup constraints (64-row M tiles per warpgroup) without a faster roofline. ws 12 (144 keys)
// has about twice the intensity; if the GPU benchmark shows this kernel compute-bound there, that is the case for
// a wgmma variant (csrc/ops/attention_wgmma.cuh has the building blocks).
#pragma once

#include <cstdint>

#include "ops/attention_mma.cuh"

namespace vitkern {
namespace attn {

constexpr int kWinWarps = 4;
constexpr int kWinThreads = 32 * kWinWarps;
// Register budget per head dim: D = 32 (Swin) >= 4 CTAs per SM (<= 128 registers per thread; small windows, e.g.
// 49 tokens = 17 KB of shared memory, want many CTAs in flight; without a bound ptxas capped it at 96 registers and
// spilled on sm_80), wider heads >= 2 (<= 255 registers; a 128 cap spills from D=64 up).
constexpr int win_min_ctas_per_sm(int d) { return d <= 32 ? 4 : 2; }
constexpr int kWinBlockN = 64;      // keys per online-softmax step
constexpr int kWinMaxTokens = 256;  // window area held on chip (ws 16); keep in sync with MAX_TOKENS in Python

struct WindowParams {
  const void* qkv;       // [B, H, W, 3·C] contiguous, C = heads·D, columns (3, heads, D)
  const void* qkv_bias;  // [3·C] in qkv's dtype, or nullptr
  const float* table;    // [(2wh-1)(2ww-1), heads] fp32 contiguous
  void* out;             // [B, H, W, C] contiguous
  float* lse;            // [B·nW, heads, N] fp32 contiguous
  int H, W, Hp, Wp;      // map and padded map
  int wh, ww, sh, sw;    // window and shift
  int nwx, nw;           // windows per row, per image
  int heads, n, n16, table_size;
  float scale_log2, mask_log2;
  bool has_mask, pad_first;
};

// Shared memory: Q, K, V [n16][D + 8] + the head's table column (fp32, pre-multiplied by log2 e) + 3 ints per token.
template <typename T, int D>
__host__ __device__ constexpr int64_t window_smem_bytes(int n16, int table_size) {
  return 3 * int64_t(n16) * Dim<D>::kStride * int64_t(sizeof(T)) + int64_t(table_size) * 4 + 3 * int64_t(n16) * 4;
}

// Scores of one (query row, key) pair inside the window: bias, shift mask, keys past N.
struct WindowScore {
  const float* table;   // shared, log2 e applied
  const int* tok_rel;   // shared
  const int* tok_reg;   // shared
  int key0, n, rel_off;
  int q_rel[2], q_reg[2];
  bool q_valid[2];
  bool has_mask;
  float mask_log2;
  __device__ __forceinline__ float operator()(float x, int half, int key) const {
    const int kk = key0 + key;
    if (kk >= n) return -INFINITY;
    if (!q_valid[half]) return x;  // padding rows of the last query tile: any finite score, never stored
    x += table[q_rel[half] - tok_rel[kk] + rel_off];
    if (has_mask && q_reg[half] != tok_reg[kk]) x += mask_log2;
    return x;
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kWinThreads, win_min_ctas_per_sm(D)) window_attention_fwd_kernel(const WindowParams p) {
  using Di = Dim<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n = p.n, n16 = p.n16, heads = p.heads;
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + n16 * Di::kStride;
  T* vs = ks + n16 * Di::kStride;
  float* table_s = reinterpret_cast<float*>(vs + n16 * Di::kStride);  // 16-byte aligned: rows are 16-byte multiples
  int* tok_pos = reinterpret_cast<int*>(table_s + p.table_size);      // image row (y·W + x) | -1 padded | -2 past N
  int* tok_rel = tok_pos + n16;
  int* tok_reg = tok_rel + n16;

  const int h = blockIdx.x % heads;
  const int64_t bw = blockIdx.x / heads;  // image · nW + window
  const int win = static_cast<int>(bw % p.nw);
  const int64_t image = bw / p.nw;
  const int64_t C = int64_t(heads) * D;
  const T* qkv = static_cast<const T*>(p.qkv) + image * p.H * p.W * 3 * C;
  const T* bias = static_cast<const T*>(p.qkv_bias);

  // 1. token geometry and the head's bias-table column
  for (int t = tid; t < n16; t += kWinThreads) {
    int pos = -2, rel = 0, reg = 0;
    if (t < n) {
      const int r = t / p.ww, c = t % p.ww;
      const int py = (win / p.nwx) * p.wh + r, px = (win % p.nwx) * p.ww + c;
      bool real;
      int sy, sx;
      if (p.pad_first) {
        sy = (py + p.sh) % p.Hp;
        sx = (px + p.sw) % p.Wp;
        real = sy < p.H && sx < p.W;
      } else {
        sy = (py + p.sh) % p.H;
        sx = (px + p.sw) % p.W;
        real = py < p.H && px < p.W;
      }
      pos = real ? sy * p.W + sx : -1;
      rel = r * (2 * p.ww - 1) + c;
      if (p.has_mask) {
        const int ry = py < p.Hp - p.wh ? 0 : (py < p.Hp - p.sh ? 1 : 2);
        const int rx = px < p.Wp - p.ww ? 0 : (px < p.Wp - p.sw ? 1 : 2);
        reg = ry * 3 + rx;
      }
    }
    tok_pos[t] = pos;
    tok_rel[t] = rel;
    tok_reg[t] = reg;
  }
  for (int i = tid; i < p.table_size; i += kWinThreads) table_s[i] = p.table[int64_t(i) * heads + h] * kLog2e;
  __syncthreads();

  // 2. gather q, k, v rows of the window: real tokens from their image position, padded tokens = qkv_bias (or 0),
  //    rows past N = 0
  for (int i = tid; i < 3 * n16 * Di::kVecs; i += kWinThreads) {
    const int part = i / (n16 * Di::kVecs);  // 0 q, 1 k, 2 v
    const int t = (i / Di::kVecs) % n16, c = i % Di::kVecs;
    T* dst = qs + (int64_t(part) * n16 + t) * Di::kStride + c * 8;
    const int pos = tok_pos[t];
    const int64_t col = part * C + int64_t(h) * D + c * 8;
    if (pos >= 0) {
      cp_async_16(dst, qkv + int64_t(pos) * 3 * C + col, true);
    } else if (pos == -1 && bias != nullptr) {
      cp_async_16(dst, bias + col, true);
    } else {
      cp_async_16(dst, qkv, false);  // zero fill
    }
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // 3. each warp: 16-row query tiles against all keys of the window
  const int rel_off = (p.wh - 1) * (2 * p.ww - 1) + p.ww - 1;
  T* out = static_cast<T*>(p.out) + image * p.H * p.W * C + int64_t(h) * D;
  float* lse = p.lse + (bw * heads + h) * n;
  for (int tile = warp; tile < n16 / kRowsPerWarp; tile += kWinWarps) {
    const int row0 = tile * kRowsPerWarp;
    T* q_tile = qs + row0 * Di::kStride;  // the warp's rows: its output staging tile afterwards
    uint32_t qf[D / 16][4];
    load_q_frags<T, D>(qf, q_tile, lane);
    WindowScore score{table_s, tok_rel, tok_reg, 0, n, rel_off, {}, {}, {}, p.has_mask, p.mask_log2};
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + lane / 4 + 8 * hh;
      score.q_valid[hh] = row < n;
      score.q_rel[hh] = tok_rel[row];
      score.q_reg[hh] = tok_reg[row];
    }
    RowState<D> st;
    st.init();
    for (int key0 = 0; key0 < n; key0 += kWinBlockN) {
      score.key0 = key0;
      const int chunks = (min(kWinBlockN, n16 - key0)) / kKeyChunk;
      attend_block<T, D, kWinBlockN>(st, qf, ks + key0 * Di::kStride, vs + key0 * Di::kStride, chunks, p.scale_log2,
                                     score, lane);
    }
    float row_lse[2];
    finish_rows<D>(st, row_lse);
    store_rows<T, D>(st, q_tile, [=](int r) {
      const int pos = tok_pos[row0 + r];
      return pos >= 0 ? out + int64_t(pos) * C : nullptr;
    }, lane);
    if (lane % 4 == 0) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = row0 + lane / 4 + 8 * hh;
        if (row < n) lse[row] = row_lse[hh];
      }
    }
  }
}

}  // namespace attn
}  // namespace vitkern
