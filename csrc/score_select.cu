// Page scoring and top-k page selection, kept apart from the attention kernel so
// that a scorer can change without touching attention.
//
// score(p) = sum_{j in group} sum_d max(q_jd * kmin_pd, q_jd * kmax_pd)
//          = sum_d (sum_j max(q_jd, 0)) * kmax_pd + (sum_j min(q_jd, 0)) * kmin_pd
// The second form folds the GQA group into two D-vectors once per CTA, so the
// per-page cost does not grow with the group size.
#include <algorithm>

#include "mma.cuh"
#include "score_e4m3.cuh"
#include "select_common.cuh"

namespace hydra {

constexpr int kScoreThreads = 128;
constexpr int kScorePasses = 8;  // pages each thread group scores per CTA
// Grids of more than 3 CTAs an SM take the variant compiled for 4 resident CTAs (at most
// 128 registers a thread instead of ~131, no spills): at 131,072 tokens, B = 1 its 1,024
// CTAs run in 1.9 waves instead of 2.6. Measured on an H100 (benchmarks/NOTES.md v14):
// step 50.6 -> 48.9 us at B = 1, 175.7 -> 169.7 us at B = 8; smaller grids keep the
// unconstrained build, which measured the same or slightly faster there.
constexpr int kScoreMinBlocks = 4;
// The summary loads skip L1 in grids of up to kNoL1Waves waves (of 4 CTAs an SM); larger
// grids keep plain loads. H100 A/B, graph step (NOTES.md v15): skipping L1 took B = 1 at
// 131k from 49.5 to 45.5 us and B = 2 from 68.8 to 64.9, but cost 1-2 us at B = 4-32.
// (A 256-byte L2 fetch gained 1-3 us in large grids in that A/B, but not in the decode
// benchmark's run: B = 32 at 32k 307 -> 311 us. Not used.) The crossover lies between
// 3.9 waves (B = 2) and 7.8 (B = 4), untested in between.
constexpr int kNoL1Waves = 6;

template <int D>
struct ScoreShape {
  static constexpr int kThreadsPerPage = D / 8;  // one 16-byte vector each
  static constexpr int kPagesPerPass = kScoreThreads / kThreadsPerPage;
  static constexpr int kPagesPerCta = kPagesPerPass * kScorePasses;
  static_assert(kThreadsPerPage <= 32 && (kThreadsPerPage & (kThreadsPerPage - 1)) == 0,
                "a page's threads must sit inside one warp");
};

// Grid (ceil(n_pages / kPagesPerCta), Hkv, B). FROM_K: summaries are built on the
// fly from the keys (the stateless path), in registers, never written out.
// 16-bit summaries only (e4m3 ones are scored by score_pages_e4m3_kernel).
template <int D, bool FROM_K, typename E, int MIN_BLOCKS = 1, LoadHint HINT = LoadHint::kDefault>
__global__ void __launch_bounds__(kScoreThreads, MIN_BLOCKS) score_pages_kernel(ScoreParams p) {
  using S = ScoreShape<D>;
  const int b = blockIdx.z, h = blockIdx.y;
  pdl_wait();
  pdl_launch_dependents();  // the select kernel may be placed as the last CTAs run
  const int L_raw = p.seqlens != nullptr ? p.seqlens[b] : p.Tkv;  // read once: the old length
  // The fused append's CTA is the first of each (b, h), so that its chain of dependent
  // memory round trips overlaps the scoring instead of trailing it.
  const bool with_append = p.append.k_src != nullptr;
  if (with_append && blockIdx.x == 0) {
    if (threadIdx.x < 32) append_one_token<E, false>(p.append, L_raw, b, h, threadIdx.x);
    return;
  }
  const int cta = blockIdx.x - (with_append ? 1 : 0);  // this CTA's share of the scoring
  const ScoreRow row = score_row(p, b, h, L_raw);
  const int page0 = cta * S::kPagesPerCta;
  if (!row.selects || !row.covers(page0, S::kPagesPerCta)) return;  // nothing to rank here
  const int L = row.L, cand_lo = row.cand_lo, cand_hi = row.cand_hi;
  const bool stage1 = row.stage1, stage2 = row.stage2;

  const int lane = threadIdx.x % S::kThreadsPerPage;
  const int grp = threadIdx.x / S::kThreadsPerPage;
  const int d0 = lane * 8;
  float* scores = p.scores + ((int64_t)b * p.Hkv + h) * p.n_pages;
  if constexpr (!FROM_K) {
    const bf16_t* s = p.summaries + b * p.s_batch_stride + h * p.s_head_stride + d0;
    uint4 mn[kScorePasses], mx[kScorePasses];
    int pages[kScorePasses];
    // Issue every summary load before the query loads and before the first use:
    // 2 * kScorePasses 16-byte loads in flight.
#pragma unroll
    for (int i = 0; i < kScorePasses; ++i) {
      const int page = row.page_of(page0 + i * S::kPagesPerPass + grp);
      pages[i] = page;
      if (page >= 0) {
        mn[i] = ldg16_hint<HINT>(s + page * p.s_page_stride);
        mx[i] = ldg16_hint<HINT>(s + page * p.s_page_stride + D);
      } else {
        mn[i] = make_uint4(0, 0, 0, 0);
        mx[i] = mn[i];
      }
    }
    float qpos[8], qneg[8];
    group_query_bounds<E>(p, b, h, d0, qpos, qneg);
    // Fused append: the new token's page (or superpage) is scored with the token folded
    // in, since this launch's append CTA may update that summary before or after the
    // load above (either way the fold gives the same bound; see append_one_token). A
    // fine page is a candidate only when recent_tokens == 0 and the token completes
    // it; a superpage, when the recent window is shorter than a superpage.
    const int append_page = p.k_new != nullptr && L_raw >= 0 && L_raw < p.Tkv
                                ? L_raw / (p.page_size * (stage1 ? p.superpage : 1)) : -1;
#pragma unroll
    for (int i = 0; i < kScorePasses; ++i) {
      float fmn[8], fmx[8];
      unpack8<E>(mn[i], fmn);
      unpack8<E>(mx[i], fmx);
      if (pages[i] >= 0 && pages[i] == append_page) {
        float f[8];
        unpack8<E>(ldg16(p.k_new + b * p.kn_batch_stride + h * p.kn_head_stride + d0), f);
#pragma unroll
        for (int d = 0; d < 8; ++d) { fmn[d] = fminf(fmn[d], f[d]); fmx[d] = fmaxf(fmx[d], f[d]); }
      }
      float acc = 0.f;
#pragma unroll
      for (int d = 0; d < 8; ++d) acc += qpos[d] * fmx[d] + qneg[d] * fmn[d];
      acc = reduce_page<S::kThreadsPerPage>(acc);
      const int x = page0 + i * S::kPagesPerPass + grp;
      if (lane == 0) {
        if (stage2) {
          if (x < p.n_short * p.superpage) scores[x] = pages[i] >= 0 ? acc : -INFINITY;
        } else if (pages[i] >= 0) {
          scores[x] = acc;
        }
      }
    }
  } else {
    float qpos[8], qneg[8];
    group_query_bounds<E>(p, b, h, d0, qpos, qneg);
    const bf16_t* k = p.k + b * p.k_batch_stride + h * p.k_head_stride + (int64_t)row.start * p.k_row_stride + d0;
    for (int i = 0; i < kScorePasses; ++i) {
      const int page = page0 + i * S::kPagesPerPass + grp;
      const bool cand = page >= cand_lo && page < cand_hi;
      float acc = 0.f;
      if (cand) {  // only the last page can be partial (when recent_tokens == 0)
        float mn[8], mx[8];
#pragma unroll
        for (int d = 0; d < 8; ++d) { mn[d] = __int_as_float(0x7f800000); mx[d] = -mn[d]; }
        const bf16_t* kp = k + (int64_t)page * p.page_size * p.k_row_stride;
        const int n_tok = min(p.page_size, L - page * p.page_size);
#pragma unroll 8
        for (int t = 0; t < n_tok; ++t) {
          float f[8];
          unpack8<E>(ldg16(kp + t * p.k_row_stride), f);
#pragma unroll
          for (int d = 0; d < 8; ++d) { mn[d] = fminf(mn[d], f[d]); mx[d] = fmaxf(mx[d], f[d]); }
        }
#pragma unroll
        for (int d = 0; d < 8; ++d) acc += qpos[d] * mx[d] + qneg[d] * mn[d];
      }
      acc = reduce_page<S::kThreadsPerPage>(acc);
      if (lane == 0 && cand) scores[page] = acc;
    }
  }
}

// ---------------------------------------------------------------------------
// Scoring from e4m3 summaries, on the tensor cores (score_e4m3.cuh: the arithmetic,
// shared with the fused short step).
// A CTA scores tiles of kE4m3PagesPerCta pages of one row: one tile, or (few rows) every
// stride-th tile of its row, so that the query is folded once a CTA.
// Measured on an H200 (B = 1, 131,072 tokens, benchmarks/NOTES.md v12): 10-11 us against
// 18.7 for e4m3 on the CUDA-core scorer below. The same kernel over 16-bit summaries
// (16-byte loads) took 15.6-23 us against that scorer's 12.7, so 16-bit summaries stay there.
constexpr int kE4m3ScoreWarps = 4;
// With at most this many (sequence, KV head) rows, the grid is capped at one wave and each
// CTA loops over tiles of its row, folding the query once. H100, graph step (NOTES.md
// v16): B = 1 (8 rows) at 524k 74.7 -> 72.5 us and at 1M 109 -> 103.5, but B = 8 (64 rows)
// at 131k 140.5 -> 143.7, so larger batches keep one tile a CTA.
constexpr int kE4m3PersistRows = 16;
constexpr int kE4m3Tiles = 2;  // 16-row tiles per warp
constexpr int kE4m3PagesPerCta = kE4m3ScoreWarps * 16 * kE4m3Tiles;

template <int D, typename E>
__global__ void __launch_bounds__(kE4m3ScoreWarps * 32) score_pages_e4m3_kernel(ScoreParams p) {
  constexpr int kPagesPerCta = kE4m3PagesPerCta;
  __shared__ float sw[2 * D];                 // w = [qneg | qpos], fp32
  __shared__ float s_scale;
  const int b = blockIdx.z, h = blockIdx.y, tid = threadIdx.x, warp = tid >> 5;
  pdl_wait();
  pdl_launch_dependents();
  const int L_raw = p.seqlens != nullptr ? p.seqlens[b] : p.Tkv;
  const bool with_append = p.append.k_src != nullptr;
  if (with_append && blockIdx.x == 0) {
    if (tid < 32) append_one_token<E, true>(p.append, L_raw, b, h, tid);
    return;
  }
  // A CTA scores tiles first, first + stride, ... of its row (one tile a CTA unless the
  // launcher capped the grid), so the query folding below is done once a CTA.
  const int first = blockIdx.x - (with_append ? 1 : 0), stride = gridDim.x - (with_append ? 1 : 0);
  const int n_work = (p.n_pages + kPagesPerCta - 1) / kPagesPerCta;
  const ScoreRow row = score_row(p, b, h, L_raw);
  if (!row.selects || !row.covers(first * kPagesPerCta, (n_work - first) * kPagesPerCta)) return;
  const bool stage2 = row.stage2;

  e4m3_fold_query<D, E>(p, b, h, sw, s_scale);
  const float scale = s_scale;
  uint32_t bfrag[E4m3Shape<D>::kSegs][2][2];
  e4m3_fragments<D>(sw, scale, bfrag);
  const int append_page = p.k_new != nullptr && L_raw >= 0 && L_raw < p.Tkv
                              ? L_raw / (p.page_size * (row.stage1 ? p.superpage : 1)) : -1;
  float* scores = p.scores + ((int64_t)b * p.Hkv + h) * p.n_pages;
  for (int cta = first; cta < n_work; cta += stride) {
    const int page0 = cta * kPagesPerCta;
    if (!row.covers(page0, kPagesPerCta)) continue;
    e4m3_score_tiles<D, E, kE4m3Tiles>(
        p, b, h, sw, scale, bfrag, page0 + warp * kE4m3Tiles * 16, append_page,
        [&](int x) { return row.page_of(x); },
        [&](int x, int pg, float s) {
          if (stage2) {
            if (x < p.n_short * p.superpage) scores[x] = pg >= 0 ? s : -INFINITY;
          } else if (pg >= 0) {
            scores[x] = s;
          }
        });
  }
}

void launch_score_pages(const ScoreParams& p, cudaStream_t stream) {
  const int dev = current_device();
  HYDRA_DISPATCH_HEAD_DIM(p.D, kD, [&] {
    HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
      const bool fp8 = p.summaries != nullptr && p.fmt.fp8;
      if (fp8) {  // e4m3 summaries: the tensor-core scorer
        static int mma_configured[kMaxDevices] = {};
        per_device(mma_configured, dev, [](int) {
          prefer_max_shared(score_pages_e4m3_kernel<kD, E>);
          return 1;
        });
        constexpr int rows = kE4m3PagesPerCta;
        int tiles = (p.n_pages + rows - 1) / rows;
        const int n_rows = p.Hkv * p.B;
        if (n_rows <= kE4m3PersistRows) {  // one wave of CTAs, each looping over its row's tiles
          static int per_sm[kMaxDevices] = {};
          const int resident = per_device(per_sm, dev, [](int) {
            int n = 0;
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, score_pages_e4m3_kernel<kD, E>, kE4m3ScoreWarps * 32, 0);
            return n > 0 ? n : 1;
          });
          tiles = std::min(tiles, std::max(1, (resident * sm_count(dev) + n_rows - 1) / n_rows));
        }
        dim3 grid(tiles + (p.append.k_src != nullptr ? 1 : 0), p.Hkv, p.B);
        launch_maybe_pdl(score_pages_e4m3_kernel<kD, E>, grid, dim3(kE4m3ScoreWarps * 32), 0, stream, p);
        check_launch("score_pages_e4m3_kernel");
        return;
      }
      constexpr int kPagesPerCta = ScoreShape<kD>::kPagesPerCta;
      dim3 grid((p.n_pages + kPagesPerCta - 1) / kPagesPerCta + (p.append.k_src != nullptr ? 1 : 0), p.Hkv, p.B);
      static int configured[kMaxDevices] = {};
      per_device(configured, dev, [](int) {
        prefer_max_shared(score_pages_kernel<kD, false, E, 1, LoadHint::kNoL1>);
        prefer_max_shared(score_pages_kernel<kD, false, E, kScoreMinBlocks, LoadHint::kNoL1>);
        prefer_max_shared(score_pages_kernel<kD, false, E, kScoreMinBlocks>);
        prefer_max_shared(score_pages_kernel<kD, true, E>);
        return 1;
      });
      const long long ctas = (long long)grid.x * grid.y * grid.z;
      const long long n_sms = sm_count(dev);
      const bool many = ctas > 3 * n_sms;
      const bool huge = ctas > kNoL1Waves * kScoreMinBlocks * n_sms;
      auto kernel = p.summaries == nullptr ? score_pages_kernel<kD, true, E>
                    : huge ? score_pages_kernel<kD, false, E, kScoreMinBlocks>
                    : many ? score_pages_kernel<kD, false, E, kScoreMinBlocks, LoadHint::kNoL1>
                           : score_pages_kernel<kD, false, E, 1, LoadHint::kNoL1>;
      launch_maybe_pdl(kernel, grid, dim3(kScoreThreads), 0, stream, p);
      check_launch("score_pages_kernel");
    });
  });
}

