// Causal prefill: block selection and block-sparse flash attention.
//
// Selection (one CTA per query block, KV head and sequence): the mean query of each of
// the group's heads over the block, folded into one Quest bound per key dimension
// (qpos . kmax + qneg . kmin, the GQA sum of max(q kmin, q kmax)), scored against every
// candidate key block's min/max; a bitwise search finds the k-th largest score and an
// ordered pass writes sinks, the chosen blocks and the local blocks as one ascending
// list (ties to the lower block). Memory: the lists, nbq x budget / 64 per head.
//
// Attention (one CTA per query block, query head and sequence; 4 warps of 16 query
// rows): 64-token K/V tiles stream through a 2- or 3-stage cp.async pipeline into padded
// shared memory; QK^T and PV run on tensor cores (mma.sync m16n8k16 through ldmatrix,
// fp32 accumulate) with an fp32 online softmax in base 2; the tiles on the diagonal
// (and past Tkv, and outside a sliding window) are masked token by token.
#include "common.cuh"
#include "mma.cuh"

namespace hydra {

namespace {

constexpr int kSelThreads = 256;
constexpr int kSelWarps = kSelThreads / 32;
constexpr int kMaxGroup = 16;

__device__ __forceinline__ uint32_t ordered_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int block_sum(int v, int* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  int t = 0;
#pragma unroll
  for (int w = 0; w < kSelWarps; ++w) t += red[w];
  __syncthreads();
  return t;
}

// Exclusive prefix count of `f` over the block (thread order), and the block total.
__device__ __forceinline__ int block_excl_scan(bool f, int* red, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned m = __ballot_sync(0xffffffffu, f);
  const int in_warp = __popc(m & ((1u << lane) - 1u));
  if (lane == 0) red[warp] = __popc(m);
  __syncthreads();
  int before = 0, tot = 0;
#pragma unroll
  for (int w = 0; w < kSelWarps; ++w) {
    const int x = red[w];
    before += w < warp ? x : 0;
    tot += x;
  }
  __syncthreads();
  total = tot;
  return before + in_warp;
}

// Grid (nbq, Hkv, B). Dynamic shared memory: nbk uint32 score keys.
template <int D, typename E>
__global__ void __launch_bounds__(kSelThreads) prefill_select_kernel(PrefillParams p) {
  extern __shared__ uint32_t skey[];
  __shared__ float qm[kMaxGroup * D];
  __shared__ float qpos[D], qneg[D];
  __shared__ int red[kSelWarps];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5, G = p.group;
  const int off = p.Tkv - p.Tq;
  const int r_lo = i * kPrefillBlock, r_hi = min(r_lo + kPrefillBlock, p.Tq);
  const int jd = (off + r_hi - 1) / kPrefillBlock;  // the key block of the block's last query
  int* out = p.blocks + (((int64_t)b * p.Hkv + h) * p.nbq + i) * p.n_list;
  if (jd + 1 <= p.n_list) {  // every block up to the diagonal fits: exact
    for (int e = tid; e < p.n_list; e += kSelThreads) out[e] = e <= jd ? e : -1;
    return;
  }
  const int sinks = min(p.sink_blocks, jd + 1);
  const int loc_lo = max(jd - p.local_back, sinks);  // local blocks: [loc_lo, jd]
  const int cand_lo = sinks, n_cand = loc_lo - sinks;
  const int k_top = p.n_list - sinks - (jd - loc_lo + 1);

  // Mean query of each head of the group over the block's rows, then the bound's
  // per-dimension weights: qpos = sum of positive parts, qneg = sum of negative parts.
  const float inv_rows = 1.f / float(r_hi - r_lo);
  for (int idx = tid; idx < G * D; idx += kSelThreads) {
    const int g = idx / D, d = idx % D;
    const bf16_t* qp = p.q + b * p.q_batch_stride + (int64_t)(h * G + g) * p.q_head_stride + d;
    float acc = 0.f;
    for (int r = r_lo; r < r_hi; ++r) acc += E::lo(qp[(int64_t)r * p.q_row_stride]);
    qm[idx] = acc * inv_rows;
  }
  __syncthreads();
  for (int d = tid; d < D; d += kSelThreads) {
    float pp = 0.f, nn = 0.f;
    for (int g = 0; g < G; ++g) {
      const float x = qm[g * D + d];
      pp += x > 0.f ? x : 0.f;
      nn += x < 0.f ? x : 0.f;
    }
    qpos[d] = pp;
    qneg[d] = nn;
  }
  __syncthreads();

  // Scores of the candidates: one warp per key block.
  const bf16_t* sm = p.summaries + b * p.s_batch_stride + h * p.s_head_stride;
  for (int c = warp; c < n_cand; c += kSelWarps) {
    const bf16_t* blk = sm + (int64_t)(cand_lo + c) * p.s_page_stride;  // min row, then max row
    float acc = 0.f;
#pragma unroll
    for (int d = lane; d < D; d += 32) acc += qpos[d] * E::lo(blk[D + d]) + qneg[d] * E::lo(blk[d]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) skey[c] = ordered_key(acc);
  }
  __syncthreads();

  for (int e = tid; e < sinks; e += kSelThreads) out[e] = e;
  int pos = sinks;
  if (k_top >= n_cand) {
    for (int c = tid; c < n_cand; c += kSelThreads) out[pos + c] = cand_lo + c;
    pos += n_cand;
  } else if (k_top > 0) {
    // The k-th largest key: the largest threshold with at least k keys at or above it.
    uint32_t thr = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t t = thr | (1u << bit);
      int cnt = 0;
      for (int c = tid; c < n_cand; c += kSelThreads) cnt += skey[c] >= t;
      if (block_sum(cnt, red) >= k_top) thr = t;
    }
    int gt = 0;
    for (int c = tid; c < n_cand; c += kSelThreads) gt += skey[c] > thr;
    const int need_eq = k_top - block_sum(gt, red);  // ties at the threshold: lowest blocks first
    int eq_taken = 0;
    for (int base = 0; base < n_cand; base += kSelThreads) {
      const int c = base + tid;
      const uint32_t key = c < n_cand ? skey[c] : 0u;
      const bool is_gt = c < n_cand && key > thr, is_eq = c < n_cand && key == thr;
      int eq_total, take_total;
      const int eq_rank = eq_taken + block_excl_scan(is_eq, red, eq_total);
      const bool take = is_gt || (is_eq && eq_rank < need_eq);
      const int rank = block_excl_scan(take, red, take_total);
      if (take) out[pos + rank] = cand_lo + c;
      eq_taken += eq_total;
      pos += take_total;
    }
  }
  for (int j = loc_lo + tid; j <= jd; j += kSelThreads) out[pos + (j - loc_lo)] = j;
  pos += jd - loc_lo + 1;
  for (int e = pos + tid; e < p.n_list; e += kSelThreads) out[e] = -1;
}

template <int D>
struct PrefillShape {
  static constexpr int kThreads = 128;   // 4 warps of 16 query rows
  static constexpr int kStride = D + 8;  // 16-byte skew: ldmatrix rows hit distinct banks
  static constexpr int kStages = 2;
  static constexpr int kTileElems = kPrefillBlock * kStride;
  static constexpr int kKSteps = D / 16;
  static constexpr int kDTiles = D / 8;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr size_t kSmemBytes = size_t(kStages) * 2 * kTileElems * sizeof(bf16_t);
};

// Grid (Hq, nbq, B), 128 threads: one query head and query block per CTA (odd GQA groups,
// MHA, D = 256). The query heads of one query block are adjacent in launch order, so a
// group's heads read the same K/V tiles from L2; the largest query blocks (the most
// tiles) go first.
template <int D, typename E>
__global__ void __launch_bounds__(128) prefill_attn_kernel(PrefillParams p) {
  using S = PrefillShape<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* sk = reinterpret_cast<bf16_t*>(smem_raw);
  bf16_t* sv = sk + S::kStages * S::kTileElems;
  __shared__ int s_list[kMaxPrefillList];
  __shared__ int s_n;

  const int i = p.nbq - 1 - blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int qh = blockIdx.x, wq = warp;  // the head, and this warp's 16-row slice
  const int h = qh / p.group;
  const int off = p.Tkv - p.Tq;
  const int t0 = i * kPrefillBlock;
  const int q_last = off + min(t0 + kPrefillBlock, p.Tq) - 1;  // position of the block's last query
  const bool list_mode = p.blocks != nullptr;
  int kb_lo = 0;
  if (list_mode) {
    const int* lst = p.blocks + (((int64_t)b * p.Hkv + h) * p.nbq + i) * p.n_list;
    if (tid == 0) s_n = 0;
    __syncthreads();
    for (int e = tid; e < p.n_list; e += S::kThreads) {
      const int j = lst[e];
      s_list[e] = j;
      if (j >= 0) atomicAdd(&s_n, 1);  // entries are ascending with -1 at the end
    }
  } else {
    if (p.window > 0) kb_lo = max(0, off + t0 - p.window + 1) / kPrefillBlock;
    if (tid == 0) s_n = q_last / kPrefillBlock - kb_lo + 1;
  }
  __syncthreads();
  const int n_ent = s_n;

  const bf16_t* kb = p.k + b * p.k_batch_stride + h * p.k_head_stride;
  const bf16_t* vb = p.v + b * p.v_batch_stride + h * p.v_head_stride;
  auto key_block = [&](int e) { return list_mode ? s_list[e] : kb_lo + e; };
  auto load_tile = [&](int e, int stage) {
    const int j0 = key_block(e) * kPrefillBlock;
    bf16_t* dk = sk + stage * S::kTileElems;
    bf16_t* dv = sv + stage * S::kTileElems;
#pragma unroll
    for (int it = 0; it < kPrefillBlock * S::kChunks / S::kThreads; ++it) {
      const int c = tid + it * S::kThreads;
      const int row = c / S::kChunks, col = (c % S::kChunks) * 8;
      const int tok = j0 + row;
      const bool ok = tok < p.Tkv;
      const int64_t t64 = ok ? tok : 0;
      cp_async16(dk + row * S::kStride + col, kb + t64 * p.k_row_stride + col, ok ? 16 : 0);
      cp_async16(dv + row * S::kStride + col, vb + t64 * p.v_row_stride + col, ok ? 16 : 0);
    }
  };
#pragma unroll
  for (int st = 0; st < S::kStages - 1; ++st) {
    if (st < n_ent) load_tile(st, st);
    cp_async_commit();
  }

  // Query A-fragments: this warp's 16 rows (rows past Tq are zero).
  const int r0 = lane / 4, kc = (lane % 4) * 2;
  const int row0 = t0 + wq * 16 + r0, row1 = row0 + 8;
  uint32_t qa[S::kKSteps][4];
  {
    const bf16_t* qb = p.q + b * p.q_batch_stride + (int64_t)qh * p.q_head_stride;
    const bool live0 = row0 < p.Tq, live1 = row1 < p.Tq;
    const bf16_t* q0 = qb + (int64_t)(live0 ? row0 : 0) * p.q_row_stride;
    const bf16_t* q1 = qb + (int64_t)(live1 ? row1 : 0) * p.q_row_stride;
#pragma unroll
    for (int ks = 0; ks < S::kKSteps; ++ks) {
      const int d = ks * 16 + kc;
      qa[ks][0] = live0 ? *reinterpret_cast<const uint32_t*>(q0 + d) : 0u;
      qa[ks][1] = live1 ? *reinterpret_cast<const uint32_t*>(q1 + d) : 0u;
      qa[ks][2] = live0 ? *reinterpret_cast<const uint32_t*>(q0 + d + 8) : 0u;
      qa[ks][3] = live1 ? *reinterpret_cast<const uint32_t*>(q1 + d + 8) : 0u;
    }
  }
  const int qp0 = off + row0, qp1 = off + row1;           // query positions
  const int warp_first = off + t0 + wq * 16;              // this warp's first query position

  float o[S::kDTiles][4];
#pragma unroll
  for (int n = 0; n < S::kDTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  const int mi = lane / 8, mr = lane % 8;

  for (int e = 0; e < n_ent; ++e) {
    __syncthreads();  // every warp is done with the stage the next load overwrites
    if (e + S::kStages - 1 < n_ent) load_tile(e + S::kStages - 1, (e + S::kStages - 1) % S::kStages);
    cp_async_commit();
    cp_async_wait<S::kStages - 1>();
    __syncthreads();
    const bf16_t* ck = sk + (e % S::kStages) * S::kTileElems;
    const bf16_t* cv = sv + (e % S::kStages) * S::kTileElems;
    const int j0 = key_block(e) * kPrefillBlock;

    // The tile in two halves of 32 keys (an online-softmax update each), as in the
    // two-m-tile kernel: fewer live registers (D = 256 keeps its Q fragments in them).
#pragma unroll 1
    for (int hf = 0; hf < 2; ++hf) {
      const int jh = j0 + hf * 32;
      float s[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int ks = 0; ks < S::kKSteps; ks += 2) {
          uint32_t kf[4];
          ldmatrix_x4(kf, ck + (hf * 32 + nt * 8 + mr) * S::kStride + ks * 16 + mi * 8);
          mma_16816<E>(s[nt], qa[ks], kf[0], kf[1]);
          mma_16816<E>(s[nt], qa[ks + 1], kf[2], kf[3]);
        }
      }
      // Token masks only where the half reaches past this warp's first query, past Tkv,
      // or below a sliding window.
      const bool need_mask = jh + 31 > warp_first || jh + 32 > p.Tkv || p.window > 0;
      float mx0 = -INFINITY, mx1 = -INFINITY;  // of the raw scores; the scale > 0 keeps the order
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float x0 = s[nt][c], x1 = s[nt][c + 2];
          if (need_mask) {
            const int kp = jh + nt * 8 + kc + c;
            const bool in = kp < p.Tkv;
            const bool ok0 = in && kp <= qp0 && (p.window <= 0 || kp > qp0 - p.window);
            const bool ok1 = in && kp <= qp1 && (p.window <= 0 || kp > qp1 - p.window);
            x0 = ok0 ? x0 : -INFINITY;
            x1 = ok1 ? x1 : -INFINITY;
          }
          s[nt][c] = x0;
          s[nt][c + 2] = x1;
          mx0 = fmaxf(mx0, x0);
          mx1 = fmaxf(mx1, x1);
        }
      }
#pragma unroll
      for (int o2 = 1; o2 < 4; o2 <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
      }
      // m in scaled log2 units; p = exp2(s * scale - m): one FFMA and one EX2.
      const float mn0 = fmaxf(m0, mx0 * p.scale_log2), mn1 = fmaxf(m1, mx1 * p.scale_log2);
      const float a0 = safe_exp2_diff(m0, mn0), a1 = safe_exp2_diff(m1, mn1);
      m0 = mn0;
      m1 = mn1;
      const float sub0 = mn0 == -INFINITY ? 0.f : mn0, sub1 = mn1 == -INFINITY ? 0.f : mn1;
      float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          s[nt][c] = exp2f(fmaf(s[nt][c], p.scale_log2, -sub0));
          s[nt][c + 2] = exp2f(fmaf(s[nt][c + 2], p.scale_log2, -sub1));
          ps0 += s[nt][c];
          ps1 += s[nt][c + 2];
        }
      }
      l0 = l0 * a0 + ps0;
      l1 = l1 * a1 + ps1;
      if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {  // the running max settles after a few tiles
#pragma unroll
        for (int n = 0; n < S::kDTiles; ++n) {
          o[n][0] *= a0; o[n][1] *= a0;
          o[n][2] *= a1; o[n][3] *= a1;
        }
      }
      // O += P V over the half's 2 k-steps of 16 tokens.
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t pa[4];
        pa[0] = pack2_fast<E>(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2_fast<E>(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2_fast<E>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2_fast<E>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int nd = 0; nd < S::kDTiles; nd += 2) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, cv + (hf * 32 + kk * 16 + (mi % 2) * 8 + mr) * S::kStride + nd * 8 + (mi / 2) * 8);
          mma_16816<E>(o[nd], pa, vf[0], vf[1]);
          mma_16816<E>(o[nd + 1], pa, vf[2], vf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int o2 = 1; o2 < 4; o2 <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o2);
  }
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  constexpr float kLn2 = 0.6931471805599453f;
  bf16_t* ob = p.out + b * p.o_batch_stride + (int64_t)qh * p.o_head_stride;
  if (row0 < p.Tq) {
    bf16_t* orow = ob + (int64_t)row0 * p.o_row_stride;
#pragma unroll
    for (int n = 0; n < S::kDTiles; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + kc) = pack2<E>(o[n][0] * inv0, o[n][1] * inv0);
    if (lane % 4 == 0)
      p.lse[((int64_t)b * p.Hq + qh) * p.Tq + row0] = l0 > 0.f ? (m0 + __log2f(l0)) * kLn2 : -INFINITY;
  }
  if (row1 < p.Tq) {
    bf16_t* orow = ob + (int64_t)row1 * p.o_row_stride;
#pragma unroll
    for (int n = 0; n < S::kDTiles; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + kc) = pack2<E>(o[n][2] * inv1, o[n][3] * inv1);
    if (lane % 4 == 0)
      p.lse[((int64_t)b * p.Hq + qh) * p.Tq + row1] = l1 > 0.f ? (m1 + __log2f(l1)) * kLn2 : -INFINITY;
  }
}

