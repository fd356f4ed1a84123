// HydraKVCache writes: prefill (copy a prompt and build every page summary in one
// pass) and append (write new tokens and fold them into the affected pages'
// summaries in one launch). Summaries are exact elementwise min/max, so folding
// new tokens into a page's summary equals recomputing it.
#include "common.cuh"

namespace hydra {

constexpr int kCacheThreads = 128;

// Grid (ceil(max_pages / pages_per_cta), Hkv, B): D/8 threads per page, one
// 16-byte vector per token each. Covers every page of the cache, so pages past
// the new length are reset to the empty summary (+inf / -inf).
template <int D, typename E, bool FP8>
__global__ void __launch_bounds__(kCacheThreads) cache_prefill_kernel(CacheWriteParams p) {
  constexpr int kThreadsPerPage = D / 8;
  constexpr int kPagesPerCta = kCacheThreads / kThreadsPerPage;
  const int b = blockIdx.z, h = blockIdx.y;
  const int page = blockIdx.x * kPagesPerCta + threadIdx.x / kThreadsPerPage;
  const int d0 = (threadIdx.x % kThreadsPerPage) * 8;
  int L = p.counts != nullptr ? p.counts[b] : p.n_src;
  L = L < 0 ? 0 : (L > p.n_src ? p.n_src : L);
  if (blockIdx.x == 0 && h == 0 && threadIdx.x == 0) p.lengths[b] = L;
  if (page >= p.max_pages) return;

  const bf16_t* ks = p.k_src + b * p.ks_batch_stride + h * p.ks_head_stride + d0;
  const bf16_t* vs = p.v_src + b * p.vs_batch_stride + h * p.vs_head_stride + d0;
  bf16_t* kc = p.k_cache + b * p.kc_batch_stride + h * p.kc_head_stride + d0;
  bf16_t* vc = p.v_cache + b * p.vc_batch_stride + h * p.vc_head_stride + d0;
  float mn[8], mx[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) { mn[i] = __int_as_float(0x7f800000); mx[i] = -mn[i]; }
  const int t1 = min(page * p.page_size + p.page_size, L);
#pragma unroll 4
  for (int t = page * p.page_size; t < t1; ++t) {
    const uint4 kv = ldg16(ks + t * p.ks_row_stride);
    *reinterpret_cast<uint4*>(kc + t * p.kc_row_stride) = kv;
    *reinterpret_cast<uint4*>(vc + t * p.vc_row_stride) = ldg16(vs + t * p.vs_row_stride);
    float f[8];
    unpack8<E>(kv, f);
#pragma unroll
    for (int i = 0; i < 8; ++i) { mn[i] = fminf(mn[i], f[i]); mx[i] = fmaxf(mx[i], f[i]); }
  }
  const int64_t at = b * p.s_batch_stride + h * p.s_head_stride + page * p.s_page_stride + d0;
  store_summary8_at<E, FP8>(p.summaries, at, D, p.fmt.scale, mn, mx);
}

// Grid (B): one CTA per sequence handles every KV head, so the length it reads at
// the start and advances at the end is not raced by another CTA.
template <int D, typename E, bool FP8>
__global__ void __launch_bounds__(kCacheThreads) cache_append_kernel(CacheWriteParams p) {
  constexpr int kChunks = D / 8;  // 16-byte vectors per row
  const int b = blockIdx.x, tid = threadIdx.x;
  const int L = p.lengths[b];
  int cnt = p.counts != nullptr ? p.counts[b] : p.n_src;
  cnt = cnt < 0 ? 0 : (cnt > p.n_src ? p.n_src : cnt);
  if (L + cnt > p.max_seq_len) {  // drop what does not fit and say so
    if (tid == 0) atomicExch(p.overflow, 1);
    cnt = max(0, p.max_seq_len - L);
  }
  // New rows: (head, token, chunk) flattened over the CTA.
  for (int idx = tid; idx < p.Hkv * cnt * kChunks; idx += kCacheThreads) {
    const int c = idx % kChunks, row = idx / kChunks;
    const int h = row / cnt, i = row % cnt;
    const int d0 = c * 8;
    const int64_t t = L + i;
    *reinterpret_cast<uint4*>(p.k_cache + b * p.kc_batch_stride + h * p.kc_head_stride + t * p.kc_row_stride + d0) =
        ldg16(p.k_src + b * p.ks_batch_stride + h * p.ks_head_stride + (int64_t)i * p.ks_row_stride + d0);
    *reinterpret_cast<uint4*>(p.v_cache + b * p.vc_batch_stride + h * p.vc_head_stride + t * p.vc_row_stride + d0) =
        ldg16(p.v_src + b * p.vs_batch_stride + h * p.vs_head_stride + (int64_t)i * p.vs_row_stride + d0);
  }
  // Affected pages (then superpages): fold the new tokens into each one's summary.
  // Summaries past the length are empty (+inf / -inf), so a new page folds from there.
  for (int level = 0; level < (p.super_summaries != nullptr ? 2 : 1) && cnt > 0; ++level) {
    const int span = level == 0 ? p.page_size : p.page_size * p.superpage;
    bf16_t* const base = level == 0 ? p.summaries : p.super_summaries;
    const int64_t sb = level == 0 ? p.s_batch_stride : p.ss_batch_stride;
    const int64_t sh = level == 0 ? p.s_head_stride : p.ss_head_stride;
    const int64_t sp = level == 0 ? p.s_page_stride : p.ss_page_stride;
    const int p0 = L / span, p1 = (L + cnt - 1) / span;
    const int n_pg = p1 - p0 + 1;
    for (int idx = tid; idx < p.Hkv * n_pg * kChunks; idx += kCacheThreads) {
      const int c = idx % kChunks, pair = idx / kChunks;
      const int h = pair / n_pg, page = p0 + pair % n_pg;
      const int d0 = c * 8;
      // Element offset; e4m3 summaries are bytes, so the same offset addresses them.
      const int64_t at = b * sb + h * sh + page * sp + d0;
      void* s = FP8 ? static_cast<void*>(reinterpret_cast<uint8_t*>(base) + at) : static_cast<void*>(base + at);
      float mn[8], mx[8];
      load_summary8<E, FP8>(s, D, mn, mx);
      const int t0 = max(page * span, L), t1 = min(page * span + span, L + cnt);
      const bf16_t* ks = p.k_src + b * p.ks_batch_stride + h * p.ks_head_stride + d0;
      const float scale = FP8 ? p.fmt.scale : 1.f;
      for (int t = t0; t < t1; ++t) {
        float f[8];
        unpack8<E>(ldg16(ks + (int64_t)(t - L) * p.ks_row_stride), f);
#pragma unroll
        for (int e = 0; e < 8; ++e) { mn[e] = fminf(mn[e], f[e] * scale); mx[e] = fmaxf(mx[e], f[e] * scale); }
      }
      // e4m3: rounding outward after the fold equals folding the rounded key into the
      // stored (already rounded) bound, so appends in any grouping give the same codes.
      store_summary8<E, FP8>(s, D, mn, mx);
    }
  }
  __syncthreads();  // every thread has read L
  if (tid == 0) p.lengths[b] = L + cnt;
}

void launch_cache_prefill(const CacheWriteParams& p, cudaStream_t stream) {
  HYDRA_DISPATCH_HEAD_DIM(p.D, kD, [&] {
    constexpr int kPagesPerCta = kCacheThreads / (kD / 8);
    dim3 grid((p.max_pages + kPagesPerCta - 1) / kPagesPerCta, p.Hkv, p.B);
    HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
      if (p.fmt.fp8) cache_prefill_kernel<kD, E, true><<<grid, kCacheThreads, 0, stream>>>(p);
      else cache_prefill_kernel<kD, E, false><<<grid, kCacheThreads, 0, stream>>>(p);
    });
    check_launch("cache_prefill_kernel");
  });
}

void launch_cache_append(const CacheWriteParams& p, cudaStream_t stream) {
  HYDRA_DISPATCH_HEAD_DIM(p.D, kD, [&] {
    HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
      if (p.fmt.fp8) cache_append_kernel<kD, E, true><<<p.B, kCacheThreads, 0, stream>>>(p);
      else cache_append_kernel<kD, E, false><<<p.B, kCacheThreads, 0, stream>>>(p);
    });
    check_launch("cache_append_kernel");
  });
}

}  // namespace hydra
