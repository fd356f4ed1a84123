// Split-KV sparse decode attention over a page list (or a contiguous page range).
//
// One CTA per (split, KV head, sequence) serves every query head of the GQA
// group, so each selected K/V byte is read once. Tiles of 64 tokens stream
// through a 3-stage cp.async pipeline with 16-byte coalesced loads; scores and
// the online softmax are fp32 on CUDA cores (decode is memory-bound: at G=4 a
// token costs 1,024 FMAs against 512 bytes). Each split writes a normalised
// partial output and its log-sum-exp; the last CTA of a head to finish merges
// the splits (counter per head), so a whole step needs no extra launch.
#include "common.cuh"

namespace hydra {

template <int D, int GMAX>
struct DecodeShape {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  // Dims each thread owns. Its accumulator holds GMAX * kDPT floats, so the
  // slice narrows as the group grows.
  static constexpr int kDPT = GMAX <= 4 ? 16 : 8;
  static constexpr int kTPT = D / kDPT;              // threads sharing one token
  static constexpr int kNCH = kDPT / 8;              // 16-byte chunks per thread per row
  static constexpr int kNTG = kThreads / kTPT;       // token groups per CTA
  static constexpr int kRows = kTileTokens / kNTG;   // rows per token group per tile
  static constexpr int kStages = 3;
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kLoadsPerThread = kTileTokens * kChunksPerRow / kThreads;
  static constexpr int kTileElems = kTileTokens * D;
  static constexpr size_t kPipeBytes = size_t(kStages) * 2 * kTileElems * sizeof(bf16_t);
  static constexpr size_t kSmemBytes = kPipeBytes + (kMaxEntriesPerSplit + 1) * sizeof(int);
  static_assert(kDPT % 8 == 0, "threads own whole 16-byte chunks");
  static_assert(kTPT <= 32 && 32 % kTPT == 0, "a token's threads sit inside one warp");
  static_assert(kTileTokens % kNTG == 0, "tile rows split evenly over token groups");
  static_assert((kTileTokens * kChunksPerRow) % kThreads == 0, "tile loads split evenly");
  static_assert(size_t(kWarps) * GMAX * (D + 2) * sizeof(float) <= kPipeBytes,
                "the cross-warp merge reuses the pipeline buffers");
};

__device__ __forceinline__ float safe_exp2_diff(float a, float m) {
  return a == -INFINITY ? 0.f : exp2f(a - m);
}

template <int D, int GMAX>
__global__ void __launch_bounds__(128) sparse_decode_kernel(DecodeParams p) {
  using S = DecodeShape<D, GMAX>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* sk = reinterpret_cast<bf16_t*>(smem_raw);            // [kStages][64][D]
  bf16_t* sv = sk + S::kStages * S::kTileElems;                 // [kStages][64][D]
  int* spage = reinterpret_cast<int*>(smem_raw + S::kPipeBytes);  // [1 + entries]: previous entry, then the split's
  __shared__ int s_last;

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int L = seq_len(p.seqlens, b, p.Tkv);
  const bool explicit_pages = p.pages != nullptr;
  const int split_lo = split * p.entries_per_split;
  int split_hi = min(split_lo + p.entries_per_split, p.n_entries);
  int lo_tok = 0, first_page = 0;
  if (explicit_pages) {
    const int* pg = p.pages + b * p.p_batch_stride + h * p.p_head_stride;
    for (int i = tid; i <= split_hi - split_lo; i += S::kThreads) {
      spage[i] = i == 0 ? (split_lo > 0 ? pg[split_lo - 1] : -1) : pg[split_lo + i - 1];
    }
  } else {
    if (p.window > 0) lo_tok = max(0, L - p.window);
    first_page = lo_tok >> p.log2_page;
    const int needed = ((L + p.page_size - 1) >> p.log2_page) - first_page;
    split_hi = min(split_hi, needed);
  }
  __syncthreads();

  // Token held by tile row `row` of the tile starting at entry e0, or -1 when the
  // row is padding, a skipped entry, or outside [lo_tok, L).
  auto row_token = [&](int e0, int row) -> int {
    const int e = e0 + (row >> p.log2_page);
    if (e >= split_hi) return -1;
    int page;
    if (explicit_pages) {
      const int i = e - split_lo;
      page = spage[i + 1];
      if (page < 0 || page == spage[i]) return -1;
    } else {
      page = first_page + e;
    }
    const int tok = (page << p.log2_page) + (row & (p.page_size - 1));
    return (tok < L && tok >= lo_tok) ? tok : -1;
  };

  const bf16_t* kb = p.k + b * p.k_batch_stride + h * p.k_head_stride;
  const bf16_t* vb = p.v + b * p.v_batch_stride + h * p.v_head_stride;
  const int ept = kTileTokens >> p.log2_page;  // entries per tile
  const int n_tiles = split_hi > split_lo ? (split_hi - split_lo + ept - 1) / ept : 0;

  auto load_tile = [&](int t, int stage) {
    const int e0 = split_lo + t * ept;
    bf16_t* dk = sk + stage * S::kTileElems;
    bf16_t* dv = sv + stage * S::kTileElems;
#pragma unroll
    for (int j = 0; j < S::kLoadsPerThread; ++j) {
      const int idx = tid + j * S::kThreads;
      const int row = idx / S::kChunksPerRow, col = (idx % S::kChunksPerRow) * 8;
      const int tok = row_token(e0, row);
      const int64_t t64 = tok >= 0 ? tok : 0;
      const int bytes = tok >= 0 ? 16 : 0;  // zero-fill rows that are not attended
      cp_async16(dk + row * D + col, kb + t64 * p.k_row_stride + col, bytes);
      cp_async16(dv + row * D + col, vb + t64 * p.v_row_stride + col, bytes);
    }
  };

  const int tg = tid / S::kTPT;  // token group
  const int lt = tid % S::kTPT;  // lane within the token group: owns chunks lt + kTPT * c

  float q[GMAX][S::kDPT];
#pragma unroll
  for (int j = 0; j < GMAX; ++j) {
    const bool live = j < p.group;
    const bf16_t* qp = p.q + b * p.q_batch_stride + (int64_t)(h * p.group + (live ? j : 0)) * p.q_head_stride;
#pragma unroll
    for (int c = 0; c < S::kNCH; ++c) {
      float f[8];
      unpack8(ldg16(qp + (lt + S::kTPT * c) * 8), f);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[j][c * 8 + e] = live ? f[e] * p.scale_log2 : 0.f;
    }
  }

  float m[GMAX], l[GMAX], o[GMAX][S::kDPT];
#pragma unroll
  for (int j = 0; j < GMAX; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int d = 0; d < S::kDPT; ++d) o[j][d] = 0.f;
  }

#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int t = 0; t < n_tiles; ++t) {
    if (t + S::kStages - 1 < n_tiles) load_tile(t + S::kStages - 1, (t + S::kStages - 1) % S::kStages);
    cp_async_commit();
    cp_async_wait<S::kStages - 1>();
    __syncthreads();

