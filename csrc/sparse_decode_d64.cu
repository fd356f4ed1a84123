// Sparse decode attention, and the fused short-row step, for head dim 64 (one
// translation unit per head dim keeps each compile, and its errors, separate).
#include "short_step.cuh"
#include "sparse_decode.cuh"

namespace hydra {

void launch_sparse_decode_d64(const DecodeParams& p, cudaStream_t stream) {
  launch_sparse_decode_dim<64>(p, stream);
}

bool short_step_fits_d64(int n_pages, int rows, int splits, int dtype) {
  return short_step_fits<64>(n_pages, rows, splits, dtype);
}

void launch_short_step_d64(const ScoreParams& sp, const DecodeParams& p, cudaStream_t stream) {
  launch_short_step_dim<64>(sp, p, stream);
}

}  // namespace hydra
