// Small device helpers shared by hydra's kernels: bf16/fp16 unpacking, cp.async,
// and the dispatch macros where runtime values meet compile-time constants.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "hydra_params.h"

namespace hydra {

// Element types. Tensors hold 16-bit values (bf16 or fp16); kernels take the type as
// a template parameter and convert in registers.
// bf16 -> fp32 is a 16-bit shift, exact; fp32 -> bf16 rounds to nearest even.
struct Bf16 {
  static constexpr bool kHalf = false;
  __device__ static __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ static __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  __device__ static __forceinline__ uint32_t bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
  }
};
// fp16 through the hardware conversions (round to nearest even).
struct F16 {
  static constexpr bool kHalf = true;
  __device__ static __forceinline__ float lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  __device__ static __forceinline__ float hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ static __forceinline__ uint32_t bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <typename E>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  f[0] = E::lo(u.x); f[1] = E::hi(u.x);
  f[2] = E::lo(u.y); f[3] = E::hi(u.y);
  f[4] = E::lo(u.z); f[5] = E::hi(u.z);
  f[6] = E::lo(u.w); f[7] = E::hi(u.w);
}

template <typename E>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) { return E::bits(lo) | (E::bits(hi) << 16); }

template <typename E>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(pack2<E>(f[0], f[1]), pack2<E>(f[2], f[3]), pack2<E>(f[4], f[5]), pack2<E>(f[6], f[7]));
}

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Read-only global loads with a cache hint, for the score kernels' summary rows (read once
// a step). kNoL1: no L1 allocation; kL2Fetch256: the L2 fetches 256 bytes from DRAM on a
// miss. Which one pays depends on the kernel and grid: benchmarks/NOTES.md v15 has the
// H100 A/B. volatile keeps the loads in program order, issued before their first use, as
// measured.
enum class LoadHint { kDefault, kNoL1, kL2Fetch256 };

// (16-byte loads with the 256-byte fetch lost in every measured use: NOTES.md v15-v16.)
template <LoadHint H>
__device__ __forceinline__ uint4 ldg16_hint(const void* p) {
  static_assert(H != LoadHint::kL2Fetch256, "no 16-byte form of the 256-byte fetch");
  uint4 r;
  if constexpr (H == LoadHint::kNoL1) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  } else {
    r = ldg16(p);
  }
  return r;
}

template <LoadHint H>
__device__ __forceinline__ uint2 ldg8_hint(const void* p) {
  uint2 r;
  if constexpr (H == LoadHint::kNoL1) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  } else if constexpr (H == LoadHint::kL2Fetch256) {
    asm volatile("ld.global.nc.L2::256B.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  } else {
    r = __ldg(reinterpret_cast<const uint2*>(p));
  }
  return r;
}

// 8-bit page summaries (fp8 e4m3, OCP "fn" variant: no infinities, largest finite 448),
// rounded outward so the Quest bound still holds: a page minimum is stored as the largest
// e4m3 value <= it, a maximum as the smallest e4m3 value >= it. Codes are sign-magnitude
// bytes; magnitudes 0..126 are finite (127 is NaN and never written).
// Saturation: a minimum below -448 is stored as -448 and a maximum above 448 as 448, and
// the scorer reads those two codes (-448 as a minimum, 448 as a maximum) as -/+2^64, so a
// key outside the range still gets a valid bound (its page just scores high).
constexpr float kE4m3Saturated = 18446744073709551616.0f;  // 2^64

