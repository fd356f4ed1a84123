// Sparse decode attention for head dim 256 (one translation unit per head dim keeps
// each compile, and its errors, separate).
#include "sparse_decode.cuh"

namespace hydra {

void launch_sparse_decode_d256(const DecodeParams& p, cudaStream_t stream) {
  launch_sparse_decode_dim<256>(p, stream);
}

}  // namespace hydra
