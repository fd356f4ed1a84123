// Scoring and top-k page selection in one launch, for flat selection from cached page
// summaries on sm_90+ (H100, H200, RTX PRO 6000 Blackwell, ...). The separate kernels of
// score_select.cu stay for every other case (older GPUs, the stateless path,
// coarse-to-fine) and compute the same pages.
//
// Why: at B = 1 the two-kernel path spends most of its time outside the bytes. The
// select kernel is one CTA per (sequence, KV head), so one SM ranks all of a row's
// pages (8,192 keys at 131k tokens: ~10 us on an H200, 24 us at 524k), and scores go
// through global memory between two launches.
//
// How: a thread-block cluster of C CTAs per (sequence, KV head) (8 to 16, the most whose
// clusters all run at once: plan_score_select_cluster). CTA r
// scores the r-th contiguous slice of the candidate pages (summaries streamed through a
// 4-stage pipeline of bulk copies) into order-preserving keys in its own shared memory. The
// cluster then runs the radix select together over distributed shared memory: each
// pass builds a histogram per CTA, CTA r sums bins [r * 2048 / C, (r + 1) * 2048 / C)
// over the cluster, and every CTA reads the summed histogram back and finds the same
// threshold bin. A threshold bin of at most 32 keys is gathered in CTA 0 and ranked
// exactly. The ordered output (sinks, chosen candidates in page order, recent pages)
// comes from each CTA's counts of keys above and equal to the threshold, exchanged once.
// Selection rules, ties included, are those of select_pages_kernel.
//
// e4m3 summaries are scored by score_pages_e4m3_kernel (all SMs, tensor cores); for their
// long rows the cluster then runs the selection alone (FROM_SCORES), reading each slice's
// scores from global memory instead of scoring summaries.
#include <cooperative_groups.h>

#include "select_common.cuh"

