// A whole decode step in one launch, for short rows on sm_90+: page scoring, top-k
// selection and the split-KV attention of flat selection from cached summaries (16-bit
// or e4m3).
//
// Why: a B = 1 step through the separate kernels is three dependent launches (score on
// every SM, select on one CTA a row, attend), and at 8k-64k tokens each phase is mostly
// fixed latency rather than bytes: the one-CTA select, the page list's round trip through
// global memory, and the split merge's fence, counter and partial reloads (NOTES.md
// v11-v18).
//
// How: one thread-block cluster per (sequence, KV head), one CTA per attention split
// (the split plan of the separate path, so the two paths give bitwise the same output).
//   1. CTA r scores the r-th slice of the row's candidate pages into order-preserving
//      keys in its shared memory (the score kernels' arithmetic, so the same scores:
//      score_pages_kernel's for 16-bit summaries, score_e4m3.cuh's tensor-core tiles
//      for e4m3 ones).
//   2. After one cluster barrier every CTA copies the other slices' keys over
//      distributed shared memory and runs the radix select itself (block_radix_threshold
//      and ordered_compact: the selection rules of select_pages_kernel), keeping only
//      the entries of its own split.
//   3. Each CTA attends its split (attend_split, the attention kernel's tile loop) and
//      keeps its normalised partial output in shared memory; after a second cluster
//      barrier the CTAs merge the partials by LSE over distributed shared memory, each
//      a share of the (head, dims) items, and write out and lse.
// Rows of up to kShortMaxPages pages take it, when every row's cluster is resident at
// once (short_step_fits); everything else runs the separate kernels.
#pragma once

#include <cooperative_groups.h>

#include "score_e4m3.cuh"
#include "select_common.cuh"
#include "sparse_decode.cuh"

namespace hydra {

// Rows of up to this many pages (16,384 tokens at 16-token pages) take the fused step: every
// CTA holds, and selects over, all of a row's keys. Measured on an H200 (B = 1, graph
// replay of the whole step, bf16, "high", NOTES.md v19): 8k 25.0 -> 22.0 us, 16k 25.9 ->
// 24.3, D = 256 (16 / 2 heads) at 16k 29.9 -> 26.1, but 32k 28.3 -> 29.4 and 64k 34.1 ->
// 40.3, where one CTA's scoring and radix select over 2,000-4,000 keys cost more than the
// separate kernels spread over the GPU.
inline constexpr int kShortMaxPages = 1024;
inline constexpr int kShortThreads = 128;    // the attention's CTA
inline constexpr int kShortStages = 2;       // pipeline depth: a split holds few tiles here
inline constexpr int kShortMaxCtas = 16;     // the largest (non-portable) cluster on sm_90

template <int D>
struct ShortStepShape {
  using A = DecodeShape<D, kShortStages, true>;
  static constexpr size_t kKeysOffset = A::kPipeBytes;
  static constexpr size_t kPageOffset = kKeysOffset + size_t(kShortMaxPages) * sizeof(uint32_t);
  static constexpr size_t kPartOffset = (kPageOffset + (kMaxEntriesPerSplit + 1) * sizeof(int) + 15) / 16 * 16;
  // The split's partial: 16 heads x D outputs, then 16 log2-sum-exps.
  static constexpr size_t kSmemBytes = kPartOffset + size_t(16) * (D + 1) * sizeof(float);
  static_assert(2048 * sizeof(int) <= A::kPipeBytes, "the select's histogram reuses the pipeline buffers");
  static_assert(kKeysOffset % 16 == 0 && kPartOffset % 16 == 0, "aligned regions");
};

template <int D, typename E>
__global__ void __launch_bounds__(kShortThreads) short_step_kernel(ScoreParams sp, DecodeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using SS = ShortStepShape<D>;
  constexpr int kWarps = kShortThreads / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem_raw + SS::kKeysOffset);  // [n_cand] the row's keys
  int* spage = reinterpret_cast<int*>(smem_raw + SS::kPageOffset);            // [1 + entries] as the attention's
  float* part = reinterpret_cast<float*>(smem_raw + SS::kPartOffset);         // [16][D] outputs, [16] lse2
  int* hist = reinterpret_cast<int*>(smem_raw);                               // the select's, in the pipeline
  __shared__ uint64_t warp_tot[32];  // find_threshold_bin: one a warp; ordered_compact: two a warp
  __shared__ BlockRadixShared rs;
  __shared__ uint32_t s_wmin[kWarps], s_wmax[kWarps];
  __shared__ float sw[2 * D];  // e4m3 scoring: the group's folded query [qneg | qpos]
  __shared__ float s_scale;

  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, warp = tid >> 5;
  pdl_wait();
  const int P = sp.page_size;
  const int L_end = seq_len(sp.seqlens, b, sp.Tkv);
  const int start = seq_start(sp.leftpad, b, L_end);
  const int L = L_end - start;
  const int n_pages_b = (L + P - 1) / P;
  const bool selects = n_pages_b > sp.n_sel;
  const int cand_lo = min(sp.sink_pages, n_pages_b);
  const int cand_hi = max(first_recent_page(L, sp.recent_tokens, P), cand_lo);
  const int n_head = cand_lo, n_cand = cand_hi - cand_lo, n_tail = n_pages_b - cand_hi;
  const int k = sp.n_sel - n_head - n_tail;
  const bool take_all = k >= n_cand;
  const bool ranked = selects && k > 0 && !take_all;  // uniform over the cluster

