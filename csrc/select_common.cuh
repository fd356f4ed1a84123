// Helpers shared by the scoring and selection kernels (score_select.cu) and the fused
// cluster kernel (score_select_cluster.cu): the GQA-folded query bound, the fused
// append, the order-preserving key map, and the radix select's and ordered output's
// block-wide steps.
#pragma once

#include "common.cuh"

namespace hydra {

template <int TPP>
__device__ __forceinline__ float reduce_page(float x) {
#pragma unroll
  for (int off = TPP / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// The GQA group's query folded into two D-vectors (this thread's 8 dims):
// qpos = sum_j max(q_j, 0), qneg = sum_j min(q_j, 0). The group's loads are
// issued together (a serial loop would cost one memory latency per head).
template <typename E>
__device__ __forceinline__ void group_query_bounds(const ScoreParams& p, int b, int h, int d0, float (&qpos)[8],
                                                   float (&qneg)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) { qpos[i] = 0.f; qneg[i] = 0.f; }
  const bf16_t* q = p.q + b * p.q_batch_stride + (int64_t)(h * p.group) * p.q_head_stride + d0;
  for (int j0 = 0; j0 < p.group; j0 += 4) {
    uint4 u[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) u[j] = j0 + j < p.group ? ldg16(q + (j0 + j) * p.q_head_stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float f[8];
      unpack8<E>(u[j], f);  // zero padding adds nothing to either sum
#pragma unroll
      for (int i = 0; i < 8; ++i) { qpos[i] += fmaxf(f[i], 0.f); qneg[i] += fminf(f[i], 0.f); }
    }
  }
}

// A scoring CTA's view of its (b, h) row, shared by the score kernels: the step's
// length, the candidate range (pages, or superpages holding a candidate page in
// coarse-to-fine stage 1) and the map from a CTA's slot x to the page it scores.
struct ScoreRow {
  int L, start;                  // valid tokens after the left padding, and that padding
  int cand_lo, cand_hi;          // candidate pages (stage 1: superpages) [cand_lo, cand_hi)
  bool selects, stage1, stage2;  // selects: more pages than the budget (else nothing to rank)
  const int* shortlist;          // stage 2: this row's shortlisted superpages
  int superpage, n_short;
  // Slot x -> the page (or superpage) it scores, -1 if none. Stage 2 slots are compact:
  // x = slot * superpage + j is page shortlist[slot] * superpage + j.
  __device__ __forceinline__ int page_of(int x) const {
    if (!stage2) return (x >= cand_lo && x < cand_hi) ? x : -1;
    const int slot = x / superpage;
    const int sp = slot < n_short ? shortlist[slot] : -1;
    const int pg = sp >= 0 ? sp * superpage + x % superpage : -1;
    return (pg >= cand_lo && pg < cand_hi) ? pg : -1;
  }
  // Whether slots [x0, x0 + n) hold anything to score.
  __device__ __forceinline__ bool covers(int x0, int n) const {
    return stage2 ? x0 < n_short * superpage : (x0 < cand_hi && x0 + n > cand_lo);
  }
};

// L_raw: the cache length read once at the kernel's start (the old length under the
// fused append, whose step length is L_raw + len_add).
__device__ __forceinline__ ScoreRow score_row(const ScoreParams& p, int b, int h, int L_raw) {
  ScoreRow r;
  const int L_end = min(max(L_raw + p.len_add, 0), p.Tkv);
  r.start = seq_start(p.leftpad, b, L_end);  // 0 with the fused append
  r.L = L_end - r.start;
  const int n_pages_b = (r.L + p.page_size - 1) / p.page_size;
  r.selects = n_pages_b > p.n_sel;
  r.cand_lo = min(p.sink_pages, n_pages_b);
  r.cand_hi = max(first_recent_page(r.L, p.recent_tokens, p.page_size), r.cand_lo);
  r.stage1 = p.superpage > 1 && p.shortlist == nullptr;
  r.stage2 = p.shortlist != nullptr;
  if (r.stage1) {  // superpages holding at least one candidate page
    const int sp_lo = r.cand_lo / p.superpage;
    r.cand_hi = r.cand_hi > r.cand_lo ? (r.cand_hi + p.superpage - 1) / p.superpage : sp_lo;
    r.cand_lo = sp_lo;
  }
  r.shortlist = r.stage2 ? p.shortlist + ((int64_t)b * p.Hkv + h) * p.n_short : nullptr;
  r.superpage = p.superpage;
  r.n_short = p.n_short;
  return r;
}

// Fused append (HydraKVCache.step), one warp of the extra score CTA of (b, h): write
// the new K/V row at the old length L_old and fold the key into its page's (and
// superpage's) summary. The attention reads the row only after the selection. A
// scoring CTA may read that summary while it is rewritten here, but only when the
// page is a candidate, and then it folds the same key into what it read itself:
// min/max folding is idempotent and each bf16 pair is read whole (32-bit accesses
// are single-copy atomic), so the score is the same whether it saw the old or the
// new summary.
// e4m3 summaries fold per byte, and each dim's result is the same whether the old or
// the new code was read (see kv_cache.cu), so byte-wise atomicity is enough there.
// Write a summary's 8 dims at d0 with key chunk kv folded in; `fresh`: the summary
// starts at this key (its first token), whatever it held. `sm` points at the page's
// (2, D) block; e4m3 summaries hold codes of key * fmt.scale.
template <typename E, bool FP8>
__device__ __forceinline__ void fold_key(void* sm, int D, int d0, const uint4& kv, bool fresh, float scale) {
  float f[8], mn[8], mx[8];
  unpack8<E>(kv, f);
  void* row = FP8 ? static_cast<void*>(static_cast<uint8_t*>(sm) + d0) : static_cast<void*>(static_cast<bf16_t*>(sm) + d0);
  if (fresh) {
#pragma unroll
    for (int e = 0; e < 8; ++e) { mn[e] = f[e] * (FP8 ? scale : 1.f); mx[e] = mn[e]; }
  } else {
    load_summary8<E, FP8>(row, D, mn, mx);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float x = f[e] * (FP8 ? scale : 1.f);
      mn[e] = fminf(mn[e], x);
      mx[e] = fmaxf(mx[e], x);
    }
  }
  store_summary8<E, FP8>(row, D, mn, mx);
}

template <typename E, bool FP8>
__device__ __forceinline__ void append_one_token(const CacheWriteParams& p, int L_old, int b, int h, int lane) {
  if (L_old >= 0 && L_old < p.max_seq_len) {
    const int span = p.page_size * (p.super_summaries != nullptr ? p.superpage : 1);
    const bf16_t* ks = p.k_src + b * p.ks_batch_stride + h * p.ks_head_stride;
    const bf16_t* vs = p.v_src + b * p.vs_batch_stride + h * p.vs_head_stride;
    bf16_t* kc = p.k_cache + b * p.kc_batch_stride + h * p.kc_head_stride + (int64_t)L_old * p.kc_row_stride;
    bf16_t* vc = p.v_cache + b * p.vc_batch_stride + h * p.vc_head_stride + (int64_t)L_old * p.vc_row_stride;
    // Element offsets (bytes for e4m3 summaries).
    const int64_t at_sm = b * p.s_batch_stride + h * p.s_head_stride + (int64_t)(L_old / p.page_size) * p.s_page_stride;
    const int64_t at_ss = b * p.ss_batch_stride + h * p.ss_head_stride + (int64_t)(L_old / span) * p.ss_page_stride;
    auto addr = [](bf16_t* base, int64_t at) -> void* {
      if (base == nullptr) return nullptr;
      return FP8 ? static_cast<void*>(reinterpret_cast<uint8_t*>(base) + at) : static_cast<void*>(base + at);
    };
    void* sm = addr(p.summaries, at_sm);
    void* ss = addr(p.super_summaries, at_ss);
    for (int d0 = lane * 8; d0 < p.D; d0 += 32 * 8) {
      const uint4 kv = ldg16(ks + d0);
      *reinterpret_cast<uint4*>(kc + d0) = kv;
      *reinterpret_cast<uint4*>(vc + d0) = ldg16(vs + d0);
      fold_key<E, FP8>(sm, p.D, d0, kv, L_old % p.page_size == 0, p.fmt.scale);  // a new page starts at this key
      if (ss != nullptr) fold_key<E, FP8>(ss, p.D, d0, kv, L_old % span == 0, p.fmt.scale);  // and its superpage
    }
  } else if (h == 0 && lane == 0 && L_old >= p.max_seq_len) {
    atomicExch(p.overflow, 1);  // the token is dropped; check_overflow() reports it
  }
}

// Min and max of order-preserving keys over a warp; every lane gets both. One warp
// reduction instruction each (redux.sync, sm_80+, every GPU hydra builds for) instead of
// five dependent shuffle steps.
__device__ __forceinline__ void warp_min_max(uint32_t& mn, uint32_t& mx) {
  mn = __reduce_min_sync(0xffffffffu, mn);
  mx = __reduce_max_sync(0xffffffffu, mx);
}

// ... over a block of WARPS warps, through one shared slot a warp (s_min and s_max hold
// WARPS values each); every thread gets both. One block barrier; the slots are read after
// it, so the caller syncs again before rewriting them.
template <int WARPS>
__device__ __forceinline__ void block_min_max(uint32_t& mn, uint32_t& mx, uint32_t* s_min, uint32_t* s_max) {
  static_assert(WARPS >= 1 && WARPS <= 32, "one slot a warp, folded by one warp");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_min_max(mn, mx);
  if (lane == 0) { s_min[warp] = mn; s_max[warp] = mx; }
  __syncthreads();
  mn = lane < WARPS ? s_min[lane] : 0xffffffffu;
  mx = lane < WARPS ? s_max[lane] : 0u;
  warp_min_max(mn, mx);
}

constexpr int kSelectItems = 8;  // rounds of 32 items per warp in a chunk of the ordered compaction

// Order-preserving map from fp32 to uint32: a > b  <=>  key(a) > key(b).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive prefix sum of x over the 32 lanes of a warp (every lane active); `lane` is
// this thread's lane, passed in: the 1,024-thread register select, whose one-warp search
// passes its thread index, then compiles to 50 registers instead of 54 (NOTES.md v28).
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T x, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

// The last step of a threshold-bin search: this thread holds the counts c[0..PER) of PER
// consecutive bins from `top` down (c[j] is bin top - j), and `acc` keys lie in higher
// bins. If the count from the highest bin down first reaches `remaining` in its range,
// it writes that bin to s_bin and the keys above it to s_above (one thread does).
template <int PER>
__device__ __forceinline__ void claim_threshold_bin(const int (&c)[PER], int acc, int sum, int top, int remaining,
                                                    int& s_bin, int& s_above) {
  if (acc < remaining && remaining <= acc + sum) {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      if (acc + c[j] >= remaining) { s_bin = top - j; s_above = acc; break; }
      acc += c[j];
    }
  }
}

