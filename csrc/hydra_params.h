// Plain parameter structs for hydra's kernels. No torch here: the binding in
// torch-ext/hydra_torch.cpp fills these from tensors, the launchers in csrc/*.cu
// read them. Strides are in elements; the last (head) dimension is contiguous.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace hydra {

using bf16_t = uint16_t;  // 16-bit element bits (bf16 or fp16, per the params' dtype)
constexpr int kDtypeBf16 = 0;
constexpr int kDtypeF16 = 1;

// How page summaries are stored. fp8 == 0: in the keys' 16-bit type, exact. fp8 == 1:
// e4m3 codes of (key * scale), rounded outward (common.cuh); the summary tensor is then
// bytes, and its strides count bytes. scale is a power of two: the same for every page of
// a row, it changes no ranking, and it keeps large keys inside e4m3's +-448.
struct SummaryFormat {
  int fp8 = 0;
  float scale = 1.f;
};

// page_summaries: min/max of the keys over each page's valid tokens.
struct SummaryParams {
  int dtype;             // kDtypeBf16 or kDtypeF16 (every 16-bit tensor of the call)
  const bf16_t* k;       // [B, Hkv, Tkv, D]
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  const int* seqlens;    // [B] valid lengths, or nullptr (every sequence is Tkv long)
  const int* leftpad;    // [B] first valid position (left padding), or nullptr (0)
  bf16_t* out;           // [B, Hkv, n_pages, 2, D]: min row then max row; pages past L: +inf / -inf
  int64_t o_batch_stride, o_head_stride, o_page_stride;  // the (2, D) block is contiguous
  int B, Hkv, Tkv, D, n_pages, page_size;
  SummaryFormat fmt;     // 16-bit (k's type) or e4m3 codes of k * scale (out is then bytes)
};

// HydraKVCache writes (prefill and append).
struct CacheWriteParams {
  int dtype;             // kDtypeBf16 or kDtypeF16 (every 16-bit tensor of the call)
  const bf16_t* k_src;   // [B, Hkv, n_src, D] new keys
  const bf16_t* v_src;   // [B, Hkv, n_src, D] new values
  int64_t ks_batch_stride, ks_head_stride, ks_row_stride;
  int64_t vs_batch_stride, vs_head_stride, vs_row_stride;
  bf16_t* k_cache;       // [B, Hkv, max_seq_len, D]
  bf16_t* v_cache;       // [B, Hkv, max_seq_len, D]
  int64_t kc_batch_stride, kc_head_stride, kc_row_stride;
  int64_t vc_batch_stride, vc_head_stride, vc_row_stride;
  bf16_t* summaries;     // [B, Hkv, max_pages, 2, D]: min row then max row (bytes when fmt.fp8)
  int64_t s_batch_stride, s_head_stride, s_page_stride;
  SummaryFormat fmt;     // of summaries and super_summaries
  bf16_t* super_summaries;  // [B, Hkv, max_super, 2, D] superpage min/max, or nullptr
  int64_t ss_batch_stride, ss_head_stride, ss_page_stride;
  int superpage;         // fine pages per superpage (when super_summaries is set)
  int* lengths;          // [B] valid lengths: set by prefill, advanced by append
  const int* counts;     // [B] tokens of src to take per sequence, or nullptr (all n_src)
  int* overflow;         // [1] set to 1 when an append would pass max_seq_len (the excess is dropped)
  int B, Hkv, D, n_src, max_seq_len, max_pages, page_size;
};