  const int split_lo = rank * p.entries_per_split;
  const int split_hi = min(split_lo + p.entries_per_split, p.n_entries);
  for (int i = tid; i <= split_hi - split_lo; i += kShortThreads) spage[i] = -1;

  // ---- 1. Score this CTA's slice of the candidates.
  const int per = (n_cand + C - 1) / C;
  const int my_lo = min(rank * per, n_cand), my_hi = min(my_lo + per, n_cand);
  if (ranked && sp.fmt.fp8) {
    // e4m3 summaries: score_pages_e4m3_kernel's tensor-core tiles (score_e4m3.cuh), one
    // 16-page tile a warp at a time (a page's score does not depend on its tile).
    e4m3_fold_query<D, E>(sp, b, h, sw, s_scale);
    const float scale = s_scale;
    uint32_t bfrag[E4m3Shape<D>::kSegs][2][2];
    e4m3_fragments<D>(sw, scale, bfrag);
    const int lo = cand_lo + my_lo, hi = cand_lo + my_hi;
    for (int x0 = lo + warp * 16; x0 < hi; x0 += kWarps * 16) {
      e4m3_score_tiles<D, E, 1>(
          sp, b, h, sw, scale, bfrag, x0, -1, [&](int x) { return x < hi ? x : -1; },
          [&](int, int pg, float s) {
            if (pg >= 0) keys[pg - cand_lo] = order_key(s);
          });
    }
  } else if (ranked) {
    // 16-bit summaries, as score_pages_kernel: D / 8 threads a page, 8 dims each, so the
    // scores are the same floats.
    constexpr int kTpp = D / 8, kPpp = kShortThreads / kTpp, kRounds = 8;
    const int d0 = (tid % kTpp) * 8, grp = tid / kTpp;
    const bf16_t* srow = sp.summaries + b * sp.s_batch_stride + h * sp.s_head_stride + d0;
    float qpos[8], qneg[8];
    for (int base = my_lo; base < my_hi; base += kPpp * kRounds) {
      uint4 mn[kRounds], mx[kRounds];
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        const int c = base + r * kPpp + grp;
        if (c < my_hi) {
          const bf16_t* src = srow + (int64_t)(cand_lo + c) * sp.s_page_stride;
          mn[r] = ldg16(src);
          mx[r] = ldg16(src + D);
        } else {
          mn[r] = make_uint4(0, 0, 0, 0);
          mx[r] = mn[r];
        }
      }
      if (base == my_lo) group_query_bounds<E>(sp, b, h, d0, qpos, qneg);  // while the first loads fly
#pragma unroll
      for (int r = 0; r < kRounds; ++r) {
        float fmn[8], fmx[8];
        unpack8<E>(mn[r], fmn);
        unpack8<E>(mx[r], fmx);
        float acc = 0.f;
#pragma unroll
        for (int d = 0; d < 8; ++d) acc += qpos[d] * fmx[d] + qneg[d] * fmn[d];
        acc = reduce_page<kTpp>(acc);
        const int c = base + r * kPpp + grp;
        if (tid % kTpp == 0 && c < my_hi) keys[c] = order_key(acc);
      }
    }
  }
  cluster.sync();  // every slice's keys are in its CTA's shared memory

  // ---- 2. Every CTA gathers the row's keys and selects; it keeps its split's entries.
  uint32_t prefix = 0u;
  int need_eq = 0;
  if (ranked) {
    uint32_t kmin = 0xffffffffu, kmax = 0u;
    // Only the other slices' keys are stored: this CTA's own slice is being read by the
    // other CTAs meanwhile, so rewriting it (even with the same values) would race.
    constexpr int kU = 8;  // remote loads in flight a thread
    for (int i0 = 0; i0 < n_cand; i0 += kShortThreads * kU) {
      uint32_t v[kU];
      bool remote[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = i0 + u * kShortThreads + tid;
        const int owner = i < n_cand ? i / per : rank;
        remote[u] = owner != rank;
        v[u] = i < n_cand ? (remote[u] ? *cluster.map_shared_rank(keys + i, owner) : keys[i]) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = i0 + u * kShortThreads + tid;
        if (i < n_cand) {
          if (remote[u]) keys[i] = v[u];
          kmin = min(kmin, v[u]);
          kmax = max(kmax, v[u]);
        }
      }
    }
    block_min_max<kWarps>(kmin, kmax, s_wmin, s_wmax);
    block_radix_threshold<kShortThreads>(keys, n_cand, k, kmin, kmax, hist, warp_tot, rs, prefix, need_eq);
  }
  if (selects) {
    // Output order: the n_head sink pages, the chosen candidates in page order, the
    // n_tail recent pages (select_pages_kernel, mode 0); -1 past the chosen ones.
    int base_def = 0, base_eq = 0;
    ordered_compact<kWarps, kSelectItems, true>(
        n_head + n_cand + n_tail, need_eq, base_def, base_eq, warp_tot,
        [&](int i, bool& def, bool& eq) {
          if (i < n_head || i >= n_head + n_cand) {
            def = true;
            return;
          }
          if (k <= 0) return;
          if (take_all) {
            def = true;
            return;
          }
          const uint32_t u = keys[i - n_head];
          def = u > prefix;
          eq = !def && u == prefix;
        },
        [&](int i, int pos) {
          if (pos < split_lo || pos >= split_hi) return;
          spage[pos - split_lo + 1] = i < n_head ? i : i >= n_head + n_cand ? cand_hi + (i - n_head - n_cand) : i;
        });
  } else {  // L <= budget: every page, in order
    for (int i = tid; i < split_hi - split_lo; i += kShortThreads) {
      spage[i + 1] = split_lo + i < n_pages_b ? split_lo + i : -1;
    }
  }
  __syncthreads();

  // ---- 3. Attend this split; merge the cluster's partials over distributed shared memory.
  auto row_token = [&](int e0, int row) -> int {
    const int tok = explicit_row_token(spage, split_lo, split_hi, p.log2_page, P, e0, row);
    return tok < L ? tok : -1;
  };
  const bf16_t* kb = p.k + b * p.k_batch_stride + h * p.k_head_stride + (int64_t)start * p.k_row_stride;
  const bf16_t* vb = p.v + b * p.v_batch_stride + h * p.v_head_stride + (int64_t)start * p.v_row_stride;
  const int ept = kTileTokens >> p.log2_page;
  const int n_tiles = split_hi > split_lo ? (split_hi - split_lo + ept - 1) / ept : 0;
  float* part_lse = part + 16 * D;
  attend_split<D, kShortStages, true, false, E>(p, b, h, kb, vb, split_lo, n_tiles, row_token, smem_raw,
                                   [&](int j, int d, const float4& o_norm, float lse2) {
    *reinterpret_cast<float4*>(part + j * D + d) = o_norm;
    if (d == 0) part_lse[j] = lse2;
  }, false);
  cluster.sync();  // every split's partial is ready

  // Item idx = (head j, dims d..d+3), spread over the cluster's CTAs. The fold is the
  // separate path's last-CTA merge (merge_fold: splits in order, one batch), so the floats agree.
  static_assert(kShortMaxCtas == kMergeBatch, "a cluster's partials are one merge batch");
  const int items = p.group * (D / 4);
  for (int idx = tid * C + rank; idx < items; idx += kShortThreads * C) {
    const int j = idx / (D / 4), d = (idx % (D / 4)) * 4;
    float lv[kMergeBatch];
    float4 ov[kMergeBatch];
#pragma unroll
    for (int r = 0; r < kShortMaxCtas; ++r) {
      if (r < C) {
        const float* rp = cluster.map_shared_rank(part, r);
        lv[r] = rp[16 * D + j];
        ov[r] = *reinterpret_cast<const float4*>(rp + j * D + d);
      } else {
        lv[r] = -INFINITY;
        ov[r] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    float M = -INFINITY, sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    merge_fold(lv, ov, M, sum, acc);
    store_merged<E>(p, b, h * p.group + j, d, M, sum, acc);
  }
  cluster.sync();  // no CTA leaves while another may still read its partial
#endif
}

namespace detail {

// The kernel's attributes, set once a device: its shared memory, the largest carveout,
// and clusters above 8 CTAs (non-portable, allowed on sm_90).
template <int D, typename E>
bool configure_short_step(int dev) {
  static int configured[kMaxDevices] = {};  // 1 failed, 2 done
  return per_device(configured, dev, [](int) {
    auto kernel = short_step_kernel<D, E>;
    bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   int(ShortStepShape<D>::kSmemBytes)) == cudaSuccess;
    ok = ok && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    prefer_max_shared(kernel);
    if (!ok) cudaGetLastError();
    return ok ? 2 : 1;
  }) == 2;
}

// Clusters of C CTAs the device runs at once (asked once a device and cluster size).
template <int D, typename E>
int short_step_resident(int dev, int C) {
  static int cache[kShortMaxCtas + 1][kMaxDevices] = {};  // clusters + 1
  return per_device(cache[C], dev, [C](int d) {
    if (ShortStepShape<D>::kSmemBytes > size_t(max_smem_per_block(d)) || !configure_short_step<D, E>(d)) return 1;
    cudaLaunchAttribute attr[2];
    const cudaLaunchConfig_t cfg = cluster_launch_config(C, dim3(C, 1, 1), dim3(kShortThreads),
                                                         ShortStepShape<D>::kSmemBytes, nullptr, false, attr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, short_step_kernel<D, E>, &cfg) != cudaSuccess) {
      cudaGetLastError();
      clusters = 0;
    }
    return clusters + 1;
  }) - 1;
}

}  // namespace detail

