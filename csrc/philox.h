// Philox4x32-10 (Salmon et al., SC'11): a counter-based generator, so every output element
// is a pure function of (key, index). The CPU and CUDA samplers share this header and
// therefore produce the same bits for the same key on every device.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SCOP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SCOP_HOST_DEVICE inline
#endif

namespace scop {

struct Uint4 {
  uint32_t x, y, z, w;
};

SCOP_HOST_DEVICE Uint4 philox4x32_10(Uint4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kBump0 = 0x9E3779B9u, kBump1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kBump0;
      k1 += kBump1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * ctr.x;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * ctr.z;
    ctr = Uint4{static_cast<uint32_t>(p1 >> 32) ^ ctr.y ^ k0, static_cast<uint32_t>(p1),
                static_cast<uint32_t>(p0 >> 32) ^ ctr.w ^ k1, static_cast<uint32_t>(p0)};
  }
  return ctr;
}

// Uniform in the open interval (0, 1): never 0, so log() below is finite.
SCOP_HOST_DEVICE double open_uniform(uint32_t bits) {
  return (static_cast<double>(bits) + 0.5) * (1.0 / 4294967296.0);
}

// Four standard normals for Philox block `block` under key `seed`, by Box-Muller in double
// precision (double keeps CPU libm and CUDA's math library within an ulp of each other, so
// the values agree to the output dtype's precision on every device).
SCOP_HOST_DEVICE void philox_normal4(uint64_t seed, uint64_t block, double out[4]) {
  const Uint4 r = philox4x32_10(
      Uint4{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const double r0 = sqrt(-2.0 * log(open_uniform(r.x)));
  const double r1 = sqrt(-2.0 * log(open_uniform(r.z)));
  const double a0 = kTwoPi * open_uniform(r.y);
  const double a1 = kTwoPi * open_uniform(r.w);
  out[0] = r0 * cos(a0);
  out[1] = r0 * sin(a0);
  out[2] = r1 * cos(a1);
  out[3] = r1 * sin(a1);
}

}  // namespace scop