// ---------------------------------------------------------------------------
// Selection: one CTA per (KV head, sequence). The candidate scores are read once
// into shared memory as order-preserving keys (when they fit); a 4-pass radix
// select (8 bits a pass) finds the k-th largest; one ordered compaction then
// writes sink pages, recent pages, every candidate above the threshold and the
// lowest-indexed candidates equal to it, in ascending page order.

// THREADS: 1024 for rows of more than 4,096 scores, 512 for shorter ones (fewer warps
// make every block barrier and the per-warp histogram reduction cheaper; fewer than 512,
// each thread's chain over its keys grows: NOTES.md v33 item 5).
//
// REG: every row holds at most kSelectRegKeys candidates (8,192 for 1,024 threads, 4,096
// for 512), which stay in registers, 8 a thread. Warp w holds the w-th run of 32 R'
// consecutive candidates (R' = ceil(n / THREADS) <= R rounds, so that every warp has
// some), lane l candidates w * 32 R' + 32 r + l (r < R'): the order the ordered output
// walks them in. The unrolled loops over R stop at R', so a short row does a short row's
// work. The first radix pass, the threshold bin's gather and the output read no key from
// shared memory, and the whole row is one chunk of the output: one block barrier
// exchanges the warps' counts (select_common.cuh's ballot_rounds, scan_warp_counts and
// emit_taken, as ordered_compact). The sink and recent pages, which are always taken, are
// written by index arithmetic around the chosen candidates. Without REG the keys go
// through shared memory (or L2, past its capacity) and the output is compacted in chunks
// (ordered_compact).
template <int THREADS>
constexpr int kSelectRegKeys = THREADS >= 1024 ? 8192 : 4096;