// The same attention with two m-tiles per warp: a warp computes 32 query rows (two
// heads of a GQA group per CTA, 2 warps each), so every K and V fragment it loads from
// shared memory feeds twice the MMAs. Q waits in shared memory and is reloaded per
// k-step (the accumulators of 32 rows leave no registers for it). Grid (Hq / 2, nbq, B).
template <int D>
struct PrefillShape2 {
  static constexpr int kThreads = 128;
  static constexpr int kStride = D + 8;
  static constexpr int kStages = 2;
  static constexpr int kTileElems = kPrefillBlock * kStride;
  static constexpr int kKSteps = D / 16;
  static constexpr int kDTiles = D / 8;
  static constexpr int kChunks = D / 8;
  static constexpr size_t kSmemBytes = (size_t(kStages) * 2 + 2) * kTileElems * sizeof(bf16_t);  // K, V, Q
};

template <int D, typename E>
__global__ void __launch_bounds__(128) prefill_attn_mt2_kernel(PrefillParams p) {
  using S = PrefillShape2<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* sk = reinterpret_cast<bf16_t*>(smem_raw);
  bf16_t* sv = sk + S::kStages * S::kTileElems;
  bf16_t* sq = sv + S::kStages * S::kTileElems;  // [2 heads][64 rows][kStride]
  __shared__ int s_list[kMaxPrefillList];
  __shared__ int s_n;

  const int i = p.nbq - 1 - blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int qh = blockIdx.x * 2 + warp / 2, wq = warp % 2;  // head and 32-row slice
  const int h = blockIdx.x * 2 / p.group;
  const int off = p.Tkv - p.Tq;
  const int t0 = i * kPrefillBlock;
  const int q_last = off + min(t0 + kPrefillBlock, p.Tq) - 1;
  const bool list_mode = p.blocks != nullptr;
  int kb_lo = 0;
  if (list_mode) {
    const int* lst = p.blocks + (((int64_t)b * p.Hkv + h) * p.nbq + i) * p.n_list;
    if (tid == 0) s_n = 0;
    __syncthreads();
    for (int e = tid; e < p.n_list; e += S::kThreads) {
      const int j = lst[e];
      s_list[e] = j;
      if (j >= 0) atomicAdd(&s_n, 1);
    }
  } else {
    if (p.window > 0) kb_lo = max(0, off + t0 - p.window + 1) / kPrefillBlock;
    if (tid == 0) s_n = q_last / kPrefillBlock - kb_lo + 1;
  }
  __syncthreads();
  const int n_ent = s_n;

  const bf16_t* kb = p.k + b * p.k_batch_stride + h * p.k_head_stride;
  const bf16_t* vb = p.v + b * p.v_batch_stride + h * p.v_head_stride;
  auto key_block = [&](int e) { return list_mode ? s_list[e] : kb_lo + e; };
  auto load_tile = [&](int e, int stage) {
    const int j0 = key_block(e) * kPrefillBlock;
    bf16_t* dk = sk + stage * S::kTileElems;
    bf16_t* dv = sv + stage * S::kTileElems;
#pragma unroll
    for (int it = 0; it < kPrefillBlock * S::kChunks / S::kThreads; ++it) {
      const int c = tid + it * S::kThreads;
      const int row = c / S::kChunks, col = (c % S::kChunks) * 8;
      const int tok = j0 + row;
      const bool ok = tok < p.Tkv;
      const int64_t t64 = ok ? tok : 0;
      cp_async16(dk + row * S::kStride + col, kb + t64 * p.k_row_stride + col, ok ? 16 : 0);
      cp_async16(dv + row * S::kStride + col, vb + t64 * p.v_row_stride + col, ok ? 16 : 0);
    }
  };
  // Q of both heads (rows past Tq zero), with the first tile.
#pragma unroll
  for (int it = 0; it < 2 * kPrefillBlock * S::kChunks / S::kThreads; ++it) {
    const int c = tid + it * S::kThreads;
    const int hs = c / (kPrefillBlock * S::kChunks), rc = c % (kPrefillBlock * S::kChunks);
    const int row = rc / S::kChunks, col = (rc % S::kChunks) * 8;
    const int t = t0 + row;
    const bool ok = t < p.Tq;
    const bf16_t* src = p.q + b * p.q_batch_stride + (int64_t)(blockIdx.x * 2 + hs) * p.q_head_stride +
                        (int64_t)(ok ? t : 0) * p.q_row_stride + col;
    cp_async16(sq + (hs * kPrefillBlock + row) * S::kStride + col, src, ok ? 16 : 0);
  }
  if (n_ent > 0) load_tile(0, 0);
  cp_async_commit();

  const int r0 = lane / 4, kc = (lane % 4) * 2;
  const int qrow = (warp / 2) * kPrefillBlock + wq * 32;  // this warp's first row in sq
  const int mi = lane / 8, mr = lane % 8;
  const int row_base = t0 + wq * 32 + r0;  // row of (mt, rr): row_base + mt * 16 + rr * 8
  const int warp_first = off + t0 + wq * 32;

  float o[2][S::kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int n = 0; n < S::kDTiles; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
  float l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  for (int e = 0; e < n_ent; ++e) {
    __syncthreads();
    if (e + 1 < n_ent) load_tile(e + 1, (e + 1) % S::kStages);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16_t* ck = sk + (e % S::kStages) * S::kTileElems;
    const bf16_t* cv = sv + (e % S::kStages) * S::kTileElems;
    const int j0 = key_block(e) * kPrefillBlock;

    // The tile in two halves of 32 keys (an online-softmax update each): the scores of a
    // half take 32 registers, which leaves room for the 32 rows' accumulators.
#pragma unroll 1
    for (int hf = 0; hf < 2; ++hf) {
      const int jh = j0 + hf * 32;
      float s[2][4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < S::kKSteps; ++ks) {
        uint32_t qf[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4(qf[mt], sq + (qrow + mt * 16 + (lane % 16)) * S::kStride + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < 2; ++np) {  // two n-tiles (16 keys) of this k-step per ldmatrix
          uint32_t kf[4];
          ldmatrix_x4(kf, ck + (hf * 32 + np * 16 + (mi / 2) * 8 + mr) * S::kStride + ks * 16 + (mi % 2) * 8);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<E>(s[mt][2 * np], qf[mt], kf[0], kf[1]);
            mma_16816<E>(s[mt][2 * np + 1], qf[mt], kf[2], kf[3]);
          }
        }
      }
      const bool need_mask = jh + 31 > warp_first || jh + 32 > p.Tkv || p.window > 0;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        float mx0 = -INFINITY, mx1 = -INFINITY;  // of the raw scores; the scale > 0 keeps the order
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float x0 = s[mt][nt][c], x1 = s[mt][nt][c + 2];
            if (need_mask) {
              const int kp = jh + nt * 8 + kc + c;
              const int qp0 = off + row_base + mt * 16, qp1 = qp0 + 8;
              const bool in = kp < p.Tkv;
              const bool ok0 = in && kp <= qp0 && (p.window <= 0 || kp > qp0 - p.window);
              const bool ok1 = in && kp <= qp1 && (p.window <= 0 || kp > qp1 - p.window);
              x0 = ok0 ? x0 : -INFINITY;
              x1 = ok1 ? x1 : -INFINITY;
            }
            s[mt][nt][c] = x0;
            s[mt][nt][c + 2] = x1;
            mx0 = fmaxf(mx0, x0);
            mx1 = fmaxf(mx1, x1);
          }
        }
#pragma unroll
        for (int o2 = 1; o2 < 4; o2 <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
        }
        // m is in scaled log2 units; p = exp2(s * scale - m) is one FFMA and one EX2
        // (exp2(-inf) = 0 for masked scores; a row with nothing yet subtracts 0).
        const float mn0 = fmaxf(m[mt][0], mx0 * p.scale_log2), mn1 = fmaxf(m[mt][1], mx1 * p.scale_log2);
        const float a0 = safe_exp2_diff(m[mt][0], mn0), a1 = safe_exp2_diff(m[mt][1], mn1);
        m[mt][0] = mn0;
        m[mt][1] = mn1;
        const float sub0 = mn0 == -INFINITY ? 0.f : mn0, sub1 = mn1 == -INFINITY ? 0.f : mn1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            s[mt][nt][c] = exp2f(fmaf(s[mt][nt][c], p.scale_log2, -sub0));
            s[mt][nt][c + 2] = exp2f(fmaf(s[mt][nt][c + 2], p.scale_log2, -sub1));
            ps0 += s[mt][nt][c];
            ps1 += s[mt][nt][c + 2];
          }
        }
        l[mt][0] = l[mt][0] * a0 + ps0;
        l[mt][1] = l[mt][1] * a1 + ps1;
        if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
          for (int n = 0; n < S::kDTiles; ++n) {
            o[mt][n][0] *= a0; o[mt][n][1] *= a0;
            o[mt][n][2] *= a1; o[mt][n][3] *= a1;
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t pa[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          pa[mt][0] = pack2_fast<E>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][1] = pack2_fast<E>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][2] = pack2_fast<E>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][3] = pack2_fast<E>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int nd = 0; nd < S::kDTiles; nd += 2) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, cv + (hf * 32 + kk * 16 + (mi % 2) * 8 + mr) * S::kStride + nd * 8 + (mi / 2) * 8);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<E>(o[mt][nd], pa[mt], vf[0], vf[1]);
            mma_16816<E>(o[mt][nd + 1], pa[mt], vf[2], vf[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  constexpr float kLn2 = 0.6931471805599453f;
  bf16_t* ob = p.out + b * p.o_batch_stride + (int64_t)qh * p.o_head_stride;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float lr = l[mt][rr];
#pragma unroll
      for (int o2 = 1; o2 < 4; o2 <<= 1) lr += __shfl_xor_sync(0xffffffffu, lr, o2);
      const int row = row_base + mt * 16 + rr * 8;
      if (row >= p.Tq) continue;
      const float inv = lr > 0.f ? 1.f / lr : 0.f;
      bf16_t* orow = ob + (int64_t)row * p.o_row_stride;
#pragma unroll
      for (int n = 0; n < S::kDTiles; ++n)
        *reinterpret_cast<uint32_t*>(orow + n * 8 + kc) = pack2<E>(o[mt][n][2 * rr] * inv, o[mt][n][2 * rr + 1] * inv);
      if (lane % 4 == 0)
        p.lse[((int64_t)b * p.Hq + qh) * p.Tq + row] = lr > 0.f ? (m[mt][rr] + __log2f(lr)) * kLn2 : -INFINITY;
    }
  }
}

}  // namespace

