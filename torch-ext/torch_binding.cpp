// Op schemas. Every tensor an op writes is marked `!`; all ops return nothing.
#include <torch/library.h>

#include "registration.h"
#include "torch_binding.h"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  // k [B, Hkv, Tkv, D] -> out [B, Hkv, n_pages, 2, D] (min, max per page): k's dtype (exact),
  // or float8_e4m3fn codes of k * summary_scale rounded outward (a power of two; see common.cuh).
  ops.def(
      "page_summaries(Tensor k, Tensor? cache_seqlens, Tensor? cache_leftpad, int page_size, float summary_scale, "
      "Tensor! out) -> ()");
  ops.impl("page_summaries", c10::kCUDA, &page_summaries);

  // cache_leftpad (int32 [B], optional): each sequence's valid tokens are [leftpad, seqlen);
  // pages count from the first valid token.

  // Decode page selection -> pages [B, Hkv, budget_tokens / page_size], ascending, -1 padded.
  ops.def(
      "select_pages(Tensor q, Tensor k, Tensor? summaries, Tensor? super_summaries, Tensor? cache_seqlens, "
      "Tensor? cache_leftpad, "
      "int page_size, int superpage, int shortlist_pages, int sink_tokens, int recent_tokens, int budget_tokens, "
      "Tensor! pages) -> ()");
  ops.impl("select_pages", c10::kCUDA, &select_pages);

  // One decode step. pages given: attend over them. Else budget_tokens > 0: select, then
  // attend. Else attend over [L - window, L) (window 0: every token < L).
  ops.def(
      "decode(Tensor q, Tensor k, Tensor v, Tensor? pages, Tensor? summaries, Tensor? super_summaries, "
      "Tensor? cache_seqlens, Tensor? cache_leftpad, int page_size, int superpage, int shortlist_pages, "
      "int sink_tokens, "
      "int recent_tokens, int budget_tokens, int window, float scale, Tensor! out, Tensor! lse) -> ()");
  ops.impl("decode", c10::kCUDA, &decode);

  // The same step returning a new out (B, Hq, 1, D) and fp32 lse (B, Hq, 1).
  ops.def(
      "decode_alloc(Tensor q, Tensor k, Tensor v, Tensor? pages, Tensor? summaries, Tensor? super_summaries, "
      "Tensor? cache_seqlens, Tensor? cache_leftpad, int page_size, int superpage, int shortlist_pages, "
      "int sink_tokens, "
      "int recent_tokens, int budget_tokens, int window, float scale) -> (Tensor, Tensor)");
  ops.impl("decode_alloc", c10::kCUDA, &decode_alloc);

  // HydraKVCache writes. k/v [B, Hkv, n, D] into caches [B, Hkv, max_seq_len, D],
  // summaries [B, Hkv, max_pages, 2, D] (k's dtype, or float8_e4m3fn codes of k * summary_scale),
  // lengths [B] int32, overflow [1] int32.
  ops.def(
      "cache_prefill(Tensor k, Tensor v, Tensor? seqlens, int page_size, Tensor! k_cache, Tensor! v_cache, "
      "Tensor! summaries, Tensor! lengths, Tensor! overflow, float summary_scale) -> ()");
  ops.impl("cache_prefill", c10::kCUDA, &cache_prefill);
  ops.def(
      "cache_append(Tensor k_new, Tensor v_new, Tensor? counts, int page_size, Tensor! k_cache, Tensor! v_cache, "
      "Tensor! summaries, Tensor!? super_summaries, int superpage, Tensor! lengths, Tensor! overflow, "
      "float summary_scale) -> ()");
  ops.impl("cache_append", c10::kCUDA, &cache_append);

  // HydraKVCache.step: append one token per sequence (k_new/v_new [B, Hkv, 1, D]), then
  // decode q over the grown cache (the append is fused into selection when it selects).
  ops.def(
      "decode_append(Tensor q, Tensor k_new, Tensor v_new, Tensor! k_cache, Tensor! v_cache, Tensor! summaries, "
      "Tensor!? super_summaries, Tensor! lengths, Tensor! overflow, int page_size, int superpage, "
      "int shortlist_pages, int sink_tokens, int recent_tokens, int budget_tokens, int window, float scale, "
      "float summary_scale, Tensor! out, Tensor! lse) -> ()");
  ops.impl("decode_append", c10::kCUDA, &decode_append);
  // The same step returning a new out (B, Hq, 1, D) and fp32 lse (B, Hq, 1).
  ops.def(
      "decode_append_alloc(Tensor q, Tensor k_new, Tensor v_new, Tensor! k_cache, Tensor! v_cache, "
      "Tensor! summaries, Tensor!? super_summaries, Tensor! lengths, Tensor! overflow, int page_size, int superpage, "
      "int shortlist_pages, int sink_tokens, int recent_tokens, int budget_tokens, int window, float scale, "
      "float summary_scale) -> (Tensor, Tensor)");
  ops.impl("decode_append_alloc", c10::kCUDA, &decode_append_alloc);

  // Causal prefill (Tq <= Tkv, queries bottom-right aligned) over 64-token key blocks:
  // budget_tokens > 0 with Tkv > budget selects blocks; otherwise every block up to the
  // diagonal (window > 0: a sliding window). out [B, Hq, Tq, D], lse [B, Hq, Tq] fp32.
  ops.def(
      "prefill(Tensor q, Tensor k, Tensor v, int sink_tokens, int recent_tokens, int budget_tokens, int window, "
      "float scale, Tensor! out, Tensor! lse) -> ()");
  ops.impl("prefill", c10::kCUDA, &prefill);
  // The prefill's block selection alone: blocks [B, Hkv, ceil(Tq / 64), budget_tokens / 64].
  ops.def(
      "prefill_blocks(Tensor q, Tensor k, int sink_tokens, int recent_tokens, int budget_tokens, Tensor! blocks) "
      "-> ()");
  ops.impl("prefill_blocks", c10::kCUDA, &prefill_blocks);
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