    const bf16_t* ck = sk + (t % S::kStages) * S::kTileElems;
    const bf16_t* cv = sv + (t % S::kStages) * S::kTileElems;
    const int e0 = split_lo + t * ept;

    float s[S::kRows][GMAX];
    bool valid[S::kRows];
#pragma unroll
    for (int i = 0; i < S::kRows; ++i) {
      const int row = tg + S::kNTG * i;
      valid[i] = row_token(e0, row) >= 0;
      float kf[S::kDPT];
#pragma unroll
      for (int c = 0; c < S::kNCH; ++c) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4*>(ck + row * D + (lt + S::kTPT * c) * 8), f);
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[c * 8 + e] = f[e];
      }
#pragma unroll
      for (int j = 0; j < GMAX; ++j) {
        float acc = 0.f;
#pragma unroll
        for (int d = 0; d < S::kDPT; ++d) acc += q[j][d] * kf[d];
        s[i][j] = acc;
      }
    }
#pragma unroll
    for (int off = S::kTPT / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int i = 0; i < S::kRows; ++i) {
#pragma unroll
        for (int j = 0; j < GMAX; ++j) s[i][j] += __shfl_xor_sync(0xffffffffu, s[i][j], off);
      }
    }
#pragma unroll
    for (int j = 0; j < GMAX; ++j) {
      float mt = -INFINITY;
#pragma unroll
      for (int i = 0; i < S::kRows; ++i) mt = valid[i] ? fmaxf(mt, s[i][j]) : mt;
      const float m_new = fmaxf(m[j], mt);
      const float alpha = safe_exp2_diff(m[j], m_new);
      l[j] *= alpha;
#pragma unroll
      for (int d = 0; d < S::kDPT; ++d) o[j][d] *= alpha;
#pragma unroll
      for (int i = 0; i < S::kRows; ++i) {
        const float pij = valid[i] ? exp2f(s[i][j] - m_new) : 0.f;
        s[i][j] = pij;
        l[j] += pij;
      }
      m[j] = m_new;
    }
#pragma unroll
    for (int i = 0; i < S::kRows; ++i) {
      const int row = tg + S::kNTG * i;
#pragma unroll
      for (int c = 0; c < S::kNCH; ++c) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4*>(cv + row * D + (lt + S::kTPT * c) * 8), f);
#pragma unroll
        for (int j = 0; j < GMAX; ++j) {
#pragma unroll
          for (int e = 0; e < 8; ++e) o[j][c * 8 + e] += s[i][j] * f[e];
        }
      }
    }
    __syncthreads();  // the stage just read is refilled next iteration
  }
  cp_async_wait<0>();

  // Merge token groups inside the warp: lanes lt, lt + kTPT, ... own the same dims.
