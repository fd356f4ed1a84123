// Scoring from e4m3 page summaries on the tensor cores, shared by score_pages_e4m3_kernel
// (score_select.cu) and the fused short step (short_step.cuh), so that both give the
// same floats for a page.
//
// A page's score is a dot product of its summary row [min (D) | max (D)] with the
// group's folded query w = [qneg (D) | qpos (D)], so 16 pages are one m16n8k16 GEMV tile
// per 16 dims: A = 16 summary rows (e4m3 codes converted to fp16, exactly), B = w split
// into three fp16 parts (columns 0-2: w rounded, then the rounding rests: 33 significant
// bits, so scores match the fp32 rule to fp32 rounding), fp32 accumulate; score =
// C[:, 0] + C[:, 1] + C[:, 2]. A thread's A elements come straight from global memory:
// lane (g, c) of a warp holds dims 8c..8c+7 of every 32-dim segment of rows g and g + 8
// (one 8-byte load per row and segment). The dot product does not care which fragment
// slot holds which dim, as long as B's slots hold w's same dims, so the fragments need no
// shuffles and no shared memory, and unpacking costs one cvt per two codes. A row's
// score does not depend on where in a tile it sits.
// Rare rows are rescored exactly in fp32 by their four lanes: the fused append's page
// (its new key folded in) and rows holding a saturated code (read as +-2^64, which fp16
// cannot hold).
#pragma once

#include "mma.cuh"
#include "select_common.cuh"

namespace hydra {

template <int D>
struct E4m3Shape {
  static constexpr int kSegs = 2 * D / 32;                     // 32-dim segments of a summary row
  static constexpr int kGroup = kSegs <= 8 ? kSegs : 8;        // segments loaded at once
  static_assert(kSegs % kGroup == 0, "segment groups");
};

// The group's folded query w = [qneg | qpos] (fp32) into sw[2 * D] (shared memory), and a
// power of two into s_scale that keeps w's fp16 parts finite. Every thread of the block
// calls it (two block barriers); the block has at least D / 8 threads.
template <int D, typename E>
__device__ __forceinline__ void e4m3_fold_query(const ScoreParams& p, int b, int h, float* sw, float& s_scale) {
  const int tid = threadIdx.x, lane = tid & 31;
  if (tid < D / 8) {
    float qpos[8], qneg[8];
    group_query_bounds<E>(p, b, h, tid * 8, qpos, qneg);
#pragma unroll
    for (int i = 0; i < 8; ++i) { sw[tid * 8 + i] = qneg[i]; sw[D + tid * 8 + i] = qpos[i]; }
  }
  __syncthreads();
  if (tid < 32) {
    float m = 0.f;
    for (int i = lane; i < 2 * D; i += 32) m = fmaxf(m, fabsf(sw[i]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float sc = 1.f;
    while (m * sc > 16384.f) sc *= 0.0625f;
    if (lane == 0) s_scale = sc;
  }
  __syncthreads();
}

// This lane's B fragments: chunk 2s + j of segment s covers dims 32s + 8c + 4j .. +3;
// lane group g = 0, 1, 2 holds w's three fp16 parts, g >= 3 zeros.
template <int D>
__device__ __forceinline__ void e4m3_fragments(const float* sw, float scale,
                                               uint32_t (&bfrag)[E4m3Shape<D>::kSegs][2][2]) {
  using MT = F16;  // the MMA's input type
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int sg = 0; sg < E4m3Shape<D>::kSegs; ++sg) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int d = 32 * sg + 8 * c + 4 * j;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float w0 = sw[d + 2 * r] * scale, w1 = sw[d + 2 * r + 1] * scale;
        // Columns 0, 1, 2: w rounded to fp16, then what that left, then what is left.
        const uint32_t p0 = pack2<MT>(w0, w1);
        const float r0 = w0 - MT::lo(p0), r1 = w1 - MT::hi(p0);
        const uint32_t p1 = pack2<MT>(r0, r1);
        const uint32_t p2 = pack2<MT>(r0 - MT::lo(p1), r1 - MT::hi(p1));
        bfrag[sg][j][r] = g == 0 ? p0 : g == 1 ? p1 : g == 2 ? p2 : 0u;
      }
    }
  }
}