namespace hydra {

inline constexpr int kClusterCtas = 8;      // CTAs per (sequence, KV head); portable cluster size
inline constexpr int kClusterMinPages = 16384;  // shortest row (pages) that takes the fused kernel
inline constexpr int kCsThreads = 256;
inline constexpr int kCsWarps = kCsThreads / 32;
inline constexpr int kCsStageBytes = 32768;  // summaries per pipeline stage
inline constexpr int kCsStages = 4;
inline constexpr size_t kCsPipeBytes = size_t(kCsStages) * kCsStageBytes;
inline constexpr int kCsBins = 2048;         // radix bins a pass (11 bits)
inline constexpr size_t kCsHistBytes = 3 * kCsBins * sizeof(int);  // the select's three histograms
static_assert(kCsHistBytes <= kCsPipeBytes, "the select's histograms reuse the pipeline buffers");

namespace {

// Each thread scores 32 dimensions of one page (4 chunks of 8 min and 8 max values), so
// a page takes D / 32 threads and a stage of kCsThreads * 32 / D pages is one pass (32 KB
// of summaries for every D). Four independent partial sums per thread keep the FMA
// chains short: the CTA has only 8 warps to hide latency with.
template <int D>
struct ClusterScoreShape {
  static constexpr int kDimsPerThread = 32;
  static constexpr int kChunks = kDimsPerThread / 8;
  static constexpr int kThreadsPerPage = D / kDimsPerThread;
  static constexpr int kPagesPerStage = kCsThreads / kThreadsPerPage;
  static_assert(kPagesPerStage * 4 * D == kCsStageBytes, "a stage is one pass");
  static_assert(kThreadsPerPage >= 1 && kThreadsPerPage <= 32, "a page's threads must sit inside one warp");
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// Hopper bulk copies (TMA, no tensor map): global -> shared, completion counted in bytes
// on an mbarrier. One instruction moves a whole stage, so an SM keeps far more bytes in
// flight than 16-byte cp.async requests allow (those measured ~26 GB/s per SM here).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      " .reg .pred done;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
#endif

}  // namespace

// FROM_SCORES: the slice's keys come from scores already in global memory (written by a
// score kernel launched just before: e4m3 summaries), so only the selection runs here.
template <int D, typename E, bool FROM_SCORES, int C>
__global__ void __launch_bounds__(kCsThreads, 1) score_select_cluster_kernel(ScoreParams sp, SelectParams se,
                                                                              int keys_cap) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using S = ClusterScoreShape<D>;
  static_assert(C >= 2 && C <= 16, "cluster sizes 2 to 16 (one lane a CTA in the exchanges)");
  // CTA r owns bins [r * kCsBins / C, (r + 1) * kCsBins / C); bin j belongs to CTA
  // ((j + 1) * C - 1) / kCsBins (C need not divide kCsBins).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* pipe = reinterpret_cast<bf16_t*>(smem_raw);                          // [stages][pages][2][D]
  uint32_t* skeys = reinterpret_cast<uint32_t*>(smem_raw + (FROM_SCORES ? kCsHistBytes : kCsPipeBytes));  // [keys_cap]
  int* hist = reinterpret_cast<int*>(smem_raw);                                // after scoring: [kCsBins] own counts
  int* red = hist + kCsBins;                                                   // [kCsBins] cluster sums of owned bins
  int* full = red + kCsBins;                                                   // [kCsBins] the cluster histogram
  __shared__ uint32_t s_mm[2], s_wmin[kCsWarps], s_wmax[kCsWarps];
  __shared__ uint64_t warp_tot[32];
  __shared__ int s_list_n, s_bin, s_above, s_need, s_cnt[2], s_base[4];
  __shared__ uint32_t s_list[32], s_thr;
  __shared__ __align__(8) uint64_t s_bar[kCsStages];  // one per pipeline stage

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  pdl_wait();
  pdl_launch_dependents();  // the attention's CTAs may be placed while the cluster selects
  if (tid == 0) {
    s_list_n = 0;
    for (int i = 0; i < kCsStages; ++i) mbar_init(&s_bar[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int P = se.page_size;
  const int L_raw = sp.seqlens != nullptr ? sp.seqlens[b] : sp.Tkv;  // read once: the old length
  const int L_end = min(max(L_raw + sp.len_add, 0), sp.Tkv);
  const int L = L_end - seq_start(sp.leftpad, b, L_end);
  const int n_pages_b = (L + P - 1) / P;
  int* out = se.pages + ((int64_t)b * se.Hkv + h) * se.n_out;
  if (rank == 0 && tid == 0) {
    if (se.counters != nullptr) se.counters[b * se.Hkv + h] = 0;
    if (se.lens_out != nullptr && h == 0) se.lens_out[b] = L_end;
  }
  // Fused append (HydraKVCache.step): the last warp of CTA 0 writes the token while the
  // others score; scoring folds the token into its page's bound (see append_one_token).
  if (!FROM_SCORES && sp.append.k_src != nullptr && rank == 0 && warp == kCsWarps - 1) {
    append_one_token<E, false>(sp.append, L_raw, b, h, lane);  // 16-bit summaries only
  }
  if (n_pages_b <= se.n_sel) {  // every page is attended (the whole cluster takes this branch)
    if (rank == 0) {
      for (int i = tid; i < se.n_out; i += kCsThreads) out[i] = i < n_pages_b ? i : -1;
    }
    return;
  }
  const int cand_lo = min(se.sink_pages, n_pages_b);
  const int cand_hi = max(first_recent_page(L, se.recent_tokens, P), cand_lo);
  const int n_head = cand_lo, n_cand = cand_hi - cand_lo, n_tail = n_pages_b - cand_hi;
  const int k = se.n_sel - n_head - n_tail;
  const bool take_all = k >= n_cand;
  const bool ranked = k > 0 && !take_all;  // otherwise no score is needed
  const int per = (n_cand + C - 1) / C;
  const int my_lo = cand_lo + min(rank * per, n_cand);
  const int my_hi = cand_lo + min((rank + 1) * per, n_cand);
  const int n_mine = my_hi - my_lo;

  // ---- Scoring: this slice's pages -> keys in shared memory.
  uint32_t kmin = 0xffffffffu, kmax = 0u;
  if (FROM_SCORES && ranked) {
    // 16 loads in flight a thread (the scores are in L2: the score kernel just wrote them).
    const float* sc = se.scores + ((int64_t)b * se.Hkv + h) * se.n_scores + my_lo;
    constexpr int kU = 16;
    for (int base = 0; base < n_mine; base += kCsThreads * kU) {
      float v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kCsThreads + tid;
        v[u] = i < n_mine ? __ldcg(sc + i) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kCsThreads + tid;
        if (i < n_mine) {
          const uint32_t key = order_key(v[u]);
          skeys[i] = key;
          kmin = min(kmin, key);
          kmax = max(kmax, key);
        }
      }
    }
  }
  if (!FROM_SCORES && ranked) {
    const bf16_t* sbase = sp.summaries + b * sp.s_batch_stride + h * sp.s_head_stride;
    const int n_st = (n_mine + S::kPagesPerStage - 1) / S::kPagesPerStage;
    const bool dense = sp.s_page_stride == 2 * D;  // the slice is one contiguous run
    // Warp 0 fills stage st (buffer st % kCsStages) with one bulk copy, or one per page.
    auto load_stage = [&](int st) {
      const int buf = st % kCsStages;
      bf16_t* dst = pipe + buf * (S::kPagesPerStage * 2 * D);
      const int p0 = my_lo + st * S::kPagesPerStage;
      const int np = min(S::kPagesPerStage, my_hi - p0);
      if (lane == 0) mbar_arrive_expect_tx(&s_bar[buf], uint32_t(np) * 4 * D);
      __syncwarp();
      if (dense) {
        if (lane == 0) bulk_load(dst, sbase + (int64_t)p0 * 2 * D, uint32_t(np) * 4 * D, &s_bar[buf]);
      } else {
        for (int i = lane; i < np; i += 32) {
          bulk_load(dst + i * 2 * D, sbase + (int64_t)(p0 + i) * sp.s_page_stride, 4 * D, &s_bar[buf]);
        }
      }
    };
    if (warp == 0) {
      for (int st = 0; st < kCsStages - 1 && st < n_st; ++st) load_stage(st);
    }
    const int d0 = (tid % S::kThreadsPerPage) * S::kDimsPerThread;
    float qpos[S::kChunks][8], qneg[S::kChunks][8];
#pragma unroll
    for (int c = 0; c < S::kChunks; ++c) group_query_bounds<E>(sp, b, h, d0 + 8 * c, qpos[c], qneg[c]);
    const int append_page = sp.k_new != nullptr && L_raw >= 0 && L_raw < sp.Tkv ? L_raw / P : -1;
    const int pg = tid / S::kThreadsPerPage;  // this thread's page in every stage
    for (int st = 0; st < n_st; ++st) {
      // The buffer refilled here held stage st - 1, which every thread finished reading
      // before the barrier that ended the previous iteration.
      if (warp == 0 && st + kCsStages - 1 < n_st) load_stage(st + kCsStages - 1);
      mbar_wait(&s_bar[st % kCsStages], (st / kCsStages) & 1);
      const bf16_t* src = pipe + (st % kCsStages) * (S::kPagesPerStage * 2 * D) + pg * 2 * D + d0;
      const int page = my_lo + st * S::kPagesPerStage + pg;
      uint4 umn[S::kChunks], umx[S::kChunks];
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        umn[c] = *reinterpret_cast<const uint4*>(src + 8 * c);
        umx[c] = *reinterpret_cast<const uint4*>(src + D + 8 * c);
      }
      float part[S::kChunks];
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) {
        float fmn[8], fmx[8];
        unpack8<E>(umn[c], fmn);
        unpack8<E>(umx[c], fmx);
        if (page == append_page) {
          float f[8];
          unpack8<E>(ldg16(sp.k_new + b * sp.kn_batch_stride + h * sp.kn_head_stride + d0 + 8 * c), f);
#pragma unroll
          for (int d = 0; d < 8; ++d) { fmn[d] = fminf(fmn[d], f[d]); fmx[d] = fmaxf(fmx[d], f[d]); }
        }
        float a = 0.f;
#pragma unroll
        for (int d = 0; d < 8; ++d) a += qpos[c][d] * fmx[d] + qneg[c][d] * fmn[d];
        part[c] = a;
      }
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < S::kChunks; ++c) acc += part[c];
      acc = reduce_page<S::kThreadsPerPage>(acc);
      if (tid % S::kThreadsPerPage == 0 && page < my_hi) {
        const uint32_t key = order_key(acc);
        skeys[page - my_lo] = key;
        kmin = min(kmin, key);
        kmax = max(kmax, key);
      }
      __syncthreads();  // the stage is refilled by a later iteration
    }
  }
  block_min_max<kCsWarps>(kmin, kmax, s_wmin, s_wmax);
  if (tid == 0) {
    s_mm[0] = kmin;
    s_mm[1] = kmax;
  }
  for (int i = tid; i < kCsBins; i += kCsThreads) hist[i] = 0;  // the pipeline is drained
  cluster.sync();  // every CTA's keys, min and max are ready; rank 0's list counter is zero
  if (warp == 0) {
    uint32_t mn = 0xffffffffu, mx = 0u;
    if (lane < C) {
      const uint32_t* r = cluster.map_shared_rank(s_mm, lane);
      mn = r[0];
      mx = r[1];
    }
    warp_min_max(mn, mx);
    if (lane == 0) { s_wmin[0] = mn; s_wmax[0] = mx; }
  }
  __syncthreads();
  kmin = s_wmin[0];
  kmax = s_wmax[0];