template <int THREADS, bool REG>
__global__ void __launch_bounds__(THREADS) select_pages_kernel(SelectParams p, int smem_keys) {
  constexpr int kSelectThreads = THREADS, kWarps = THREADS / 32;
  constexpr int kR = REG ? kSelectRegKeys<THREADS> / THREADS : 1;  // keys a thread holds (REG)
  extern __shared__ uint32_t skeys[];  // [smem_keys] candidate keys, when they fit (not REG)
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  // The lengths are read before pdl_wait(), so that after it only the scores' loads
  // remain on the path. They are the step's inputs: the score kernel that always precedes
  // this one never writes them, and each of its CTAs passes its own pdl_wait() before it
  // lets this grid launch, so every kernel before the step has completed, its writes in
  // L2, by the time this CTA runs. The loads skip L1 (ld.global.cg), which may still hold
  // an older step's lines. H100 A/B: benchmarks/NOTES.md v33.
  const int L_end = seq_len<true>(p.seqlens, b, p.Tkv, p.len_add);
  const int L = L_end - seq_start<true>(p.leftpad, b, L_end);
  pdl_wait();
  pdl_launch_dependents();  // the attention's CTAs may be placed while this one selects
  __shared__ int hist[256];
  __shared__ int hist_all[kWarps * 256];
  __shared__ uint64_t warp_tot[64];  // block scans; ordered_compact double-buffers it
  __shared__ int s_bin, s_above, s_n, s_need;
  __shared__ uint32_t s_list[32], s_thr;

  const int n_pages_b = (L + p.page_size - 1) / p.page_size;
  int* out = p.pages + ((int64_t)b * p.Hkv + h) * p.n_out;
  if (p.counters != nullptr && tid == 0) p.counters[b * p.Hkv + h] = 0;
  if (p.lens_out != nullptr && h == 0 && tid == 0) p.lens_out[b] = L_end;

  if (n_pages_b <= p.n_sel) {  // L <= budget: every page, exactly (mode 1: nothing to shortlist)
    for (int i = tid; i < p.n_out; i += kSelectThreads) out[i] = (p.mode != 1 && i < n_pages_b) ? i : -1;
    return;
  }
  // The output is n_head forced pages (the sinks), then the chosen candidates in
  // candidate order (ascending pages), then n_tail forced pages from tail_start (the
  // recent window). k: candidates to choose.
  const int cand_lo = min(p.sink_pages, n_pages_b);
  const int cand_hi = max(first_recent_page(L, p.recent_tokens, p.page_size), cand_lo);
  int n_head = cand_lo, n_cand = cand_hi - cand_lo, n_tail = n_pages_b - cand_hi, score_off = cand_lo;
  int cand_first = cand_lo;
  if (p.mode == 1) {  // superpages holding a candidate page; no forced entries
    const int sp_lo = cand_lo / p.superpage;
    const int sp_hi = cand_hi > cand_lo ? (cand_hi + p.superpage - 1) / p.superpage : sp_lo;
    n_head = 0;
    n_tail = 0;
    n_cand = sp_hi - sp_lo;
    score_off = cand_first = sp_lo;
  } else if (p.mode == 2) {  // the compact slots of the shortlist
    n_cand = p.n_short * p.superpage;
    score_off = 0;
  }
  const int k = p.mode == 1 ? min(p.n_out, n_cand) : p.n_sel - n_head - n_tail;
  const bool take_all = k >= n_cand;
  const int* sl = p.mode == 2 ? p.shortlist + ((int64_t)b * p.Hkv + h) * p.n_short : nullptr;
  auto page_of_cand = [&](int c) -> int {
    if (p.mode != 2) return cand_first + c;
    const int sp = sl[c / p.superpage];
    return sp >= 0 ? sp * p.superpage + c % p.superpage : -1;
  };
  const float* sc = p.scores + ((int64_t)b * p.Hkv + h) * p.n_scores + score_off;
  const bool cached = n_cand <= smem_keys;
  int* whist = reinterpret_cast<int*>(hist_all);  // [kWarps][256] private histograms, or one of 2,048 bins
  constexpr int kBins = 2048;                      // the first radix pass's bins
  static_assert(kBins <= kWarps * 256, "the first pass's histogram reuses the per-warp histograms");
  // Zeroed before the barrier of the min / max below, which orders them before any use.
  for (int i = tid; i < kBins; i += kSelectThreads) whist[i] = 0;
  if (tid == 0) s_n = 0;
  // Read the candidate keys once (into registers, or shared memory when they fit) and find
  // their min and max: the radix passes start below the bits that all keys share.
  uint32_t kmin = 0xffffffffu, kmax = 0u;
  uint32_t kr[kR];
  // REG: rounds a warp holds (block-uniform: the unrolled loops over kR stop there), this
  // thread's first candidate, and whether round r < rounds holds one of its candidates.
  const int rounds = (n_cand + kSelectThreads - 1) / kSelectThreads;
  const int c0 = warp * 32 * rounds + lane;
  auto holds = [&](int r) { return c0 + 32 * r < n_cand; };
  if constexpr (REG) {
    if (rounds > kR) __trap();  // the launcher sends only rows of at most THREADS * kR scores
    float v[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r >= rounds) break;
      v[r] = holds(r) ? sc[c0 + 32 * r] : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r >= rounds) break;
      kr[r] = order_key(v[r]);
      if (holds(r)) {
        kmin = min(kmin, kr[r]);
        kmax = max(kmax, kr[r]);
      }
    }
  } else {
    constexpr int kU = kSelectRegKeys<THREADS> / THREADS;  // loads in flight per thread: one batch of the REG size
    for (int base = 0; base < n_cand; base += kSelectThreads * kU) {
      float v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kSelectThreads + tid;
        v[u] = i < n_cand ? sc[i] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kSelectThreads + tid;
        if (i < n_cand) {
          const uint32_t key = order_key(v[u]);
          if (cached) skeys[i] = key;
          kmin = min(kmin, key);
          kmax = max(kmax, key);
        }
      }
    }
  }
  __shared__ uint32_t s_min[kWarps], s_max[kWarps];
  block_min_max<kWarps>(kmin, kmax, s_min, s_max);
  auto key_at = [&](int i) -> uint32_t { return cached ? skeys[i] : order_key(sc[i]); };
  // f(key) for each of this thread's candidates.
  auto for_keys = [&](auto&& f) {
    if constexpr (REG) {
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        if (r >= rounds) break;
        if (holds(r)) f(kr[r]);
      }
    } else {
      for (int i = tid; i < n_cand; i += kSelectThreads) f(key_at(i));
    }
  };

  // Radix select of the k-th largest key from the highest bit where min and max differ
  // (scores share sign and most exponent bits, so a pass over the top bits would put
  // every key in one bin): 11 bits, then 8 bits a pass. A final pass may overlap bits
  // already fixed; the prefix test keeps that correct.
  uint32_t prefix = kmin, mask = 0xffffffffu;
  int remaining = k;  // after the passes: how many candidates equal to the threshold to take
  if (k > 0 && kmin != kmax && !take_all) {
    const int high_bit = 31 - __clz(kmin ^ kmax);
    mask = high_bit == 31 ? 0u : ~((2u << high_bit) - 1u);
    prefix = kmin & mask;
    // The threshold's bin holds few keys: gather them and let one warp rank them
    // (s_n was zeroed at the start; this runs once at most).
    auto resolve_small_bin = [&]() {
      gather_bin_of(for_keys, mask, prefix, &s_n, s_list);
      __syncthreads();
      if (tid < 32) warp_rank_threshold(s_list, s_n, remaining, s_thr, s_need);
      __syncthreads();
      prefix = s_thr;
      mask = 0xffffffffu;
      remaining = s_need;
    };

    // First pass: the 11 bits below the common prefix into one block-wide histogram
    // of up to 2048 bins. Usually it leaves a threshold bin of a few keys, ranked by
    // one warp; otherwise 8-bit passes over per-warp histograms continue below it.
    bool done = false;
    int next_top;
    {
      const int shift = max(high_bit - 10, 0);
      const uint32_t bmask = (2u << (high_bit - shift)) - 1u;  // high_bit - shift + 1 bits
      // Every key shares the prefix above high_bit.
      for_keys([&](uint32_t u) { atomicAdd(&whist[(u >> shift) & bmask], 1); });
      __syncthreads();
      find_threshold_bin<kBins, kSelectThreads>(whist, remaining, warp_tot, s_bin, s_above);
      __syncthreads();
      remaining -= s_above;
      prefix |= (uint32_t)s_bin << shift;
      mask |= bmask << shift;
      const int bin_count = whist[s_bin];
      if (shift == 0) {
        done = true;  // every bit is fixed: the threshold is the prefix itself
      } else if (bin_count <= 32) {
        resolve_small_bin();
        done = true;
      }
      next_top = shift - 1;
      if (!done) __syncthreads();  // s_bin / s_above / the histogram are rewritten below
    }
    for (int top = next_top; !done && top >= 0; top -= 8) {
      const int shift = max(top - 7, 0);
      for (int i = tid; i < kWarps * 256; i += kSelectThreads) whist[i] = 0;
      __syncthreads();
      int* my_hist = whist + (tid >> 5) * 256;
      for_keys([&](uint32_t u) {
        if ((u & mask) == prefix) atomicAdd(&my_hist[(u >> shift) & 255], 1);
      });
      __syncthreads();
      if (tid < 256) {
        int c = 0;
#pragma unroll 8
        for (int w = 0; w < kWarps; ++w) c += whist[w * 256 + tid];
        hist[tid] = c;
      }
      __syncthreads();
      if (tid < 32) {  // lane l owns bins 255 - 8l down to 248 - 8l
        int c[8], sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) { c[i] = hist[255 - 8 * tid - i]; sum += c[i]; }
        const int incl = warp_inclusive_scan(sum, tid);
        claim_threshold_bin<8>(c, incl - sum, sum, 255 - 8 * tid, remaining, s_bin, s_above);
      }
      __syncthreads();
      remaining -= s_above;
      prefix = (prefix & ~(0xffu << shift)) | ((uint32_t)s_bin << shift);
      mask |= 0xffu << shift;
      const int bin_count = hist[s_bin];
      __syncthreads();  // s_bin / s_above / hist are rewritten next pass
      if (shift > 0 && bin_count <= 32) {
        resolve_small_bin();
        break;
      }
    }
  }
  const int need_eq = k > 0 ? remaining : 0;

  // Ordered output (head, candidates, tail): sinks and recent pages are always taken, a
  // candidate is definite above the threshold and equal at it (taken while fewer than
  // need_eq equal candidates precede it). A candidate scored -inf (mode 2: a slot that is
  // no candidate page) is never taken.
  constexpr uint32_t kNegInfKey = 0x007fffffu;  // order_key(-inf)
  if constexpr (REG) {
    // The whole row is one run a warp (at most 8,192 candidates: 16-bit counts).
    uint32_t dm[kR], em[kR];
    int wd, we;
    ballot_rounds<kR>(rounds, dm, em, wd, we, [&](int r, bool& d, bool& e) {
      if (holds(r) && k > 0 && !(p.mode == 2 && kr[r] == kNegInfKey)) {
        d = take_all || kr[r] > prefix;
        e = !d && kr[r] == prefix;
      }
    });
    int def_before, eq_before, def_total, eq_total;
    scan_warp_counts<kWarps, uint32_t>(wd, we, warp_tot, def_before, eq_before, def_total, eq_total);
    emit_taken<kR, true>(rounds, dm, em, def_before, eq_before, need_eq, [&](int r, int pos) {
      if (n_head + pos < p.n_out) out[n_head + pos] = page_of_cand(c0 + 32 * r);
    });
    const int taken = n_head + def_total + min(eq_total, need_eq);
    for (int i = tid; i < n_head && i < p.n_out; i += kSelectThreads) out[i] = i;
    for (int j = tid; j < n_tail && taken + j < p.n_out; j += kSelectThreads) out[taken + j] = cand_hi + j;
    for (int i = taken + n_tail + tid; i < p.n_out; i += kSelectThreads) out[i] = -1;
  } else {
    const int n_items = n_head + n_cand + n_tail;
    int base_def = 0, base_eq = 0;
    ordered_compact<kWarps, kSelectItems, true>(
        n_items, need_eq, base_def, base_eq, warp_tot,
        [&](int i, bool& def, bool& eq) {
          if (i < n_head || i >= n_head + n_cand) {
            def = true;
            return;
          }
          if (k <= 0) return;
          const uint32_t u = key_at(i - n_head);
          if (p.mode == 2 && u == kNegInfKey) return;
          def = take_all || u > prefix;
          eq = !def && u == prefix;
        },
        [&](int i, int pos) {
          if (pos >= p.n_out) return;
          out[pos] = i < n_head ? i : i >= n_head + n_cand ? cand_hi + (i - n_head - n_cand) : page_of_cand(i - n_head);
        });
    for (int i = base_def + min(base_eq, need_eq) + tid; i < p.n_out; i += kSelectThreads) out[i] = -1;
  }
}