// Largest magnitude code whose value is <= a (a >= 0), at most 126.
__device__ __forceinline__ uint32_t e4m3_mag_floor(float a) {
  if (!(a > 0.f)) return 0u;
  if (a < 0.015625f) return static_cast<uint32_t>(floorf(a * 512.f));  // subnormals: m * 2^-9
  const uint32_t u = __float_as_uint(a);
  const int e = int((u >> 23) & 0xffu) - 127 + 7;  // e4m3 biased exponent, >= 1 here
  if (e > 15) return 126u;
  const uint32_t m = (uint32_t(e) << 3) | ((u >> 20) & 7u);
  return m > 126u ? 126u : m;
}
// Smallest magnitude code whose value is >= a (a >= 0); 127 when a > 448.
__device__ __forceinline__ uint32_t e4m3_mag_ceil(float a) {
  if (!(a > 0.f)) return 0u;
  if (a < 0.015625f) return static_cast<uint32_t>(ceilf(a * 512.f));  // 8 is 2^-6, the first normal
  const uint32_t u = __float_as_uint(a);
  const int e = int((u >> 23) & 0xffu) - 127 + 7;
  if (e > 15) return 127u;
  uint32_t m = (uint32_t(e) << 3) | ((u >> 20) & 7u);
  if (u & 0xfffffu) ++m;  // bits below e4m3's 3 mantissa bits: round up (carries into the exponent)
  return m > 127u ? 127u : m;
}
// x rounded down (a page minimum) / up (a page maximum) to an e4m3 code.
__device__ __forceinline__ uint32_t e4m3_down(float x) {
  if (x >= 0.f) return e4m3_mag_floor(x);
  const uint32_t m = e4m3_mag_ceil(-x);
  return 0x80u | (m > 126u ? 126u : m);
}
__device__ __forceinline__ uint32_t e4m3_up(float x) {
  if (x >= 0.f) { const uint32_t m = e4m3_mag_ceil(x); return m > 126u ? 126u : m; }
  const uint32_t m = e4m3_mag_floor(-x);
  return m == 0u ? 0u : (0x80u | m);
}
// Four e4m3 codes (bytes of w, lowest first) -> two fp16x2 words (codes 0,1 and 2,3),
// exactly (every e4m3 value is an fp16 value).
__device__ __forceinline__ void e4m3x4_to_half2x2(uint32_t w, uint32_t& h01, uint32_t& h23) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h01) : "h"(static_cast<unsigned short>(w & 0xffffu)));
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h23) : "h"(static_cast<unsigned short>(w >> 16)));
#else
  // Byte -> fp16 bits (sign, then the 7 magnitude bits one place below fp16's exponent
  // field): the fp16 value is the e4m3 value / 256 (biases 15 and 7), normals and
  // subnormals alike; the multiply by 256 is exact.
  const uint32_t lo = __byte_perm(w, 0u, 0x1404), hi = __byte_perm(w, 0u, 0x3424);
  uint32_t ba = (lo & 0x80008000u) | ((lo & 0x7f007f00u) >> 1);
  uint32_t bb = (hi & 0x80008000u) | ((hi & 0x7f007f00u) >> 1);
  const __half2 k256 = __float2half2_rn(256.f);
  __half2 a = __hmul2(*reinterpret_cast<const __half2*>(&ba), k256);
  __half2 b = __hmul2(*reinterpret_cast<const __half2*>(&bb), k256);
  h01 = *reinterpret_cast<const uint32_t*>(&a);
  h23 = *reinterpret_cast<const uint32_t*>(&b);