void launch_prefill_select(const PrefillParams& p, cudaStream_t stream) {
  HYDRA_DISPATCH_HEAD_DIM(p.D, kD, [&] {
    HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
      auto kernel = prefill_select_kernel<kD, E>;
      const size_t smem = sizeof(uint32_t) * size_t(p.nbk);
      if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      kernel<<<dim3(p.nbq, p.Hkv, p.B), kSelThreads, smem, stream>>>(p);
      check_launch("prefill_select_kernel");
    });
  });
}

// Which attention kernel: two heads per CTA with two m-tiles per warp for even groups at
// D <= 128; one head per CTA otherwise (odd groups, MHA, and D = 256, whose 32-row
// accumulators would not fit). A template, so that D = 256 never instantiates the former.
// At D = 256 the one-head kernel's Q fragments (64 registers) and accumulators (128) leave
// the compiler short: it spills about 300 bytes per thread to local memory (L1-resident),
// and runs where 2 x 2 x 33 KB tiles fit (A100, H100 and up).
template <int D, typename E>
void launch_prefill_attention_for(const PrefillParams& p, cudaStream_t stream) {
  if constexpr (D <= 128) {
    if (p.group % 2 == 0) {
      auto kernel = prefill_attn_mt2_kernel<D, E>;
      constexpr size_t smem = PrefillShape2<D>::kSmemBytes;
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      kernel<<<dim3(p.Hq / 2, p.nbq, p.B), PrefillShape2<D>::kThreads, smem, stream>>>(p);
      return;
    }
  }
  auto kernel = prefill_attn_kernel<D, E>;
  constexpr size_t smem = PrefillShape<D>::kSmemBytes;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  kernel<<<dim3(p.Hq, p.nbq, p.B), PrefillShape<D>::kThreads, smem, stream>>>(p);
}

void launch_prefill_attention(const PrefillParams& p, cudaStream_t stream) {
  HYDRA_DISPATCH_HEAD_DIM(p.D, kD, [&] {
    HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
      launch_prefill_attention_for<kD, E>(p, stream);
      check_launch("prefill_attn_kernel");
    });
  });
}

}  // namespace hydra
