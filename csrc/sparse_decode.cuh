// Split-KV sparse decode attention over a page list (or a contiguous page range).
//
// One CTA per (split, KV head, sequence) serves every query head of the GQA
// group, so each selected K/V byte is read once. Tiles of 64 tokens stream
// through a 3-stage cp.async pipeline with 16-byte coalesced loads. Each of the
// 4 warps takes 16 tokens of a tile and runs QK^T and PV on tensor cores
// (mma.sync m16n8k16, bf16 or fp16 in, fp32 accumulate): the group's query heads are the
// 16 rows of the A operand (rows past the group are zero), so one kernel serves
// every group size up to 16. The online softmax is fp32. Each split writes a
// normalised partial output and its log-sum-exp; the last CTA of a head to
// finish merges the splits (a counter per head), so the step needs no extra launch.
// After a selection, the CTAs start pulling the sink and recent rows (which every
// selected list holds) into L2 before they wait for the selection to finish.
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace hydra {

template <int D, int STAGES, bool SWIZZLE = false>
struct DecodeShape {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kRows = 16;                   // MMA rows: query heads of the group
  static constexpr int kStages = STAGES;  // 3, or 2 where shared memory is ~100 KB a block
  static constexpr int kChunksPerRow = D / 8;
  // Shared-memory layout of a K or V tile (off()): rows of kPitch elements. Both keep
  // ldmatrix's 8 row addresses in 8 different bank groups.
  //  - padded (SWIZZLE false): a pitch of D + 8, each row 16 bytes further round the banks;
  //  - swizzled: a pitch of D, and the row's 16-byte chunk c at chunk c ^ (row % 8).
  // Measured on an H100 (NOTES.md v23): the swizzled layout took the fused short step
  // (2 stages, few tiles) 1.1 us faster at 8k, and the separate kernel 0.9 us slower at
  // 131k and 3 us slower at B = 32, so each kernel keeps the layout that measured best.
  static constexpr int kPitch = SWIZZLE ? D : D + 8;
  static constexpr int kTileElems = kTileTokens * kPitch;
  static constexpr int kKSteps = D / 16;             // k-steps of QK^T
  static constexpr int kDTiles = D / 8;              // n-tiles of PV
  // The K/V stages; the cross-warp merge reuses them (a little more than one stage).
  static constexpr size_t kMergeBytes = size_t(kWarps) * kRows * (D + 2) * sizeof(float);
  static constexpr size_t kStageBytes = size_t(kStages) * 2 * kTileElems * sizeof(bf16_t);
  static constexpr size_t kPipeBytes = kStageBytes > kMergeBytes ? kStageBytes : kMergeBytes;
  static constexpr size_t kSmemBytes = kPipeBytes + (kMaxEntriesPerSplit + 1) * sizeof(int);
  static_assert(kTileTokens == kWarps * 16, "each warp owns 16 tokens of a tile");
  static_assert(D % 16 == 0 && kKSteps % 2 == 0, "ldmatrix.x4 covers two k-steps");
  static_assert(kChunksPerRow <= 32 && 32 % kChunksPerRow == 0, "a row's 16-byte vectors fit one warp");
  static constexpr int kRowsPerLoad = 32 / kChunksPerRow;  // rows one warp-wide load instruction covers
  static_assert(kChunksPerRow >= 8, "the swizzle permutes 8 chunks of a row");
  // Element (row, col) of a tile; col is a multiple of 8 wherever a chunk is addressed.
  __device__ static __forceinline__ int off(int row, int col) {
    if constexpr (SWIZZLE) return row * D + (((col >> 3) ^ (row & 7)) << 3);
    return row * kPitch + col;
  }
  // The chunk index of row `row` at c0 + x, where c0 has no bit of x set (c0 from the
  // unrolled loops, x < 4 from the lane): (c0 | x) ^ (row % 8) swizzled, c0 + x padded.
  __device__ static __forceinline__ int chunk(int c0, int x, int row) {
    if constexpr (SWIZZLE) return c0 ^ (x ^ (row & 7));
    return c0 + x;
  }
};

// One split of one (sequence, KV head) row: the tiles of entries [e_first, e_first +
// n_tiles * ept) stream through the cp.async pipeline, every warp runs QK^T, the online
// softmax and PV on its 16 rows of each tile, and the warps merge through shared memory.
// row_token(e0, row) is the token of tile row `row` of the tile starting at entry e0, or
// -1 (padding, a skipped entry, outside the valid range). kb / vb point at the row's first
// valid token. emit(j, d, o, lse2) receives, from the thread that owns it, the normalised
// output of dims d..d+3 of group head j and (the same for every d) its log2-sum-exp.
// Every thread of the block must call it; smem_raw holds S::kPipeBytes. L1: the copies go
// through L1. evict_first: they carry an L2 evict_first policy (a step reads each K/V byte
// once), so that they push out their own lines before rows prefetched into L2. It is a
// run-time flag on purpose: as a template constant, ptxas of CUDA 13.0 mis-encoded the
// hinted copies of the tile loop (an illegal instruction on the H100; NOTES.md v24), and
// the forms that avoid that measured no better (v25).
template <int D, int STAGES, bool SWIZZLE, bool L1, typename E, typename RowToken, typename Emit>
__device__ __forceinline__ void attend_split(const DecodeParams& p, int b, int h, const bf16_t* kb, const bf16_t* vb,
                                             int e_first, int n_tiles, RowToken&& row_token,
                                             unsigned char* smem_raw, Emit&& emit, bool evict_first) {
  using S = DecodeShape<D, STAGES, SWIZZLE>;
  bf16_t* sk = reinterpret_cast<bf16_t*>(smem_raw);              // [kStages][64][kPitch] (S::off)
  bf16_t* sv = sk + S::kStages * S::kTileElems;                   // [kStages][64][kPitch]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ept = kTileTokens >> p.log2_page;  // entries per tile

  // Each warp loads, and later computes on, its own 16 rows of every tile, so the
  // tile loop needs warp barriers only. Lane r < 16 resolves the token of row r;
  // a warp-wide load instruction covers 32 / (D / 8) rows (D / 8 lanes x 16 bytes each).
  const int my_row = warp * 16 + lane % 16;
  const uint64_t pol = evict_first ? l2_evict_first_policy() : 0;
  auto load_tile = [&](int t, int stage) {
    const int tok_mine = row_token(e_first + t * ept, my_row);
    bf16_t* dk = sk + stage * S::kTileElems;
    bf16_t* dv = sv + stage * S::kTileElems;
    const int col = (lane % S::kChunksPerRow) * 8;
#pragma unroll
    for (int j = 0; j < 16 / S::kRowsPerLoad; ++j) {
      const int r = S::kRowsPerLoad * j + lane / S::kChunksPerRow;
      const int tok = __shfl_sync(0xffffffffu, tok_mine, r);
      const int row = warp * 16 + r;
      const int64_t t64 = tok >= 0 ? tok : 0;
      const int bytes = tok >= 0 ? 16 : 0;  // zero-fill rows that are not attended
      if (evict_first) {
        cp_async16<L1, true>(dk + S::off(row, col), kb + t64 * p.k_row_stride + col, bytes, pol);
        cp_async16<L1, true>(dv + S::off(row, col), vb + t64 * p.v_row_stride + col, bytes, pol);
      } else {
        cp_async16<L1, false>(dk + S::off(row, col), kb + t64 * p.k_row_stride + col, bytes);
        cp_async16<L1, false>(dv + S::off(row, col), vb + t64 * p.v_row_stride + col, bytes);
      }
    }
  };
#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    cp_async_commit();
  }

  // Query A-fragments (rows = heads of the group; rows past it are zero), while the first tiles load.
  const int r0 = lane / 4, r1 = lane / 4 + 8, kc = (lane % 4) * 2;
  uint32_t qa[S::kKSteps][4];
  {
    const bf16_t* q0 = p.q + b * p.q_batch_stride + (int64_t)(h * p.group + r0) * p.q_head_stride;
    const bf16_t* q1 = p.q + b * p.q_batch_stride + (int64_t)(h * p.group + r1) * p.q_head_stride;
    const bool live0 = r0 < p.group, live1 = r1 < p.group;
#pragma unroll
    for (int ks = 0; ks < S::kKSteps; ++ks) {
      const int d = ks * 16 + kc;
      qa[ks][0] = live0 ? *reinterpret_cast<const uint32_t*>(q0 + d) : 0u;
      qa[ks][1] = live1 ? *reinterpret_cast<const uint32_t*>(q1 + d) : 0u;
      qa[ks][2] = live0 ? *reinterpret_cast<const uint32_t*>(q0 + d + 8) : 0u;
      qa[ks][3] = live1 ? *reinterpret_cast<const uint32_t*>(q1 + d + 8) : 0u;
    }
  }

  float o[S::kDTiles][4];
#pragma unroll
  for (int n = 0; n < S::kDTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows r0 and r1; l is this lane's share

  // ldmatrix row addresses: lane i addresses row i % 8 of matrix i / 8, so row % 8 == mr.
  const int mi = lane / 8, mr = lane % 8;
  // K, [tokens][dims] matrices along dims: row warp*16 + nt*8 + mr, chunk 2ks + mi (4 | 2ks).
  const int k_base = (warp * 16 + mr) * S::kPitch;
  // V, transposed 2x2 matrices: row warp*16 + (mi%2)*8 + mr, chunk nd + mi/2 (nd even).
  const int v_base = (warp * 16 + (mi % 2) * 8 + mr) * S::kPitch;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + S::kStages - 1 < n_tiles) load_tile(t + S::kStages - 1, (t + S::kStages - 1) % S::kStages);
    cp_async_commit();
    cp_async_wait<S::kStages - 1>();
    __syncwarp();

    const bf16_t* ck = sk + (t % S::kStages) * S::kTileElems;
    const bf16_t* cv = sv + (t % S::kStages) * S::kTileElems;
    const int e0 = e_first + t * ept;

    // S = Q K^T for this warp's 16 tokens: two n-tiles of 8 tokens.
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < S::kKSteps; ks += 2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, ck + k_base + nt * 8 * S::kPitch + S::chunk(2 * ks, mi, mr) * 8);
        mma_16816<E>(s[nt], qa[ks], kf[0], kf[1]);
        mma_16816<E>(s[nt], qa[ks + 1], kf[2], kf[3]);
      }
    }
    // Mask and scale. Columns of this lane: tokens warp*16 + nt*8 + kc + {0, 1}.
    const int tok_mine = row_token(e0, my_row);
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool valid = __shfl_sync(0xffffffffu, tok_mine, nt * 8 + kc + c) >= 0;
        s[nt][c] = valid ? s[nt][c] * p.scale_log2 : -INFINITY;
        s[nt][c + 2] = valid ? s[nt][c + 2] * p.scale_log2 : -INFINITY;
        mx0 = fmaxf(mx0, s[nt][c]);
        mx1 = fmaxf(mx1, s[nt][c + 2]);
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float a0 = safe_exp2_diff(m0, mn0), a1 = safe_exp2_diff(m1, mn1);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        s[nt][c] = safe_exp2_diff(s[nt][c], mn0);
        s[nt][c + 2] = safe_exp2_diff(s[nt][c + 2], mn1);
        ps0 += s[nt][c];
        ps1 += s[nt][c + 2];
      }
    }
    l0 = l0 * a0 + ps0;
    l1 = l1 * a1 + ps1;
    if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {  // the running max rarely moves late on
#pragma unroll
      for (int n = 0; n < S::kDTiles; ++n) {
        o[n][0] *= a0; o[n][1] *= a0;
        o[n][2] *= a1; o[n][3] *= a1;
      }
    }
    // P as the A operand (16 heads x 16 tokens): the accumulator layout of the two
    // n-tiles is exactly the A layout of one k=16 step.
    uint32_t pa[4];
    pa[0] = pack2<E>(s[0][0], s[0][1]);
    pa[1] = pack2<E>(s[0][2], s[0][3]);
    pa[2] = pack2<E>(s[1][0], s[1][1]);
    pa[3] = pack2<E>(s[1][2], s[1][3]);
    // O += P V: 16 n-tiles of 8 dims, V fragments through ldmatrix.trans.