// The threshold bin of a block-wide histogram `hist` of BINS bins in shared memory: the
// bin where the count of keys from the highest bin down first reaches `remaining`.
// Thread t owns BINS / THREADS consecutive bins from the top; the one whose range holds
// the threshold writes the bin to s_bin and the count of keys in higher bins to
// s_above. One block barrier: each warp scans its own bins, then every warp scans the
// warps' totals (warp_tot, one slot a warp) itself. The caller syncs the block before
// reading s_bin / s_above, and before warp_tot is written again.
template <int BINS, int THREADS>
__device__ __forceinline__ void find_threshold_bin(const int* hist, int remaining, uint64_t* warp_tot, int& s_bin,
                                                   int& s_above) {
  constexpr int kPer = BINS / THREADS, kWarps = THREADS / 32;
  static_assert(kPer * THREADS == BINS, "every thread owns the same number of bins");
  static_assert(kWarps >= 1 && kWarps <= 32, "one warp scans the warps' totals");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int c[kPer], sum = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    c[j] = hist[BINS - 1 - (tid * kPer + j)];
    sum += c[j];
  }
  // Keys in this warp's bins down to this thread's last (< 2^31: counts of keys).
  const int incl = warp_inclusive_scan(sum, lane);
  if (lane == 31) warp_tot[warp] = (uint64_t)incl;
  __syncthreads();
  const int wt = lane < kWarps ? (int)warp_tot[lane] : 0;
  const int wincl = warp_inclusive_scan(wt, lane);
  const int acc = __shfl_sync(0xffffffffu, wincl - wt, warp) + incl - sum;  // keys in higher bins
  claim_threshold_bin<kPer>(c, acc, sum, BINS - 1 - tid * kPer, remaining, s_bin, s_above);
}