  // ---- Radix select of the k-th largest key over the cluster (as select_pages_kernel).
  uint32_t prefix = kmin, mask = 0xffffffffu;
  int remaining = k;
  if (ranked && kmin != kmax) {
    const int high_bit = 31 - __clz(kmin ^ kmax);
    mask = high_bit == 31 ? 0u : ~((2u << high_bit) - 1u);
    prefix = kmin & mask;
    int top = high_bit;
    for (;;) {
      const int shift = max(top - 10, 0);
      const uint32_t bmask = (2u << (top - shift)) - 1u;
      for (int i = tid; i < n_mine; i += kCsThreads) {
        const uint32_t u = skeys[i];
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & bmask], 1);
      }
      cluster.sync();  // every CTA's histogram is complete
      constexpr int kOwnMax = (kCsBins + C - 1) / C;  // a compile-time trip count keeps the
      const int own_lo = rank * kCsBins / C;          // C remote pointers out of registers
      const int n_own = (rank + 1) * kCsBins / C - own_lo;
      for (int j = tid; j < kOwnMax; j += kCsThreads) {
        if (j >= n_own) break;
        const int bin = own_lo + j;
        int sum = 0;
#pragma unroll
        for (int r = 0; r < C; ++r) sum += cluster.map_shared_rank(hist, r)[bin];
        red[bin] = sum;
      }
      cluster.sync();  // the owned bins are summed; nobody reads `hist` any more this pass
      // Every remote load in flight at once (a loop issued them one round trip at a time):
      // H100, B = 1, graph replays of select_pages (NOTES.md v18): 524k 75.0 -> 74.3 us,
      // 1M 123.6 -> 123.0.
      constexpr int kPer = kCsBins / kCsThreads;
      static_assert(kPer * kCsThreads == kCsBins, "every thread reads the same number of bins");
      int v[kPer];
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int j = tid + u * kCsThreads;
        v[u] = cluster.map_shared_rank(red, ((j + 1) * C - 1) / kCsBins)[j];
      }
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        full[tid + u * kCsThreads] = v[u];
        hist[tid + u * kCsThreads] = 0;
      }
      __syncthreads();
      find_threshold_bin<kCsBins, kCsThreads>(full, remaining, warp_tot, s_bin, s_above);
      __syncthreads();
      remaining -= s_above;
      prefix |= (uint32_t)s_bin << shift;
      mask |= bmask << shift;
      const int bin_count = full[s_bin];
      __syncthreads();  // s_bin and `full` are rewritten by the next pass
      if (shift == 0) break;  // every bit is fixed: the threshold is the prefix itself
      if (bin_count <= 32) {
        // Gather the threshold bin's keys (at most 32 in the cluster) in CTA 0; rank them.
        int* n0 = cluster.map_shared_rank(&s_list_n, 0);
        uint32_t* list0 = cluster.map_shared_rank(s_list, 0);
        gather_bin<kCsThreads>(n_mine, [&](int i) { return skeys[i]; }, mask, prefix, n0, list0);
        cluster.sync();  // the list is complete
        if (warp == 0) warp_rank_threshold(list0, *n0, remaining, s_thr, s_need);
        __syncthreads();
        prefix = s_thr;
        mask = 0xffffffffu;
        remaining = s_need;
        break;
      }
      top = shift - 1;
    }
  }
  const int need_eq = ranked ? remaining : 0;

  // ---- Ordered output. A candidate is definite (chosen) above the threshold, or
  // equal to it and among the need_eq lowest-indexed such candidates of the row.
  auto classify = [&](int i, bool& def, bool& eq) {
    if (take_all) { def = true; eq = false; return; }
    if (!ranked) { def = false; eq = false; return; }
    const uint32_t u = skeys[i];
    def = u > prefix;
    eq = u == prefix;
  };
  {
    int nd = 0, ne = 0;
    for (int i = tid; i < n_mine; i += kCsThreads) {
      bool def, eq;
      classify(i, def, eq);
      nd += def;
      ne += eq;
    }
    // The CTA's totals: one barrier (warp_tot was last read before find_threshold_bin's
    // caller synced; ordered_compact rewrites it only after the cluster barriers below).
    int db, eb, d_total, e_total;
    scan_warp_counts<kCsWarps, uint64_t>(__reduce_add_sync(0xffffffffu, nd), __reduce_add_sync(0xffffffffu, ne),
                                         warp_tot, db, eb, d_total, e_total);
    if (tid == 0) { s_cnt[0] = d_total; s_cnt[1] = e_total; }
  }
  cluster.sync();  // every CTA's counts are ready (and CTA 0's list has been read)
  if (warp == 0) {
    int d = 0, e = 0, db = 0, eb = 0;
    if (lane < C) {
      const int* r = cluster.map_shared_rank(s_cnt, lane);
      d = r[0];
      e = r[1];
    }
    db = lane < rank ? d : 0;
    eb = lane < rank ? e : 0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      d += __shfl_xor_sync(0xffffffffu, d, off);
      e += __shfl_xor_sync(0xffffffffu, e, off);
      db += __shfl_xor_sync(0xffffffffu, db, off);
      eb += __shfl_xor_sync(0xffffffffu, eb, off);
    }
    if (lane == 0) { s_base[0] = db; s_base[1] = eb; s_base[2] = d; s_base[3] = e; }
  }
  cluster.sync();  // no CTA reads another's shared memory after this point
  const int chosen = s_base[2] + min(s_base[3], need_eq);
  if (rank == 0) {
    for (int i = tid; i < n_head; i += kCsThreads) out[i] = i;
  }
  if (rank == C - 1) {
    for (int i = n_head + chosen + tid; i < se.n_out; i += kCsThreads) {
      const int t = i - n_head - chosen;
      out[i] = t < n_tail ? cand_hi + t : -1;
    }
  }
  int base_def = s_base[0], base_eq = s_base[1];
  ordered_compact<kCsWarps, kSelectItems, false>(n_mine, need_eq, base_def, base_eq, warp_tot, classify, [&](int i, int pos) {
    if (n_head + pos < se.n_out) out[n_head + pos] = my_lo + i;
  });