#pragma unroll
  for (int off = S::kTPT; off < 32; off <<= 1) {
#pragma unroll
    for (int j = 0; j < GMAX; ++j) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[j], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[j], off);
      const float M = fmaxf(m[j], m_o);
      const float a = safe_exp2_diff(m[j], M), c = safe_exp2_diff(m_o, M);
      l[j] = l[j] * a + l_o * c;
#pragma unroll
      for (int d = 0; d < S::kDPT; ++d) o[j][d] = o[j][d] * a + __shfl_xor_sync(0xffffffffu, o[j][d], off) * c;
      m[j] = M;
    }
  }

  // Merge warps through shared memory (the pipeline buffers are free now).
  __syncthreads();
  float* red_o = reinterpret_cast<float*>(smem_raw);           // [kWarps][GMAX][D]
  float* red_ml = red_o + S::kWarps * GMAX * D;                // [kWarps][GMAX][2]
  const int warp = tid / 32, lane = tid % 32;
  if (lane < S::kTPT) {
#pragma unroll
    for (int j = 0; j < GMAX; ++j) {
#pragma unroll
      for (int c = 0; c < S::kNCH; ++c) {
#pragma unroll
        for (int e = 0; e < 8; ++e) red_o[(warp * GMAX + j) * D + (lt + S::kTPT * c) * 8 + e] = o[j][c * 8 + e];
      }
      if (lane == 0) {
        red_ml[(warp * GMAX + j) * 2] = m[j];
        red_ml[(warp * GMAX + j) * 2 + 1] = l[j];
      }
    }
  }
  __syncthreads();

  constexpr float kLn2 = 0.6931471805599453f;
  for (int idx = tid; idx < p.group * D; idx += S::kThreads) {
    const int j = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) M = fmaxf(M, red_ml[(w * GMAX + j) * 2]);
    float acc_l = 0.f, acc_o = 0.f;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) {
      const float a = safe_exp2_diff(red_ml[(w * GMAX + j) * 2], M);
      acc_l += red_ml[(w * GMAX + j) * 2 + 1] * a;
      acc_o += red_o[(w * GMAX + j) * D + d] * a;
    }
    const int hq = h * p.group + j;
    const float o_norm = acc_l > 0.f ? acc_o / acc_l : 0.f;
    const float lse2 = acc_l > 0.f ? M + log2f(acc_l) : -INFINITY;  // log2 domain
    if (p.n_splits == 1) {
      p.out[b * p.o_batch_stride + hq * p.o_head_stride + d] = (bf16_t)f2bf(o_norm);
      if (d == 0) p.lse[(int64_t)b * p.Hq + hq] = lse2 * kLn2;
    } else {
      const int64_t row = ((int64_t)b * p.Hq + hq) * p.n_splits + split;
      p.part_o[row * D + d] = o_norm;
      if (d == 0) p.part_lse[row] = lse2;
    }
  }
  if (p.n_splits == 1) return;

  // The last split of this head to finish merges all splits by their LSE.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(&p.counters[b * p.Hkv + h], 1) == p.n_splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int idx = tid; idx < p.group * D; idx += S::kThreads) {
    const int j = idx / D, d = idx % D;
    const int hq = h * p.group + j;
    const int64_t row0 = ((int64_t)b * p.Hq + hq) * p.n_splits;
    float M = -INFINITY;
    for (int sp = 0; sp < p.n_splits; ++sp) M = fmaxf(M, __ldcg(p.part_lse + row0 + sp));
    float wsum = 0.f, acc = 0.f;
#pragma unroll 8
    for (int sp = 0; sp < p.n_splits; ++sp) {
      const float w = safe_exp2_diff(__ldcg(p.part_lse + row0 + sp), M);
      wsum += w;
      acc += w * __ldcg(p.part_o + (row0 + sp) * D + d);
    }
    p.out[b * p.o_batch_stride + hq * p.o_head_stride + d] = (bf16_t)f2bf(wsum > 0.f ? acc / wsum : 0.f);
    if (d == 0) p.lse[(int64_t)b * p.Hq + hq] = wsum > 0.f ? (M + log2f(wsum)) * kLn2 : -INFINITY;
  }
  if (tid == 0) p.counters[b * p.Hkv + h] = 0;  // ready for the next step (and graph replay)
}

void launch_sparse_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.entries_per_split > kMaxEntriesPerSplit) {
    throw std::invalid_argument("hydra: entries_per_split=" + std::to_string(p.entries_per_split) +
                                " exceeds " + std::to_string(kMaxEntriesPerSplit));
  }
  HYDRA_DISPATCH_HEAD_DIM(p.D, kD, [&] {
    HYDRA_DISPATCH_GROUP(p.group, kG, [&] {
      using S = DecodeShape<kD, kG>;
      auto kernel = sparse_decode_kernel<kD, kG>;
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)S::kSmemBytes);
      dim3 grid(p.n_splits, p.Hkv, p.B);
      kernel<<<grid, S::kThreads, S::kSmemBytes, stream>>>(p);
      check_launch("sparse_decode_kernel");
    });
  });
}

}  // namespace hydra
