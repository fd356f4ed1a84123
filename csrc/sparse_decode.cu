// Split-KV sparse decode attention: argument checks and the head-dim dispatch. The
// kernel is in sparse_decode.cuh, instantiated once per head dim in sparse_decode_d*.cu.
#include "sparse_decode.cuh"

namespace hydra {

void launch_sparse_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.pages != nullptr && p.entries_per_split > kMaxEntriesPerSplit) {
    throw std::invalid_argument("hydra: entries_per_split=" + std::to_string(p.entries_per_split) +
                                " exceeds " + std::to_string(kMaxEntriesPerSplit));
  }
  if (p.group < 1 || p.group > 16) {
    throw std::invalid_argument("hydra: unsupported GQA group size Hq/Hkv=" + std::to_string(p.group) +
                                " (supported: 1 to 16)");
  }
  switch (p.D) {
    case 64: launch_sparse_decode_d64(p, stream); return;
    case 128: launch_sparse_decode_d128(p, stream); return;
    case 256: launch_sparse_decode_d256(p, stream); return;
    default:
      throw std::invalid_argument("hydra: unsupported head dim D=" + std::to_string(p.D) +
                                  " (supported: 64, 128, 256)");
  }
}

}  // namespace hydra