#endif
}

namespace {

// The kernel's attributes, set once a device: the shared memory it may opt into (the
// static part stays under 1 KB), the largest carveout, and cluster sizes above 8
// (non-portable, allowed on sm_90).
template <int D, typename E, bool FROM_SCORES, int C>
bool configure_cluster_kernel(int dev) {
  auto kernel = score_select_cluster_kernel<D, E, FROM_SCORES, C>;
  static int configured[kMaxDevices] = {};  // 1 failed, 2 done
  return per_device(configured, dev, [&](int d) {
    bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   max_smem_per_block(d) - 1024) == cudaSuccess;
    prefer_max_shared(kernel);
    if (C > 8) ok = ok && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    if (!ok) cudaGetLastError();
    return ok ? 2 : 1;
  }) == 2;
}

template <int D, typename E, bool FROM_SCORES, int C>
void launch_cluster_kernel(const ScoreParams& sp, const SelectParams& se, int keys_cap, cudaStream_t stream) {
  auto kernel = score_select_cluster_kernel<D, E, FROM_SCORES, C>;
  const size_t smem = (FROM_SCORES ? kCsHistBytes : kCsPipeBytes) + size_t(keys_cap) * sizeof(uint32_t);
  const int dev = current_device();
  configure_cluster_kernel<D, E, FROM_SCORES, C>(dev);
  cudaLaunchAttribute attr[2];
  const cudaLaunchConfig_t cfg = cluster_launch_config(C, dim3(C, se.Hkv, se.B), dim3(kCsThreads), smem, stream, use_pdl(dev), attr);
  cudaLaunchKernelEx(&cfg, kernel, sp, se, keys_cap);
  check_launch("score_select_cluster_kernel");
}

