// Sparse decode attention, and the fused short-row step, for head dim 128 (one
// translation unit per head dim keeps each compile, and its errors, separate).
#include "short_step.cuh"
#include "sparse_decode.cuh"

namespace hydra {

void launch_sparse_decode_d128(const DecodeParams& p, cudaStream_t stream) {
  launch_sparse_decode_dim<128>(p, stream);
}

bool short_step_fits_d128(int n_pages, int rows, int splits, int dtype) {
  return short_step_fits<128>(n_pages, rows, splits, dtype);
}

void launch_short_step_d128(const ScoreParams& sp, const DecodeParams& p, cudaStream_t stream) {
  launch_short_step_dim<128>(sp, p, stream);
}

}  // namespace hydra