// The exact rank that ends every radix select here: once the threshold's bin holds at
// most 32 keys, one whole warp loads them (list[0..min(n, 32)), any order) and finds the
// remaining-th largest. The lanes holding it write the threshold to thr and how many keys
// equal to it are taken to need (equal lanes write equal values). list may point into
// another CTA's shared memory (the cluster kernel gathers the bin in CTA 0).
__device__ __forceinline__ void warp_rank_threshold(const uint32_t* list, int n, int remaining, uint32_t& thr,
                                                    int& need) {
  const int lane = threadIdx.x & 31;
  const int m = min(n, 32);
  const uint32_t x = lane < m ? list[lane] : 0u;
  int gt = 0, ge = 0;
  for (int j = 0; j < m; ++j) {
    const uint32_t y = __shfl_sync(0xffffffffu, x, j);
    gt += y > x;
    ge += y >= x;
  }
  if (lane < m && gt < remaining && remaining <= ge) {
    thr = x;
    need = remaining - gt;
  }
}

// Gathers the keys whose bits under `mask` equal `prefix` (a threshold bin known to hold
// at most 32 of them) into list[0..32), counting them in *count. for_keys(f) calls f(key)
// for this thread's share of the keys. count and list may sit in another CTA's shared
// memory (the cluster kernel gathers in CTA 0). The caller zeroes *count before and
// syncs after.
template <typename ForKeys>
__device__ __forceinline__ void gather_bin_of(ForKeys&& for_keys, uint32_t mask, uint32_t prefix, int* count,
                                              uint32_t* list) {
  for_keys([&](uint32_t u) {
    if ((u & mask) == prefix) {
      const int slot = atomicAdd(count, 1);
      if (slot < 32) list[slot] = u;
    }
  });
}

