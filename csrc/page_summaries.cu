// Page summaries: elementwise min and max of the keys over each page's valid tokens.
#include "common.cuh"

namespace hydra {

constexpr int kSummaryThreads = 128;

// Grid (ceil(n_pages / pages_per_cta), Hkv, B). D/8 threads cover one page's
// D dims with one 16-byte load per token each; a CTA works on 128/(D/8) pages.
template <int D, typename E, bool FP8>
__global__ void __launch_bounds__(kSummaryThreads) page_summaries_kernel(SummaryParams p) {
  constexpr int kThreadsPerPage = D / 8;
  constexpr int kPagesPerCta = kSummaryThreads / kThreadsPerPage;
  const int b = blockIdx.z, h = blockIdx.y;
  const int page = blockIdx.x * kPagesPerCta + threadIdx.x / kThreadsPerPage;
  const int d0 = (threadIdx.x % kThreadsPerPage) * 8;
  if (page >= p.n_pages) return;

  const int L_end = seq_len(p.seqlens, b, p.Tkv);
  const int start = seq_start(p.leftpad, b, L_end);
  const int L = L_end - start;
  const int t0 = page * p.page_size;
  const int t1 = min(t0 + p.page_size, L);
  const bf16_t* k = p.k + b * p.k_batch_stride + h * p.k_head_stride + (int64_t)start * p.k_row_stride + d0;

  float mn[8], mx[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) { mn[i] = __int_as_float(0x7f800000); mx[i] = -mn[i]; }
#pragma unroll 4
  for (int t = t0; t < t1; ++t) {
    float f[8];
    unpack8<E>(ldg16(k + t * p.k_row_stride), f);
#pragma unroll
    for (int i = 0; i < 8; ++i) { mn[i] = fminf(mn[i], f[i]); mx[i] = fmaxf(mx[i], f[i]); }
  }
  const int64_t at = b * p.o_batch_stride + h * p.o_head_stride + page * p.o_page_stride + d0;
  store_summary8_at<E, FP8>(p.out, at, D, p.fmt.scale, mn, mx);
}

void launch_page_summaries(const SummaryParams& p, cudaStream_t stream) {
  HYDRA_DISPATCH_HEAD_DIM(p.D, kD, [&] {
    constexpr int kPagesPerCta = kSummaryThreads / (kD / 8);
    dim3 grid((p.n_pages + kPagesPerCta - 1) / kPagesPerCta, p.Hkv, p.B);
    HYDRA_DISPATCH_DTYPE(p.dtype, E, [&] {
      if (p.fmt.fp8) page_summaries_kernel<kD, E, true><<<grid, kSummaryThreads, 0, stream>>>(p);
      else page_summaries_kernel<kD, E, false><<<grid, kSummaryThreads, 0, stream>>>(p);
    });
    check_launch("page_summaries_kernel");
  });
}

}  // namespace hydra