// Page scoring: Quest's bound summed over the GQA group, for candidate pages only
// (pages between the sink pages and the first recent page).
//
// Coarse-to-fine selection (superpage > 1) runs scoring twice. Stage 1 scores
// superpages (summaries = superpage summaries; scores indexed by superpage) over the
// superpages that hold a candidate page. Stage 2 (shortlist set) scores the fine pages
// of the shortlisted superpages: scores[c] for compact slot c = slot * superpage + j
// is fine page shortlist[slot] * superpage + j, or -inf when that is not a candidate.
struct ScoreParams {
  int dtype;             // kDtypeBf16 or kDtypeF16 (every 16-bit tensor of the call)
  const bf16_t* q;       // [B, Hq, D]
  int64_t q_batch_stride, q_head_stride;
  const bf16_t* summaries;  // [B, Hkv, >= n_pages, 2, D], or nullptr: score straight from k
  int64_t s_batch_stride, s_head_stride, s_page_stride;
  SummaryFormat fmt;     // of summaries (and of the fused append's writes)
  const bf16_t* k;       // [B, Hkv, Tkv, D] (read only when summaries == nullptr)
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  const int* seqlens;    // [B] or nullptr
  const int* leftpad;    // [B] first valid position, or nullptr (0); positions count from it
  float* scores;         // [B, Hkv, n_pages] fp32; only candidate entries are written
  int B, Hq, Hkv, group, Tkv, D, n_pages, page_size;
  int sink_pages, recent_tokens, n_sel;
  // Fused append (HydraKVCache.step): the step's length is seqlens[b] + len_add, and the
  // token at seqlens[b] (k_new) is folded into its page's bound when that page is
  // scored. With append.k_src set (flat, or coarse-to-fine stage 1), one extra CTA per
  // (b, h) (blockIdx.x == 0) writes the token's K/V row and folds it into
  // the page (and superpage) summaries, concurrently with the scoring CTAs.
  int len_add;
  const bf16_t* k_new;   // [B, Hkv, 1, D] or nullptr
  int64_t kn_batch_stride, kn_head_stride;
  CacheWriteParams append;
  int superpage;         // 0: flat; > 1: coarse-to-fine stage 1 (shortlist null) or 2
  const int* shortlist;  // [B, Hkv, n_short] ascending superpages, -1 padded (stage 2)
  int n_short;
};

// Top-k selection over the scores, plus sink and recent pages by index arithmetic.
// mode 0 (flat): scores indexed by page; out = sinks, the top pages, recents.
// mode 1 (coarse-to-fine stage 1): scores indexed by superpage; out = the top n_out
//   superpages holding a candidate page (the shortlist), no forced entries.
// mode 2 (stage 2): scores[c] over the compact slots of the shortlist (-inf: not a
//   candidate); out = sinks, the top fine pages, recents.
struct SelectParams {
  int dtype;             // kDtypeBf16 or kDtypeF16 (every 16-bit tensor of the call)
  const float* scores;   // see mode
  const int* seqlens;    // [B] or nullptr
  const int* leftpad;    // [B] first valid position, or nullptr (0)
  int* pages;            // [B, Hkv, n_out] ascending indices, -1 padded
  int* counters;         // [B * Hkv] split-merge counters to zero for the attention kernel, or nullptr
  int B, Hkv, Tkv, n_pages, page_size;
  int sink_pages, recent_tokens, n_sel;  // n_sel: the fine-page budget
  int mode, n_out, superpage, n_scores;  // n_scores: length of each (b, h) score row
  const int* shortlist;  // mode 2: [B, Hkv, n_short]
  int n_short;
  // Fused append: the step's lengths seqlens[b] + len_add (clamped to Tkv) go to
  // lens_out (when set) for the attention kernel.
  int len_add;
  int* lens_out;         // [B] or nullptr
};

// Split-KV sparse decode attention. One CTA per (split, KV head, sequence)
// handles the whole GQA group, so each selected K/V byte is read once.
struct DecodeParams {
  int dtype;             // kDtypeBf16 or kDtypeF16 (every 16-bit tensor of the call)
  const bf16_t* q;       // [B, Hq, D]
  int64_t q_batch_stride, q_head_stride;
  const bf16_t* k;       // [B, Hkv, Tkv, D]
  const bf16_t* v;       // [B, Hkv, Tkv, D]
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  // Explicit mode: [B, Hkv, n_entries] int32 page list (ascending; -1 and repeats
  // of the previous entry are skipped). nullptr: range mode, where entry e is page
  // first_page(b) + e and first_page covers max(0, L - window) (window 0: all of L).
  const int* pages;
  int64_t p_batch_stride, p_head_stride;
  const int* seqlens;    // [B] or nullptr
  const int* leftpad;    // [B] first valid position, or nullptr (0): pages count from it
  bf16_t* out;           // [B, Hq, D]
  int64_t o_batch_stride, o_head_stride;
  float* lse;            // [B, Hq] natural-log sum-exp of the scaled scores
  float* part_o;         // [B, Hq, n_splits, D] normalised partial outputs (n_splits > 1)
  float* part_lse;       // [B, Hq, n_splits] partial log2-sum-exp
  int* counters;         // [B * Hkv] zero on entry; the last CTA of each head merges and re-zeroes
  int* lengths_out;      // [B] or nullptr: the fused append's cache lengths, advanced to L here
  int B, Hq, Hkv, group, Tkv, D, page_size, log2_page;
  int n_entries, window, n_splits, entries_per_split;
  float scale_log2;      // softmax scale * log2(e)
  // Set after a selection launch: the rows every selected list holds (sink pages, the
  // recent window) go to L2 before the CTAs wait on the selection. l2_prefetch: 0 off,
  // 1 on (the launcher keeps it only with programmatic dependent launch, sm_90+, and
  // unless HYDRA_L2_PREFETCH=0). Lengths: seq_len(prefetch_seqlens, b, Tkv,
  // prefetch_len_add), the selection's own (the attention's may not be written yet).
  int l2_prefetch;
  const int* prefetch_seqlens;
  int prefetch_len_add, prefetch_sink_tokens, prefetch_recent_tokens;
  // Set by the launcher: 1 unless HYDRA_L2_PREFETCH=0. The K/V copies are evict_first in
  // L2 (each byte is read once a step), so that the prefetched rows stay until read.
  int l2_evict_first;
};