// ... over the keys key_at(i) of [0, n), THREADS threads of the block sharing the loop.
template <int THREADS, typename KeyAt>
__device__ __forceinline__ void gather_bin(int n, KeyAt&& key_at, uint32_t mask, uint32_t prefix, int* count,
                                           uint32_t* list) {
  gather_bin_of([&](auto&& f) {
    for (int i = threadIdx.x; i < n; i += THREADS) f(key_at(i));
  }, mask, prefix, count, list);
}

// Shared scratch of block_radix_threshold.
struct BlockRadixShared {
  int bin, above, n, need;
  uint32_t thr;
  uint32_t list[32];
};

// The k-th largest (0 < k < n) of n order-preserving keys held in shared memory by one
// block of THREADS threads, for the fused short-row step (short_step.cuh): 11-bit radix
// passes from the highest bit where kmin and kmax differ, over a block-wide histogram of
// 2,048 bins (`hist`, shared memory), until the threshold's bin holds at most 32 keys,
// which one warp ranks exactly. On return (every thread) `prefix` is the threshold key
// and `need_eq` how many keys equal to it are taken (the lowest-indexed first), the rule
// of select_pages_kernel and of the cluster selection.
template <int THREADS>
__device__ __forceinline__ void block_radix_threshold(const uint32_t* keys, int n, int k, uint32_t kmin,
                                                      uint32_t kmax, int* hist, uint64_t* warp_tot,
                                                      BlockRadixShared& sh, uint32_t& prefix, int& need_eq) {
  constexpr int kBins = 2048;
  const int tid = threadIdx.x;
  prefix = kmin;
  int remaining = k;
  if (kmin != kmax) {
    const int high_bit = 31 - __clz(kmin ^ kmax);
    uint32_t mask = high_bit == 31 ? 0u : ~((2u << high_bit) - 1u);
    prefix = kmin & mask;
    for (int top = high_bit;;) {
      const int shift = max(top - 10, 0);
      const uint32_t bmask = (2u << (top - shift)) - 1u;
      for (int i = tid; i < kBins; i += THREADS) hist[i] = 0;
      __syncthreads();
      for (int i = tid; i < n; i += THREADS) {
        const uint32_t u = keys[i];
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & bmask], 1);
      }
      __syncthreads();
      find_threshold_bin<kBins, THREADS>(hist, remaining, warp_tot, sh.bin, sh.above);
      __syncthreads();
      remaining -= sh.above;
      prefix |= (uint32_t)sh.bin << shift;
      mask |= bmask << shift;
      const int bin_count = hist[sh.bin];
      if (tid == 0) sh.n = 0;
      __syncthreads();  // the histogram and sh.bin are rewritten below
      if (shift == 0) break;  // every bit is fixed: the threshold is the prefix itself
      if (bin_count <= 32) {
        gather_bin<THREADS>(n, [&](int i) { return keys[i]; }, mask, prefix, &sh.n, sh.list);
        __syncthreads();
        if (tid < 32) warp_rank_threshold(sh.list, sh.n, remaining, sh.thr, sh.need);
        __syncthreads();
        prefix = sh.thr;
        remaining = sh.need;
        break;
      }
      top = shift - 1;
    }
  }
  need_eq = remaining;
}