#pragma unroll
    for (int nd = 0; nd < S::kDTiles; nd += 2) {
      uint32_t vf[4];
      ldmatrix_x4_trans(vf, cv + v_base + S::chunk(nd, mi / 2, mr) * 8);
      mma_16816<E>(o[nd], pa, vf[0], vf[1]);
      mma_16816<E>(o[nd + 1], pa, vf[2], vf[3]);
    }
    __syncwarp();  // this warp's rows of the stage just read are refilled next iteration
  }
  cp_async_wait<0>();

  // Row sums: the 4 lanes of a quad hold disjoint columns.
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }

  // Merge warps through shared memory (the pipeline buffers are free now).
  __syncthreads();
  float* red_o = reinterpret_cast<float*>(smem_raw);          // [kWarps][16][D]
  float* red_ml = red_o + S::kWarps * S::kRows * D;           // [kWarps][16][2]
  // Only the group's rows are merged (rows past it hold zero queries' outputs).
  if (r0 < p.group) {
#pragma unroll
    for (int n = 0; n < S::kDTiles; ++n)
      *reinterpret_cast<float2*>(red_o + (warp * S::kRows + r0) * D + n * 8 + kc) = make_float2(o[n][0], o[n][1]);
  }
  if (r1 < p.group) {
#pragma unroll
    for (int n = 0; n < S::kDTiles; ++n)
      *reinterpret_cast<float2*>(red_o + (warp * S::kRows + r1) * D + n * 8 + kc) = make_float2(o[n][2], o[n][3]);
  }
  if (lane % 4 == 0) {
    red_ml[(warp * S::kRows + r0) * 2] = m0;
    red_ml[(warp * S::kRows + r0) * 2 + 1] = l0;
    red_ml[(warp * S::kRows + r1) * 2] = m1;
    red_ml[(warp * S::kRows + r1) * 2 + 1] = l1;
  }
  __syncthreads();

  // Four consecutive dims of one head a thread (one pass at group * D <= 512): the warps'
  // running maxima and sums of that head, then their outputs, each one shared-memory read.
  for (int idx = tid; idx < p.group * (D / 4); idx += S::kThreads) {
    const int j = idx / (D / 4), d = (idx % (D / 4)) * 4;
    float mw[S::kWarps], lw[S::kWarps];
    float4 ow[S::kWarps];
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) {
      mw[w] = red_ml[(w * S::kRows + j) * 2];
      lw[w] = red_ml[(w * S::kRows + j) * 2 + 1];
      ow[w] = *reinterpret_cast<const float4*>(red_o + (w * S::kRows + j) * D + d);
    }
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) M = fmaxf(M, mw[w]);
    float acc_l = 0.f;
    float4 acc_o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) {
      const float a = safe_exp2_diff(mw[w], M);
      acc_l += lw[w] * a;
      acc_o.x += ow[w].x * a; acc_o.y += ow[w].y * a; acc_o.z += ow[w].z * a; acc_o.w += ow[w].w * a;
    }
    const float inv = acc_l > 0.f ? 1.f / acc_l : 0.f;
    const float lse2 = acc_l > 0.f ? M + log2f(acc_l) : -INFINITY;  // log2 domain
    emit(j, d, make_float4(acc_o.x * inv, acc_o.y * inv, acc_o.z * inv, acc_o.w * inv), lse2);
  }
}