#endif
}
// Four e4m3 codes -> fp32 values, exactly.
__device__ __forceinline__ void e4m3x4_to_float(uint32_t w, float* f) {
  uint32_t h01, h23;
  e4m3x4_to_half2x2(w, h01, h23);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&h01));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&h23));
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
}
// Eight codes of a page minimum (IS_MAX false) or maximum, as the scorer reads them.
template <bool IS_MAX>
__device__ __forceinline__ void unpack8_e4m3(const uint2& u, float (&f)[8]) {
  e4m3x4_to_float(u.x, f);
  e4m3x4_to_float(u.y, f + 4);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (IS_MAX) f[i] = f[i] == 448.f ? kE4m3Saturated : f[i];
    else f[i] = f[i] == -448.f ? -kE4m3Saturated : f[i];
  }
}
// Eight floats -> eight codes rounded down (minima) or up (maxima).
template <bool UP>
__device__ __forceinline__ uint2 pack8_e4m3(const float (&f)[8]) {
  uint32_t c[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) c[i] = UP ? e4m3_up(f[i]) : e4m3_down(f[i]);
  return make_uint2(c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24), c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24));
}
// A summary row of 8 dims (min and max) as fp32, from 16-bit values (E) or e4m3 codes.
// `smem` rows are D elements apart (min row, then max row).
template <typename E, bool FP8>
__device__ __forceinline__ void load_summary8(const void* row, int D, float (&mn)[8], float (&mx)[8]) {
  if constexpr (FP8) {
    const uint8_t* r = reinterpret_cast<const uint8_t*>(row);
    unpack8_e4m3<false>(*reinterpret_cast<const uint2*>(r), mn);
    unpack8_e4m3<true>(*reinterpret_cast<const uint2*>(r + D), mx);
  } else {
    const bf16_t* r = reinterpret_cast<const bf16_t*>(row);
    unpack8<E>(*reinterpret_cast<const uint4*>(r), mn);
    unpack8<E>(*reinterpret_cast<const uint4*>(r + D), mx);
  }
}
// Store 8 dims of a summary (min row, then max row D elements later): 16-bit values
// (exact: min/max of bf16 values are bf16 values) or e4m3 codes rounded outward.
template <typename E, bool FP8>
__device__ __forceinline__ void store_summary8(void* row, int D, const float (&mn)[8], const float (&mx)[8]) {
  if constexpr (FP8) {
    uint8_t* r = reinterpret_cast<uint8_t*>(row);
    *reinterpret_cast<uint2*>(r) = pack8_e4m3<false>(mn);
    *reinterpret_cast<uint2*>(r + D) = pack8_e4m3<true>(mx);
  } else {
    bf16_t* r = reinterpret_cast<bf16_t*>(row);
    *reinterpret_cast<uint4*>(r) = pack8<E>(mn);
    *reinterpret_cast<uint4*>(r + D) = pack8<E>(mx);
  }
}

// The same at element offset `at` of a summary tensor of either dtype (its element is a
// byte for e4m3): e4m3 codes are of the values times `scale` (a power of two: exact),
// rounded outward; 16-bit summaries ignore it.
template <typename E, bool FP8>
__device__ __forceinline__ void store_summary8_at(void* base, int64_t at, int D, float scale, float (&mn)[8],
                                                  float (&mx)[8]) {
  if constexpr (FP8) {
#pragma unroll
    for (int i = 0; i < 8; ++i) { mn[i] *= scale; mx[i] *= scale; }
    store_summary8<E, true>(reinterpret_cast<uint8_t*>(base) + at, D, mn, mx);
  } else {
    store_summary8<E, false>(reinterpret_cast<bf16_t*>(base) + at, D, mn, mx);
  }
}