// Ordered compaction, shared by the select kernels: items 0..n-1 in output order, each
// definite (taken: above the threshold, or forced) or equal to the threshold (taken only
// while fewer than need_eq equal items precede it) or neither. A taken item's position is
// (#definite before) + min(#equal before, need_eq) if definite, and (#definite before) +
// (#equal before) if equal.
//
// A warp walks its items in rounds of 32 (lane l: item 32 r + l of its run) and counts
// them with ballots; the three steps below are shared by ordered_compact and the register
// select (select_pages_kernel), which holds its whole row as one such run a warp.

// Step 1: the definite / equal ballots of rounds 0..n_rounds-1 (n_rounds warp-uniform;
// the unrolled loop stops there) and this warp's counts. classify(r, def, eq) flags this
// lane's item of round r.
template <int R, typename Classify>
__device__ __forceinline__ void ballot_rounds(int n_rounds, uint32_t (&dm)[R], uint32_t (&em)[R], int& wd, int& we,
                                              Classify&& classify) {
  wd = 0;
  we = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= n_rounds) break;
    bool d = false, e = false;
    classify(r, d, e);
    dm[r] = __ballot_sync(0xffffffffu, d);
    em[r] = __ballot_sync(0xffffffffu, e);
    wd += __popc(dm[r]);
    we += __popc(em[r]);
  }
}