// Clusters of C CTAs the device runs at once (the occupancy API, asked once a device and
// size class), for CTAs holding up to 256 << cls keys. The fused kernel's pipeline alone
// takes more than half an SM's shared memory (one CTA an SM whatever its keys); the
// selection alone packs several CTAs an SM, fewer as its rows grow.
inline constexpr int kCsKeyClasses = 9;  // 256 to 65,536 keys a CTA
template <bool FROM_SCORES, int C>
int resident_clusters(int dev, int keys) {
  int cls = 0;
  while (cls + 1 < kCsKeyClasses && (256 << cls) < keys) ++cls;
  if ((256 << cls) < keys) return 0;
  static int cache[kCsKeyClasses][kMaxDevices] = {};  // clusters + 1
  return per_device(cache[cls], dev, [cls](int d) {
    const size_t smem = (FROM_SCORES ? kCsHistBytes : kCsPipeBytes) + (size_t(256) << cls) * sizeof(uint32_t);
    if (smem + 1024 > size_t(max_smem_per_block(d)) || !configure_cluster_kernel<128, Bf16, FROM_SCORES, C>(d)) {
      return 1;
    }
    cudaLaunchAttribute attr[2];
    const cudaLaunchConfig_t cfg = cluster_launch_config(C, dim3(C, 1, 1), dim3(kCsThreads), smem, nullptr, false, attr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, score_select_cluster_kernel<128, Bf16, FROM_SCORES, C>, &cfg) !=
        cudaSuccess) {
      cudaGetLastError();
      clusters = 0;
    }
    return clusters + 1;
  }) - 1;
}