// One warp scores TILES tiles of 16 slots, x0 + 16 t .. x0 + 16 t + 15. page_of(x): the
// page of slot x, or -1 (nothing to score); store(x, page, score) is called by lanes c == 0
// for every slot of the tiles (page -1 where there is none). append_page: the page the
// fused append's key folds into, or -1. Warp-uniform control flow: every lane calls it.
template <int D, typename E, int TILES, typename PageOf, typename Store>
__device__ __forceinline__ void e4m3_score_tiles(const ScoreParams& p, int b, int h, const float* sw, float scale,
                                                 const uint32_t (&bfrag)[E4m3Shape<D>::kSegs][2][2], int x0,
                                                 int append_page, PageOf&& page_of, Store&& store) {
  using MT = F16;
  constexpr int kSegs = E4m3Shape<D>::kSegs, kGroup = E4m3Shape<D>::kGroup;
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int64_t s_row = b * p.s_batch_stride + h * p.s_head_stride;
  auto row_ptr = [&](int page) -> const uint8_t* {
    return reinterpret_cast<const uint8_t*>(p.summaries) + (s_row + (int64_t)page * p.s_page_stride);  // bytes
  };
  // Every row load of the warp's tiles is issued before the first MMA (kGroup segments
  // at a time: all of them, except at D = 256, in two halves).
  int pa[TILES], pb[TILES];
  const uint8_t* ra[TILES];
  const uint8_t* rb[TILES];
  float acc[TILES][4];
  uint32_t sat[TILES];  // e4m3: a saturated code in row g (bit 0) or g + 8 (bit 1)
#pragma unroll
  for (int t = 0; t < TILES; ++t) {
    pa[t] = page_of(x0 + 16 * t + g);
    pb[t] = page_of(x0 + 16 * t + g + 8);
    ra[t] = pa[t] >= 0 ? row_ptr(pa[t]) : nullptr;
    rb[t] = pb[t] >= 0 ? row_ptr(pb[t]) : nullptr;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
    sat[t] = 0u;
  }
#pragma unroll
  for (int s0 = 0; s0 < kSegs; s0 += kGroup) {
    uint2 ua[TILES][kGroup], ub[TILES][kGroup];
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int off = 32 * (s0 + i) + 8 * c;  // bytes
        // 256-byte DRAM fetches: each load takes one 32-byte sector of 8 rows, and the
        // warp's next loads take the rest of the rows. H100 A/B (NOTES.md v15): B = 1 131k
        // step 47.0 -> 44.4 us, B = 8 145.8 -> 140.2, B = 32 at 32k 283.9 -> 277.4.
        ua[t][i] = ra[t] ? ldg8_hint<LoadHint::kL2Fetch256>(ra[t] + off) : make_uint2(0u, 0u);
        ub[t][i] = rb[t] ? ldg8_hint<LoadHint::kL2Fetch256>(rb[t] + off) : make_uint2(0u, 0u);
      }
    }
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const uint32_t pat = 32 * (s0 + i) < D ? 0xfefefefeu : 0x7e7e7e7eu;  // min rows: -448; max rows: 448
        sat[t] |= (__vcmpeq4(ua[t][i].x, pat) | __vcmpeq4(ua[t][i].y, pat)) ? 1u : 0u;
        sat[t] |= (__vcmpeq4(ub[t][i].x, pat) | __vcmpeq4(ub[t][i].y, pat)) ? 2u : 0u;
        uint32_t a[4], a2[4];
        e4m3x4_to_half2x2(ua[t][i].x, a[0], a[2]);
        e4m3x4_to_half2x2(ub[t][i].x, a[1], a[3]);
        e4m3x4_to_half2x2(ua[t][i].y, a2[0], a2[2]);
        e4m3x4_to_half2x2(ub[t][i].y, a2[1], a2[3]);
        mma_16816<MT>(acc[t], a, bfrag[s0 + i][0][0], bfrag[s0 + i][0][1]);
        mma_16816<MT>(acc[t], a2, bfrag[s0 + i][1][0], bfrag[s0 + i][1][1]);
      }
    }
  }

#pragma unroll
  for (int t = 0; t < TILES; ++t) {
    // Lane (g, c) holds columns 2c, 2c + 1 of rows g (acc[0..1]) and g + 8 (acc[2..3]):
    // columns 0-2 sit in lanes c = 0 and 1.
    float score[2] = {acc[t][0] + acc[t][1], acc[t][2] + acc[t][3]};
    score[0] += __shfl_xor_sync(0xffffffffu, score[0], 1);
    score[1] += __shfl_xor_sync(0xffffffffu, score[1], 1);
    score[0] /= scale;
    score[1] /= scale;
    // Rare rows: rescored exactly in fp32 by the row's four lanes (uniform control flow).
    uint32_t st = sat[t];
    st |= __shfl_xor_sync(0xffffffffu, st, 1);
    st |= __shfl_xor_sync(0xffffffffu, st, 2);
    const bool rare_a = (st & 1u) || (pa[t] >= 0 && pa[t] == append_page);
    const bool rare_b = (st & 2u) || (pb[t] >= 0 && pb[t] == append_page);
    if (__any_sync(0xffffffffu, rare_a || rare_b)) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int pg = r == 0 ? pa[t] : pb[t];
        const bool rare = r == 0 ? rare_a : rare_b;
        float part = 0.f;
        if (rare && pg >= 0) {
          const uint8_t* row = r == 0 ? ra[t] : rb[t];
          for (int ch = c; ch < D / 8; ch += 4) {  // 8-dim chunk of the min row and of the max row
            float mn[8], mx[8];
            load_summary8<E, true>(row + ch * 8, D, mn, mx);
            if (pg == append_page) {
              float f[8], lo[8], hi[8];
              unpack8<E>(ldg16(p.k_new + b * p.kn_batch_stride + h * p.kn_head_stride + ch * 8), f);
#pragma unroll
              for (int d = 0; d < 8; ++d) f[d] *= p.fmt.scale;  // the key as the append stores it
              unpack8_e4m3<false>(pack8_e4m3<false>(f), lo);
              unpack8_e4m3<true>(pack8_e4m3<true>(f), hi);
#pragma unroll
              for (int d = 0; d < 8; ++d) { mn[d] = fminf(mn[d], lo[d]); mx[d] = fmaxf(mx[d], hi[d]); }
            }
#pragma unroll
            for (int d = 0; d < 8; ++d) part += sw[ch * 8 + d] * mn[d] + sw[D + ch * 8 + d] * mx[d];
          }
        }
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        part += __shfl_xor_sync(0xffffffffu, part, 2);
        if (rare) score[r] = part;
      }
    }
    if (c == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) store(x0 + 16 * t + g + 8 * r, r == 0 ? pa[t] : pb[t], score[r]);
    }
  }
}

}  // namespace hydra