// The split merge, shared by the attention kernel's last CTA and the fused short step
// (short_step.cuh), so that both give the same floats: batches of kMergeBatch splits,
// each a (log2-sum-exp, normalised partial of 4 dims) pair, folded in split order into a
// running max M, sum and output.
constexpr int kMergeBatch = 16;

__device__ __forceinline__ void merge_fold(const float (&lv)[kMergeBatch], const float4 (&ov)[kMergeBatch], float& M,
                                           float& sum, float4& acc) {
  float m8 = M;
#pragma unroll
  for (int u = 0; u < kMergeBatch; ++u) m8 = fmaxf(m8, lv[u]);
  const float r = safe_exp2_diff(M, m8);  // rescale what was summed so far
  sum *= r;
  acc.x *= r; acc.y *= r; acc.z *= r; acc.w *= r;
#pragma unroll
  for (int u = 0; u < kMergeBatch; ++u) {
    const float x = safe_exp2_diff(lv[u], m8);
    sum += x;
    acc.x += x * ov[u].x; acc.y += x * ov[u].y; acc.z += x * ov[u].z; acc.w += x * ov[u].w;
  }
  M = m8;
}

// Writes the merged dims d..d+3 of query head hq (and its natural-log LSE when d == 0).
template <typename E>
__device__ __forceinline__ void store_merged(const DecodeParams& p, int b, int hq, int d, float M, float sum,
                                             const float4& acc) {
  constexpr float kLn2 = 0.6931471805599453f;
  if (d == 0) p.lse[(int64_t)b * p.Hq + hq] = sum > 0.f ? (M + log2f(sum)) * kLn2 : -INFINITY;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  bf16_t* dst = p.out + b * p.o_batch_stride + hq * p.o_head_stride + d;
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<E>(acc.x * inv, acc.y * inv), pack2<E>(acc.z * inv, acc.w * inv));
}

