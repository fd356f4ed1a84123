// Host entry points bound as torch ops (torch_binding.cpp holds the schemas).
#pragma once

#include <optional>
#include <tuple>
#include <ATen/ATen.h>

void page_summaries(const at::Tensor& k, const std::optional<at::Tensor>& cache_seqlens,
                    const std::optional<at::Tensor>& cache_leftpad, int64_t page_size, double summary_scale,
                    at::Tensor& out);

void select_pages(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& summaries,
                  const std::optional<at::Tensor>& super_summaries, const std::optional<at::Tensor>& cache_seqlens,
                  const std::optional<at::Tensor>& cache_leftpad, int64_t page_size, int64_t superpage, int64_t shortlist_pages, int64_t sink_tokens,
                  int64_t recent_tokens, int64_t budget_tokens, at::Tensor& pages);

void decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pages,
            const std::optional<at::Tensor>& summaries, const std::optional<at::Tensor>& super_summaries,
            const std::optional<at::Tensor>& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
            int64_t page_size, int64_t superpage,
            int64_t shortlist_pages, int64_t sink_tokens, int64_t recent_tokens, int64_t budget_tokens,
            int64_t window, double scale, at::Tensor& out, at::Tensor& lse);

// decode() into freshly allocated (out, lse): one op call and no Python-side allocations.
std::tuple<at::Tensor, at::Tensor> decode_alloc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& pages,
                                                const std::optional<at::Tensor>& summaries,
                                                const std::optional<at::Tensor>& super_summaries,
                                                const std::optional<at::Tensor>& cache_seqlens,
                                                const std::optional<at::Tensor>& cache_leftpad, int64_t page_size,
                                                int64_t superpage, int64_t shortlist_pages,
                                                int64_t sink_tokens, int64_t recent_tokens, int64_t budget_tokens,
                                                int64_t window, double scale);

// HydraKVCache: copy a prompt into the cache and build every page summary (prefill), or
// write new tokens and fold them into the affected summaries (append).
void cache_prefill(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& seqlens,
                   int64_t page_size, at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& summaries,
                   at::Tensor& lengths, at::Tensor& overflow, double summary_scale);
void cache_append(const at::Tensor& k_new, const at::Tensor& v_new, const std::optional<at::Tensor>& counts,
                  int64_t page_size, at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& summaries,
                  const std::optional<at::Tensor>& super_summaries, int64_t superpage, at::Tensor& lengths,
                  at::Tensor& overflow, double summary_scale);

// HydraKVCache.step: append one token per sequence (k_new/v_new [B, Hkv, 1, D]) and run
// the decode step over the grown cache. When the step selects pages, the append is
// fused into the first score launch (no extra launch); lengths advance on the device.
void decode_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                   at::Tensor& v_cache, at::Tensor& summaries, const std::optional<at::Tensor>& super_summaries,
                   at::Tensor& lengths, at::Tensor& overflow, int64_t page_size, int64_t superpage,
                   int64_t shortlist_pages, int64_t sink_tokens, int64_t recent_tokens, int64_t budget_tokens,
                   int64_t window, double scale, double summary_scale, at::Tensor& out, at::Tensor& lse);

// decode_append() into freshly allocated (out, lse): HydraKVCache.step's one op call.
std::tuple<at::Tensor, at::Tensor> decode_append_alloc(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache, at::Tensor& v_cache,
    at::Tensor& summaries, const std::optional<at::Tensor>& super_summaries, at::Tensor& lengths,
    at::Tensor& overflow, int64_t page_size, int64_t superpage, int64_t shortlist_pages, int64_t sink_tokens,
    int64_t recent_tokens, int64_t budget_tokens, int64_t window, double scale, double summary_scale);

void prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t sink_tokens,
             int64_t recent_tokens, int64_t budget_tokens, int64_t window, double scale, at::Tensor& out,
             at::Tensor& lse);
void prefill_blocks(const at::Tensor& q, const at::Tensor& k, int64_t sink_tokens, int64_t recent_tokens,
                    int64_t budget_tokens, at::Tensor& blocks);