// Step 2: one block barrier exchanges the warps' (definite, equal) counts, packed in one
// Word (uint32_t: 16 bits each, for at most 65,535 items; uint64_t: 32 bits each) through
// tot[WARPS]; every warp then scans them itself for its own offsets and the total.
template <int WARPS, typename Word>
__device__ __forceinline__ void scan_warp_counts(int wd, int we, uint64_t* tot, int& def_before, int& eq_before,
                                                 int& def_total, int& eq_total) {
  constexpr int kShift = int(sizeof(Word)) * 4;
  constexpr Word kLow = (Word(1) << kShift) - 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) tot[warp] = (uint64_t)(((Word)we << kShift) | (Word)wd);
  __syncthreads();
  const Word x = lane < WARPS ? (Word)tot[lane] : Word(0);
  const Word incl = warp_inclusive_scan(x, lane);
  const Word excl = __shfl_sync(0xffffffffu, incl - x, warp);
  const Word total = __shfl_sync(0xffffffffu, incl, 31);
  def_before = (int)(excl & kLow);
  eq_before = (int)(excl >> kShift);
  def_total = (int)(total & kLow);
  eq_total = (int)(total >> kShift);
}

// Step 3: emit(r, pos) for this lane's taken item of each round r < n_rounds, given the
// definite / equal items before the warp's first. SKIP_EMPTY: most rounds take nothing (a
// row keeps a few percent of its candidates), so skip their bookkeeping (the test is
// uniform across the warp, and their counts add nothing). Measured (NOTES.md v16): the
// select kernel at 32k keys 24.0 -> 21.6 us (ncu, H200); the cluster kernel ran 1 us
// slower with it (H100), so it does not.
template <int R, bool SKIP_EMPTY, typename Emit>
__device__ __forceinline__ void emit_taken(int n_rounds, const uint32_t (&dm)[R], const uint32_t (&em)[R], int def_before,
                                           int eq_before, int need_eq, Emit&& emit) {
  const int lane = threadIdx.x & 31;
  const uint32_t lt = (1u << lane) - 1u;  // lanes below this one
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= n_rounds) break;
    if (SKIP_EMPTY && (dm[r] | em[r]) == 0u) continue;
    const int d_lane = def_before + __popc(dm[r] & lt), e_lane = eq_before + __popc(em[r] & lt);
    int pos = -1;
    if (dm[r] >> lane & 1u) {
      pos = d_lane + min(e_lane, need_eq);
    } else if ((em[r] >> lane & 1u) && e_lane < need_eq) {
      pos = d_lane + e_lane;
    }
    if (pos >= 0) emit(r, pos);
    def_before += __popc(dm[r]);
    eq_before += __popc(em[r]);
  }
}

// The compaction of n items in chunks of WARPS * 32 * R: warp w of a chunk takes R rounds
// of 32 consecutive items, so shared-memory keys are read without bank conflicts; one
// block barrier a chunk (double-buffered in warp_tot, which must hold 2 * WARPS values).
// classify(i, def, eq) flags item i; emit(i, pos) receives each taken item. base_def /
// base_eq: the definite and equal items before item 0 (the cluster kernel's earlier
// slices); on return, those counts past the last item.
template <int WARPS, int R, bool SKIP_EMPTY, typename Classify, typename Emit>
__device__ __forceinline__ void ordered_compact(int n, int need_eq, int& base_def, int& base_eq, uint64_t* warp_tot,
                                                Classify&& classify, Emit&& emit) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kChunk = WARPS * 32 * R;
  int parity = 0;
  for (int chunk = 0; chunk < n; chunk += kChunk, parity ^= 1) {
    const int w0 = chunk + warp * 32 * R;
    uint32_t dm[R], em[R];
    int wd, we;
    ballot_rounds<R>(R, dm, em, wd, we, [&](int r, bool& d, bool& e) {
      const int i = w0 + 32 * r + lane;
      if (i < n) classify(i, d, e);
    });
    int def_before, eq_before, def_total, eq_total;
    scan_warp_counts<WARPS, uint64_t>(wd, we, warp_tot + parity * WARPS, def_before, eq_before, def_total, eq_total);
    emit_taken<R, SKIP_EMPTY>(R, dm, em, base_def + def_before, base_eq + eq_before, need_eq,
                              [&](int r, int pos) { emit(w0 + 32 * r + lane, pos); });
    base_def += def_total;
    base_eq += eq_total;
  }
}

}  // namespace hydra
