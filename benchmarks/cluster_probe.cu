// Thread-block cluster costs on this GPU, for designing cluster kernels (benchmarks/NOTES.md v11).
//
//   nvcc -std=c++17 -arch=sm_90a -O3 -o /tmp/cluster_probe benchmarks/cluster_probe.cu && /tmp/cluster_probe
//
// Prints, for cluster sizes 2..16 and a few shared-memory sizes per CTA, how many clusters
// can be resident at once (cudaOccupancyMaxActiveClusters), then the time of one
// cluster.sync() and of one dependent distributed-shared-memory load (a pointer chase
// through another CTA's shared memory), both from clock64() over many repetitions.
#include <cooperative_groups.h>
#include <cstdio>
#include <cuda_runtime.h>

namespace cg = cooperative_groups;

#define CHECK(x)                                                                      \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      std::printf("%s failed: %s\n", #x, cudaGetErrorString(e_));                     \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

__global__ void empty_kernel() {
  extern __shared__ int smem[];
  if (threadIdx.x == 1u << 30) smem[0] = 0;
}

// cycles[blockIdx.x] = clock64 cycles per cluster.sync() (n syncs), per remote load (n loads).
__global__ void probe_kernel(long long* cycles, int n) {
  __shared__ int ring[256];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) ring[i] = (i * 97 + 13) & 255;  // a permutation chase
  cluster.sync();
  long long t0 = clock64();
  for (int i = 0; i < n; ++i) cluster.sync();
  long long t1 = clock64();
  int idx = 0;
  if (threadIdx.x == 0) {
    const int* remote = cluster.map_shared_rank(ring, (rank + 1) % cluster.num_blocks());
    for (int i = 0; i < n; ++i) idx = remote[idx];
  }
  long long t2 = clock64();
  cluster.sync();  // the neighbour's shared memory stays valid until every load is done
  if (threadIdx.x == 0) {
    cycles[2 * blockIdx.x] = (t1 - t0) / n;
    cycles[2 * blockIdx.x + 1] = (t2 - t1) / n + (idx == 1 << 30);  // keep the chase live
  }
}

// A launch configuration with clusters of `cluster` CTAs along x; cfg points into attr,
// so the object is not copied.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  ClusterLaunch(int cluster, int grid, int threads, size_t smem) {
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

int main() {
  int dev = 0, sms = 0, clock_khz = 0;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev));
  std::printf("%s: %d SMs, max smem per block %zu B\n", prop.name, sms, prop.sharedMemPerBlockOptin);
  CHECK(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CHECK(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(prop.sharedMemPerBlockOptin)));
  const int smem_kb[] = {48, 100, 141, 200};
  std::printf("max active clusters (threads 256) by cluster size x smem per CTA:\n");
  for (int c = 2; c <= 16; c *= 2) {
    std::printf("  cluster %2d:", c);
    for (int kb : smem_kb) {
      ClusterLaunch launch(c, c * 64, 256, size_t(kb) * 1024);
      int n = -1;
      cudaError_t e = cudaOccupancyMaxActiveClusters(&n, empty_kernel, &launch.cfg);
      if (e != cudaSuccess) {
        cudaGetLastError();
        std::printf("  %3d KB: -", kb);
      } else {
        std::printf("  %3d KB: %3d (%3d CTAs)", kb, n, n * c);
      }
    }
    std::printf("\n");
  }
  long long* d_cycles = nullptr;
  CHECK(cudaMalloc(&d_cycles, sizeof(long long) * 2 * 16));
  CHECK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  for (int c = 2; c <= 16; c *= 2) {
    for (int threads : {256, 1024}) {
      ClusterLaunch launch(c, c, threads, 0);
      const int n = 2000;
      CHECK(cudaLaunchKernelEx(&launch.cfg, probe_kernel, d_cycles, n));  // warm-up
      CHECK(cudaLaunchKernelEx(&launch.cfg, probe_kernel, d_cycles, n));
      CHECK(cudaDeviceSynchronize());
      long long h[2 * 16];
      CHECK(cudaMemcpy(h, d_cycles, sizeof(long long) * 2 * c, cudaMemcpyDeviceToHost));
      long long sync_max = 0, load_max = 0;
      for (int i = 0; i < c; ++i) {
        sync_max = h[2 * i] > sync_max ? h[2 * i] : sync_max;
        load_max = h[2 * i + 1] > load_max ? h[2 * i + 1] : load_max;
      }
      std::printf("cluster %2d, %4d threads: cluster.sync %lld cycles, dependent DSMEM load %lld cycles "
                  "(%.0f / %.0f ns at the %d MHz base clock)\n",
                  c, threads, sync_max, load_max, sync_max * 1e6 / clock_khz, load_max * 1e6 / clock_khz,
                  clock_khz / 1000);
    }
  }
  CHECK(cudaFree(d_cycles));
  return 0;
}