// The token of tile row `row` of the tile starting at entry e0, for a split of an
// explicit page list staged as spage[0] = the entry before the split, spage[1 + i] =
// entry split_lo + i; -1 for rows past the split, for unused entries (-1) and for an
// entry repeating the previous one's page (padding of a short list). The caller checks
// the token against the row's valid range.
__device__ __forceinline__ int explicit_row_token(const int* spage, int split_lo, int split_hi, int log2_page,
                                                  int page_size, int e0, int row) {
  const int e = e0 + (row >> log2_page);
  if (e >= split_hi) return -1;
  const int i = e - split_lo;
  const int page = spage[i + 1];
  if (page < 0 || page == spage[i]) return -1;
  return (page << log2_page) + (row & (page_size - 1));
}

// The rows every selected page list holds, the sink pages and the recent window, into L2
// (the attention kernel's l2_prefetch): thread `index` of `count` takes every count-th row.
// Called before pdl_wait(), while the selection still runs: lengths come from the
// selection's inputs (prefetch_seqlens), and nothing read here decides a result, so a
// row prefetched in vain costs only its bytes.
template <int D>
__device__ __forceinline__ void prefetch_forced_rows(const DecodeParams& p, int b, int h, int index, int count) {
  const int L_end = seq_len(p.prefetch_seqlens, b, p.Tkv, p.prefetch_len_add);
  const int start = seq_start(p.leftpad, b, L_end);
  const int L = L_end - start;
  const int sink_hi = min(L, p.prefetch_sink_tokens);
  const int recent_lo = max(sink_hi, first_recent_page(L, p.prefetch_recent_tokens, p.page_size) << p.log2_page);
  const int n_rows = sink_hi + max(0, L - recent_lo);  // no recent window: recent_lo > L
  const bf16_t* k0 = p.k + b * p.k_batch_stride + h * p.k_head_stride + (int64_t)start * p.k_row_stride;
  const bf16_t* v0 = p.v + b * p.v_batch_stride + h * p.v_head_stride + (int64_t)start * p.v_row_stride;
  for (int i = index; i < n_rows; i += count) {
    const int64_t tok = i < sink_hi ? i : recent_lo + (i - sink_hi);
    prefetch_l2_bulk(k0 + tok * p.k_row_stride, D * sizeof(bf16_t));
    prefetch_l2_bulk(v0 + tok * p.v_row_stride, D * sizeof(bf16_t));
  }
}