// 16-byte asynchronous copy global -> shared; src_bytes == 0 zero-fills and reads nothing.
// L1: the copy goes through L1 (cp.async.ca) rather than L2 only (.cg). Measured with ncu
// on an H100 (NOTES.md v23): the attention's .cg copies made the L2 serve 1.5 times the
// sectors they copy into its padded tiles (2 times into swizzled ones); through L1 it
// serves each sector once. L1 adds latency to every copy.
// HINT: the copy carries the L2 cache policy `pol` (an l2_evict_first_policy()).
template <bool L1 = false, bool HINT = false>
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes, uint64_t pol = 0) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if constexpr (HINT && L1) {
    asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(s), "l"(gmem),
                 "r"(src_bytes), "l"(pol));
  } else if constexpr (HINT) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(s), "l"(gmem),
                 "r"(src_bytes), "l"(pol));
  } else if constexpr (L1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
  }
}
// An L2 policy under which the lines an access brings in are the first to be evicted:
// for data read once, so that it does not push out lines that are still to be read.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
// Starts pulling `bytes` (a multiple of 16) at the 16-byte aligned global address gmem
// into L2, without waiting (sm_90+: cp.async.bulk.prefetch; a no-op on older GPUs).
__device__ __forceinline__ void prefetch_l2_bulk(const void* gmem, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(__cvta_generic_to_global(gmem)), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Valid length of sequence b (plus `add` new tokens), clamped to [0, Tkv].
// L2_ONLY: the load skips L1 (ld.global.cg), for a read before pdl_wait().
template <bool L2_ONLY = false>
__device__ __forceinline__ int seq_len(const int* seqlens, int b, int Tkv, int add = 0) {
  if (seqlens == nullptr) return Tkv;
  int L = (L2_ONLY ? __ldcg(seqlens + b) : seqlens[b]) + add;
  return L < 0 ? 0 : (L > Tkv ? Tkv : L);
}

// Left padding (cache_leftpad): sequence b's valid tokens are [start, L). Kernels shift
// their K/V base pointers by `start` rows and work on the L - start tokens after it,
// so pages, sinks and windows count from the first valid token; padding is never read.
template <bool L2_ONLY = false>
__device__ __forceinline__ int seq_start(const int* leftpad, int b, int L) {
  if (leftpad == nullptr) return 0;
  const int s = L2_ONLY ? __ldcg(leftpad + b) : leftpad[b];
  return s < 0 ? 0 : (s > L ? L : s);
}

// First page holding a token of the recent window [L - recent, L); with no window
// (recent_tokens == 0) the page count, so every page (the partial last one included)
// is a candidate.
__device__ __forceinline__ int first_recent_page(int L, int recent_tokens, int page_size) {
  if (recent_tokens <= 0) return (L + page_size - 1) / page_size;
  int lo = L - recent_tokens;
  return (lo > 0 ? lo : 0) / page_size;
}

// Host-side values per device, computed once: each driver query costs about 0.7 us of
// host time, and every decode call sizes its grids with them. fill(dev) returns the
// value (never 0, which marks an empty slot); devices past kMaxDevices are asked every call.
inline constexpr int kMaxDevices = 64;
inline int current_device() {
  int dev = 0;
  cudaGetDevice(&dev);
  return dev;
}
template <typename Fill>
inline int per_device(int (&cache)[kMaxDevices], int dev, Fill&& fill) {
  const bool slot = dev >= 0 && dev < kMaxDevices;
  if (slot && cache[dev] != 0) return cache[dev];
  const int v = fill(dev);
  if (slot) cache[dev] = v;
  return v;
}

// A device attribute, asked once a device (`fallback` where the query gives nothing).
template <cudaDeviceAttr kAttr>
inline int device_attribute(int dev, int fallback) {
  static int cache[kMaxDevices] = {};
  return per_device(cache, dev, [fallback](int d) {
    int v = 0;
    cudaDeviceGetAttribute(&v, kAttr, d);
    return v > 0 ? v : fallback;
  });
}

// Environment switches, read by the callers once a process. A switch is on unless its
// variable starts with '0'; an integer falls back when its variable is unset or empty.
inline bool env_enabled(const char* name) {
  const char* env = std::getenv(name);
  return !(env != nullptr && env[0] == '0');
}
inline int env_int(const char* name, int fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && env[0] != '\0' ? std::atoi(env) : fallback;
}

// The device's multiprocessor count.
inline int sm_count(int dev = current_device()) { return device_attribute<cudaDevAttrMultiProcessorCount>(dev, 1); }

// Shared memory one block may opt into on the device, in bytes. The environment
// variable HYDRA_MAX_SMEM_PER_BLOCK lowers it, so that the configurations chosen for
// GPUs with less shared memory (RTX 30/40/50: ~100 KB) can be tested on any GPU.
inline int max_smem_per_block(int dev = current_device()) {
  static int cache[kMaxDevices] = {};
  return per_device(cache, dev, [](int d) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, d);
    if (const char* env = std::getenv("HYDRA_MAX_SMEM_PER_BLOCK")) {
      const int cap = std::atoi(env);
      if (cap > 0 && cap < v) v = cap;
    }
    return v > 0 ? v : 48 * 1024;
  });
}