template <int THREADS, bool REG>
void launch_select_threads(const SelectParams& p, cudaStream_t stream) {
  auto kernel = select_pages_kernel<THREADS, REG>;
  if constexpr (REG) {  // the keys stay in registers: no dynamic shared memory
    launch_maybe_pdl(kernel, dim3(p.Hkv, p.B), dim3(THREADS), 0, stream, p, 0);
    check_launch("select_pages_kernel");
    return;
  }
  // Cache up to 40,960 candidate keys (160 KB, 640k tokens at 16-token pages) in shared
  // memory, fewer where the GPU allows less per block (~16k keys on ~100 KB GPUs); longer
  // rows read their keys from L2 on each pass instead.
  static int max_keys[kMaxDevices] = {};
  const int cap = per_device(max_keys, current_device(), [&](int dev) {
    cudaFuncAttributes attr{};
    cudaFuncGetAttributes(&attr, kernel);
    const int dyn = max_smem_per_block(dev) - int(attr.sharedSizeBytes);
    const int keys = std::max(dyn > 0 ? std::min(40960, dyn / int(sizeof(uint32_t))) : 0, 1);
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(keys * sizeof(uint32_t)));
    prefer_max_shared(kernel);
    return keys;
  });
  const int smem_keys = p.n_scores < cap ? p.n_scores : cap;
  const size_t smem = size_t(smem_keys) * sizeof(uint32_t);
  dim3 grid(p.Hkv, p.B);
  launch_maybe_pdl(kernel, grid, dim3(THREADS), smem, stream, p, smem_keys);
  check_launch("select_pages_kernel");
}