// L1: the K/V copies go through L1 (launch_decode_stages picks it for long splits).
template <int D, int STAGES, typename E, bool L1>
__global__ void __launch_bounds__(128) sparse_decode_kernel(DecodeParams p) {
  using S = DecodeShape<D, STAGES>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* spage = reinterpret_cast<int*>(smem_raw + S::kPipeBytes);  // [1 + entries]: previous entry, then the split's
  __shared__ int s_last;

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  if (p.l2_prefetch) prefetch_forced_rows<D>(p, b, h, split * S::kThreads + tid, p.n_splits * S::kThreads);
  pdl_wait();
  const bool explicit_pages = p.pages != nullptr;
  const int split_lo = split * p.entries_per_split;
  int split_hi = min(split_lo + p.entries_per_split, p.n_entries);
  // The page list does not depend on the length: stage it first, so that its loads
  // and the length's are in flight together.
  if (explicit_pages) {
    const int* pg = p.pages + b * p.p_batch_stride + h * p.p_head_stride;
    for (int i = tid; i <= split_hi - split_lo; i += S::kThreads) {
      spage[i] = i == 0 ? (split_lo > 0 ? pg[split_lo - 1] : -1) : pg[split_lo + i - 1];
    }
  }
  const int L_end = seq_len(p.seqlens, b, p.Tkv);
  const int start = seq_start(p.leftpad, b, L_end);
  const int L = L_end - start;  // tokens counted from the first valid one
  // Fused append: every kernel of the step has read the old lengths; advance them.
  if (p.lengths_out != nullptr && split == 0 && h == 0 && tid == 0) p.lengths_out[b] = L_end;
  int lo_tok = 0, first_page = 0;
  if (!explicit_pages) {
    if (p.window > 0) lo_tok = max(0, L - p.window);
    first_page = lo_tok >> p.log2_page;
    const int needed = ((L + p.page_size - 1) >> p.log2_page) - first_page;
    split_hi = min(split_hi, needed);
  }
  __syncthreads();

  // Token held by tile row `row` of the tile starting at entry e0, or -1 when the
  // row is padding, a skipped entry, or outside [lo_tok, L).
  auto row_token = [&](int e0, int row) -> int {
    int tok;
    if (explicit_pages) {
      tok = explicit_row_token(spage, split_lo, split_hi, p.log2_page, p.page_size, e0, row);
    } else {
      const int e = e0 + (row >> p.log2_page);
      if (e >= split_hi) return -1;
      tok = ((first_page + e) << p.log2_page) + (row & (p.page_size - 1));
    }
    return (tok >= lo_tok && tok < L) ? tok : -1;  // lo_tok >= 0, so -1 stays -1
  };

  const bf16_t* kb = p.k + b * p.k_batch_stride + h * p.k_head_stride + (int64_t)start * p.k_row_stride;
  const bf16_t* vb = p.v + b * p.v_batch_stride + h * p.v_head_stride + (int64_t)start * p.v_row_stride;
  const int ept = kTileTokens >> p.log2_page;  // entries per tile
  const int n_tiles = split_hi > split_lo ? (split_hi - split_lo + ept - 1) / ept : 0;
  constexpr float kLn2 = 0.6931471805599453f;
  attend_split<D, STAGES, false, L1, E>(p, b, h, kb, vb, split_lo, n_tiles, row_token, smem_raw,
                             [&](int j, int d, const float4& o_norm, float lse2) {
    const int hq = h * p.group + j;
    if (p.n_splits == 1) {
      bf16_t* dst = p.out + b * p.o_batch_stride + hq * p.o_head_stride + d;
      *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<E>(o_norm.x, o_norm.y), pack2<E>(o_norm.z, o_norm.w));
      if (d == 0) p.lse[(int64_t)b * p.Hq + hq] = lse2 * kLn2;
    } else {
      const int64_t row = ((int64_t)b * p.Hq + hq) * p.n_splits + split;
      *reinterpret_cast<float4*>(p.part_o + row * D + d) = o_norm;
      if (d == 0) p.part_lse[row] = lse2;
    }
  }, p.l2_evict_first != 0);
  if (p.n_splits == 1) return;

  // The last split of this head to finish merges all splits by their LSE.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&p.counters[b * p.Hkv + h], 1) == p.n_splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // Each thread merges four consecutive dims of one head: the splits' LSEs and partial
  // outputs are loaded together (16 splits at a time: one L2 round trip at B = 1, where
  // a head has 16 splits), and folded online (running max).
  for (int idx = tid; idx < p.group * (D / 4); idx += S::kThreads) {
    const int j = idx / (D / 4), d = (idx % (D / 4)) * 4;
    const int64_t row0 = ((int64_t)b * p.Hq + h * p.group + j) * p.n_splits;
    float M = -INFINITY, sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int sp0 = 0; sp0 < p.n_splits; sp0 += kMergeBatch) {
      float lv[kMergeBatch];
      float4 ov[kMergeBatch];
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        const bool live = sp0 + u < p.n_splits;
        lv[u] = live ? __ldcg(p.part_lse + row0 + sp0 + u) : -INFINITY;
        ov[u] = live ? __ldcg(reinterpret_cast<const float4*>(p.part_o + (row0 + sp0 + u) * D + d))
                     : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      merge_fold(lv, ov, M, sum, acc);
    }
    store_merged<E>(p, b, h * p.group + j, d, M, sum, acc);
  }
  if (tid == 0) p.counters[b * p.Hkv + h] = 0;  // ready for the next step (and graph replay)
}