// One wave: every row's cluster runs at once.
template <bool FROM_SCORES, int C>
bool cluster_fits(int dev, int n_pages, int rows) {
  return rows * C <= sm_count(dev) && resident_clusters<FROM_SCORES, C>(dev, (n_pages + C - 1) / C) >= rows;
}

template <int D_, typename E_, bool FROM_SCORES>
struct ClusterTag {
  static constexpr int D = D_;
  using E = E_;
  static constexpr bool kFromScores = FROM_SCORES;
};

}  // namespace

// The selection alone (e4m3 scores) keeps 8 CTAs a row under kCs16MinPages pages: H100,
// B = 1, graph step (NOTES.md v16): 16 CTAs took 524k 71.9 -> 70.7 us and 1M 103.5 ->
// 99.8, but 262k 57.0 -> 57.6.
inline constexpr int kCs16MinPages = 32768;

// Fused or not (16-bit summaries): the fused kernel scores a row on its cluster's C SMs
// only, at about kFusedSmBytesPerUs an SM, where the score kernel uses every SM (about
// kScorerBytesPerUs at B = 1) and a cluster then selects from its scores, which costs
// about kFusedSelectSavingUs more than the fused kernel's own selection. Both rates are
// H100 measurements (NOTES.md v16-v17). They agree with the graph-replayed B = 1 steps
// at 524k there: Hkv = 2, D = 256 runs fused in 87.7 us against 71.5 separately (with a
// one-CTA select), but Hkv = 3, D = 64 in 40.7 against 45.7 and Hkv = 4, D = 128 in 63.2
// against 66.1, where the fused kernel is used.
inline constexpr double kFusedSmBytesPerUs = 34e3;
inline constexpr double kScorerBytesPerUs = 2.4e6;
inline constexpr double kFusedSelectSavingUs = 8.0;
bool fused_pays(int n_pages, int rows, int page_bytes, int C) {
  const double bytes = double(n_pages) * page_bytes;  // one row's summaries
  return bytes / (C * kFusedSmBytesPerUs) - bytes * rows / kScorerBytesPerUs <= kFusedSelectSavingUs;
}