// Causal prefill over key blocks of 64 tokens (Tq <= Tkv; query t sits at key position
// Tkv - Tq + t). Query block i (rows 64i .. 64i+63) attends either a selected list of key
// blocks (`blocks` set: ascending, -1 padded, shared by the KV head's query heads) or the
// range of blocks up to its last query (a sliding `window` > 0 bounds it from below),
// token-causally, with keys >= Tkv never read.
constexpr int kPrefillBlock = 64;
constexpr int kMaxPrefillList = 1024;  // entries of a block list (budget_tokens / 64)
struct PrefillParams {
  int dtype;             // kDtypeBf16 or kDtypeF16
  const bf16_t* q;       // [B, Hq, Tq, D]
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  const bf16_t* k;       // [B, Hkv, Tkv, D]
  const bf16_t* v;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  const bf16_t* summaries;  // [B, Hkv, nbk, 2, D] key block min/max (selection)
  int64_t s_batch_stride, s_head_stride, s_page_stride;
  int* blocks;           // [B, Hkv, nbq, n_list] selected key blocks, or nullptr: range mode
  int n_list;
  bf16_t* out;           // [B, Hq, Tq, D]
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  float* lse;            // [B, Hq, Tq] natural-log sum-exp, contiguous
  int B, Hq, Hkv, group, Tq, Tkv, D, nbq, nbk;
  int sink_blocks, local_back, window;
  float scale_log2;
};

void launch_page_summaries(const SummaryParams& p, cudaStream_t stream);
void launch_prefill_select(const PrefillParams& p, cudaStream_t stream);
void launch_prefill_attention(const PrefillParams& p, cudaStream_t stream);
void launch_cache_prefill(const CacheWriteParams& p, cudaStream_t stream);
void launch_cache_append(const CacheWriteParams& p, cudaStream_t stream);
void launch_score_pages(const ScoreParams& p, cudaStream_t stream);
void launch_select_pages(const SelectParams& p, cudaStream_t stream);
// The current device's SM count and L2 size in bytes (cached per device).
int device_sm_count();
int64_t device_l2_bytes();
// Flat selection from cached summaries over a thread-block cluster (score_select_cluster.cu),
// for `rows` (sequence, KV head) rows of n_pages pages of page_bytes summary bytes each:
// CTAs a cluster, keys each CTA holds, and whether the cluster also scores (fused: 16-bit
// summaries) or only selects from the scores launch_score_pages wrote just before it.
// ctas == 0 when no cluster applies here (before sm_90, short rows, more rows than one
// wave of clusters, too little shared memory, HYDRA_CLUSTER_SELECT=0).
struct ClusterPlan {
  int ctas = 0;
  int keys = 0;
  bool fused = false;
};
ClusterPlan plan_score_select_cluster(int n_pages, int rows, int page_bytes, bool fp8);
void launch_score_select_cluster(const ScoreParams& sp, const SelectParams& se, const ClusterPlan& plan,
                                 cudaStream_t stream);
void launch_sparse_decode(const DecodeParams& p, cudaStream_t stream);
// The whole flat step from cached summaries (16-bit or e4m3) in one cluster launch
// (short_step.cuh), for rows of up to 1,024 pages: whether it runs `rows` rows in clusters
// of `splits` CTAs on the current device (sm_90+, every cluster resident at once;
// HYDRA_SHORT_STEP=0 turns it off), and the launch (sp: the selection's parameters, p:
// the attention's, with n_splits CTAs a cluster).
bool short_step_fits(int D, int n_pages, int rows, int splits, int dtype);
void launch_short_step(const ScoreParams& sp, const DecodeParams& p, cudaStream_t stream);

// Entries (pages) a split may hold: the split's page indices are staged in shared memory.
constexpr int kMaxEntriesPerSplit = 512;
// Tokens per attention tile.
constexpr int kTileTokens = 64;

}  // namespace hydra