// Whether the fused step runs `rows` rows of n_pages pages in clusters of `splits` CTAs
// (the separate path's split count): sm_90+, rows short enough for every CTA to hold all
// of a row's keys, and every row's cluster resident at once.
template <int D>
bool short_step_fits(int n_pages, int rows, int splits, int dtype) {
  const int dev = current_device();
  if (cc_major(dev) < 9 || n_pages > kShortMaxPages || splits < 1 || splits > kShortMaxCtas) return false;
  return HYDRA_DISPATCH_DTYPE(dtype, E, [&] { return detail::short_step_resident<D, E>(dev, splits) >= rows; });
}

template <int D>
void launch_short_step_dim(const ScoreParams& sp, const DecodeParams& p, cudaStream_t stream) {
  HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
    const int dev = current_device();
    detail::configure_short_step<D, E>(dev);
    cudaLaunchAttribute attr[2];
    const cudaLaunchConfig_t cfg = cluster_launch_config(p.n_splits, dim3(p.n_splits, p.Hkv, p.B),
                                                         dim3(kShortThreads), ShortStepShape<D>::kSmemBytes, stream,
                                                         use_pdl(dev), attr);
    cudaLaunchKernelEx(&cfg, short_step_kernel<D, E>, sp, p);
    check_launch("short_step_kernel");
  });
}

bool short_step_fits_d64(int n_pages, int rows, int splits, int dtype);
bool short_step_fits_d128(int n_pages, int rows, int splits, int dtype);
bool short_step_fits_d256(int n_pages, int rows, int splits, int dtype);
void launch_short_step_d64(const ScoreParams& sp, const DecodeParams& p, cudaStream_t stream);
void launch_short_step_d128(const ScoreParams& sp, const DecodeParams& p, cudaStream_t stream);
void launch_short_step_d256(const ScoreParams& sp, const DecodeParams& p, cudaStream_t stream);

}  // namespace hydra