// The device's compute capability major version.
inline int cc_major(int dev = current_device()) {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(dev, 1);
}

// Programmatic dependent launch (sm_90+): the decode step's kernels are launched so
// that each can be scheduled while its predecessor finishes; every such kernel calls
// pdl_wait() before it touches memory, which returns once the predecessor grid has
// completed and its writes are visible. On older GPUs both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next kernel in the stream start launching (it still waits in pdl_wait()).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

// Whether launches use programmatic dependent launch: sm_90+ unless HYDRA_PDL=0.
inline bool use_pdl(int dev = current_device()) {
  static int cache[kMaxDevices] = {};  // 1 no, 2 yes
  return per_device(cache, dev, [](int d) { return cc_major(d) >= 9 && env_enabled("HYDRA_PDL") ? 2 : 1; }) == 2;
}

// Launch with the programmatic-dependent-launch attribute where `pdl` (use_pdl()).
template <typename... Params, typename... Args>
inline cudaError_t launch_with_pdl(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                   cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
template <typename... Params, typename... Args>
inline cudaError_t launch_maybe_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, Args&&... args) {
  return launch_with_pdl(use_pdl(), kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

// A launch of C-CTA thread-block clusters: the one place a cluster launch config and
// its attributes are built, for launchers and for residency queries
// (cudaOccupancyMaxActiveClusters). `attr` must outlive the config (it points there); PDL
// is added when asked for.
inline cudaLaunchConfig_t cluster_launch_config(int C, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                                bool pdl, cudaLaunchAttribute (&attr)[2]) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 2 : 1;
  return cfg;
}

// The step's kernels ask for the largest shared-memory carveout, so consecutive kernels
// (scoring uses none, selection and attention ~100-200 KB) run under one SM
// configuration instead of reconfiguring the SMs between launches.
template <typename... Params>
inline void prefer_max_shared(void (*kernel)(Params...)) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared));
}

inline void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("hydra: launching ") + what + " failed: " + cudaGetErrorString(e));
  }
}

}  // namespace hydra

// Runtime value -> compile-time constant. Every switch ends in an error that names
// the value it got: an unhandled case must never fall through to an unwritten output.
#define HYDRA_DISPATCH_HEAD_DIM(D, CONST_NAME, ...)                                        \
  [&] {                                                                                   \
    switch (D) {                                                                          \
      case 64: { constexpr int CONST_NAME = 64; return __VA_ARGS__(); }                   \
      case 128: { constexpr int CONST_NAME = 128; return __VA_ARGS__(); }                 \
      case 256: { constexpr int CONST_NAME = 256; return __VA_ARGS__(); }                 \
      default:                                                                            \
        throw std::invalid_argument("hydra: unsupported head dim D=" + std::to_string(D) + \
                                    " (supported: 64, 128, 256)");                        \
    }                                                                                     \
  }()

// Element type flag (params' `dtype`: kDtypeBf16 or kDtypeF16) -> type E.
#define HYDRA_DISPATCH_DTYPE(FLAG, TYPE_NAME, ...)                                          \
  [&] {                                                                                   \
    switch (FLAG) {                                                                       \
      case hydra::kDtypeBf16: { using TYPE_NAME = hydra::Bf16; return __VA_ARGS__(); }    \
      case hydra::kDtypeF16: { using TYPE_NAME = hydra::F16; return __VA_ARGS__(); }      \
      default:                                                                            \
        throw std::invalid_argument("hydra: unsupported dtype flag " + std::to_string(FLAG)); \
    }                                                                                     \
  }()