// A row's candidates never outnumber its scores (n_scores), so every row of up to 8,192
// scores keeps its keys in registers. H100 A/B, graph step, means of three rounds
// (NOTES.md v27), against the form before (shared memory up to 4,096 scores; registers
// above, without the loops' stop at the row's rounds), 16-bit / e4m3 summaries: B = 1 at
// 32k 30.2 -> 28.8 / 31.9 -> 31.2 us, 65k 37.1 -> 33.7 / 37.1 -> 34.9, 131k 42.6 -> 41.5
// / 41.5 -> 39.9 (D = 64 and 256: -1.1 to -1.6), B = 8 at 131k -2.4; B = 32 at 32k and
// B = 1 at 8k within +-0.3. Rows of up to 4,096 scores on 512 threads (8 keys a thread)
// instead of 256 (16 a thread), H100 A/B (NOTES.md v33 item 5), 16-bit / e4m3: B = 1 at
// 32k 27.6 -> 26.1 / 30.0 -> 27.5 us, 65k 32.9 -> 32.5 / 34.1 -> 30.6, D = 64 and 256 at
// 65k -2.2 / -2.7 to -4.0, B = 2 at 65k -2.1 / -3.5, B = 4 at 32k -1.4 / -3.7, B = 32 at
// 32k -1.6 / -1.9. Rows of at most 1,024 scores gain from 512 threads as well (NOTES.md
// v34 item 1: 0.4-1.8 us a step against 256 threads there).
// Launch order: the kernel reads the lengths before pdl_wait() (see the kernel), which is
// safe only while the launch just before it on the stream is a score kernel. Every caller
// (hydra_torch.cpp) launches it right after launch_score_pages, and
// tests/test_packaging.py::test_select_launches_right_after_a_score_launch holds that.
void launch_select_pages(const SelectParams& p, cudaStream_t stream) {
  if (p.n_scores <= kSelectRegKeys<512>) {
    launch_select_threads<512, true>(p, stream);
  } else if (p.n_scores <= kSelectRegKeys<1024>) {
    launch_select_threads<1024, true>(p, stream);
  } else {
    launch_select_threads<1024, false>(p, stream);
  }
}

int device_sm_count() { return sm_count(); }
int64_t device_l2_bytes() { return device_attribute<cudaDevAttrL2CacheSize>(current_device(), 1); }

}  // namespace hydra