// The cluster size: the largest of 16, 12, 10 and 8 CTAs a row whose clusters all run at
// once (one wave), so that more SMs score and select a row.
ClusterPlan plan_score_select_cluster(int n_pages, int rows, int page_bytes, bool fp8) {
  static const bool allowed = env_enabled("HYDRA_CLUSTER_SELECT");
  ClusterPlan plan;
  if (!allowed) return plan;
  const int dev = current_device();
  static const int force = env_int("HYDRA_CS_CTAS", 0);  // tests: run a cluster size this GPU would not pick
  if (cc_major(dev) < 9 || n_pages < kClusterMinPages || rows * kClusterCtas > sm_count(dev)) return plan;
  // The first size of 16, 12, 10, 8 whose clusters all run at once (16 for the selection
  // alone only from kCs16MinPages pages).
  auto pick = [&](auto from_scores) {
    constexpr bool kFromScores = decltype(from_scores)::value;
    if (force == 8 || force == 10 || force == 12 || force == 16) return force;
    return (!kFromScores || n_pages >= kCs16MinPages) && cluster_fits<kFromScores, 16>(dev, n_pages, rows) ? 16
           : cluster_fits<kFromScores, 12>(dev, n_pages, rows)                                            ? 12
           : cluster_fits<kFromScores, 10>(dev, n_pages, rows)                                            ? 10
           : cluster_fits<kFromScores, 8>(dev, n_pages, rows)                                             ? 8
                                                                                                          : 0;
  };
  bool fused = !fp8;
  int C = fused ? pick(std::false_type{}) : pick(std::true_type{});
  if (fused && (C == 0 || (force == 0 && !fused_pays(n_pages, rows, page_bytes, C)))) {
    fused = false;
    C = pick(std::true_type{});
  }
  if (C == 0) return plan;  // not one wave of clusters: the separate kernels
  const int keys = (n_pages + C - 1) / C;
  const long long bytes = (long long)(fused ? kCsPipeBytes : kCsHistBytes) + (long long)keys * 4 + 1024;
  if (bytes > max_smem_per_block(dev)) return plan;
  plan.ctas = C;
  plan.keys = keys > 0 ? keys : 1;
  plan.fused = fused;
  return plan;
}

void launch_score_select_cluster(const ScoreParams& sp, const SelectParams& se, const ClusterPlan& plan,
                                 cudaStream_t stream) {
  // One instantiation a cluster size; the selection alone reads no summaries, so one
  // serves every head dim and dtype.
  auto with_ctas = [&](auto tag) {
    using T = decltype(tag);
    constexpr int D = T::D;
    using E = typename T::E;
    switch (plan.ctas) {
      case 16: launch_cluster_kernel<D, E, T::kFromScores, 16>(sp, se, plan.keys, stream); break;
      case 12: launch_cluster_kernel<D, E, T::kFromScores, 12>(sp, se, plan.keys, stream); break;
      case 10: launch_cluster_kernel<D, E, T::kFromScores, 10>(sp, se, plan.keys, stream); break;
      default: launch_cluster_kernel<D, E, T::kFromScores, 8>(sp, se, plan.keys, stream); break;
    }
  };
  if (!plan.fused) {
    with_ctas(ClusterTag<128, Bf16, true>{});
    return;
  }
  HYDRA_DISPATCH_HEAD_DIM(sp.D, kD, [&] {
    HYDRA_DISPATCH_DTYPE(sp.dtype, E, [&] { with_ctas(ClusterTag<kD, E, false>{}); });
  });
}

}  // namespace hydra