// Splits of at least this many tiles copy K/V through L1 (sparse_decode_kernel's L1).
// Long splits are bandwidth-bound, and L1 lets the L2 serve each sector once; short ones
// are latency-bound, and L1 adds latency to every copy. H100, graph step (NOTES.md v23):
// B = 32 at 32k (64 tiles a split) 307 -> 302 us, B = 8 at 131k (16 tiles) 170.1 -> 168.8,
// B = 4 at 131k (8 tiles) 101.5 -> 100.9, but B = 1 at 131k (4 tiles) 44.1 -> 46.2.
constexpr int kL1CopyTiles = 8;

template <int D, int STAGES, typename E, bool L1>
inline void launch_decode_kernel(const DecodeParams& p, cudaStream_t stream, int dev) {
  using S = DecodeShape<D, STAGES>;
  auto kernel = sparse_decode_kernel<D, STAGES, E, L1>;
  static int smem_raised[kMaxDevices] = {};  // raising the limit once per device is enough
  per_device(smem_raised, dev, [&](int) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)S::kSmemBytes);
    prefer_max_shared(kernel);
    return 1;
  });
  dim3 grid(p.n_splits, p.Hkv, p.B);
  // Every copy is evict_first in L2. The L2 prefetch overlaps the selection only where
  // this launch may start before the selection ends (programmatic dependent launch).
  // H100, graph step (NOTES.md v24): B = 8 at 131k 168.8 -> 165.3 us (e4m3 summaries
  // 137.6 -> 134.2), B = 4 at 131k 101.7 -> 98.9, B = 32 at 32k 302.8 -> 301.0, B = 1 at
  // 131k 43.6 -> 42.5. Where nothing is prefetched (B = 1 at 262k and 524k, 16-bit
  // summaries) the run-time hint flag costs 0.3-0.8 us (2.2 us at 262k after a read-only
  // L2 flush); the single-path forms of v25 did not do better overall.
  // HYDRA_L2_PREFETCH=0 turns both off.
  static const bool hints = env_enabled("HYDRA_L2_PREFETCH");
  const bool pdl = use_pdl(dev);
  DecodeParams q = p;
  q.l2_evict_first = hints ? 1 : 0;
  if (!(pdl && hints)) q.l2_prefetch = 0;
  launch_with_pdl(pdl, kernel, grid, dim3(S::kThreads), S::kSmemBytes, stream, q);
  check_launch("sparse_decode_kernel");
}

template <int D, int STAGES, typename E>
inline void launch_decode_stages(const DecodeParams& p, cudaStream_t stream, int dev) {
  // HYDRA_L1_COPY=0 / 1 sends every split's copies through L2 only / through L1.
  static const int forced = env_int("HYDRA_L1_COPY", -1);
  const int tiles = p.entries_per_split / (kTileTokens >> p.log2_page);
  if (forced >= 0 ? forced != 0 : tiles >= kL1CopyTiles) {
    launch_decode_kernel<D, STAGES, E, true>(p, stream, dev);
  } else {
    launch_decode_kernel<D, STAGES, E, false>(p, stream, dev);
  }
}

// The deepest pipeline a block may hold on this device: 3 stages where they fit
// (A100, H100, H200 at D <= 128; H100/H200 at D = 256), else 2, else 1.
template <int D>
inline void launch_sparse_decode_dim(const DecodeParams& p, cudaStream_t stream) {
  const int dev = current_device();
  const size_t limit = size_t(max_smem_per_block(dev));
  if (limit < DecodeShape<D, 1>::kSmemBytes) {
    throw std::runtime_error("hydra: the decode kernel needs " + std::to_string(DecodeShape<D, 1>::kSmemBytes) +
                             " bytes of shared memory per block; this GPU allows " + std::to_string(limit));
  }
  HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
    if (limit >= DecodeShape<D, 3>::kSmemBytes) {
      launch_decode_stages<D, 3, E>(p, stream, dev);
    } else if (limit >= DecodeShape<D, 2>::kSmemBytes) {
      launch_decode_stages<D, 2, E>(p, stream, dev);
    } else {
      launch_decode_stages<D, 1, E>(p, stream, dev);
    }
  });
}

// One translation unit per head dim (sparse_decode_d<D>.cu) instantiates each.
void launch_sparse_decode_d64(const DecodeParams& p, cudaStream_t stream);
void launch_sparse_decode_d128(const DecodeParams& p, cudaStream_t stream);
void launch_sparse_decode_d256(const DecodeParams& p, cudaStream_t stream);

}  // namespace hydra
