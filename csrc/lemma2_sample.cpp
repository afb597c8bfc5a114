// scop::lemma2_sample, the part every backend shares: argument checks, the Philox key read from
// the seed tensor, and the combination of the drawn normals into the bias pair.
#include <cmath>

#include "scop.h"

namespace scop {

at::Tensor lemma2_combine(const at::Tensor& z, const at::Tensor& R, double gamma) {
  const at::Tensor shared = z.select(1, 0) * std::sqrt(gamma);
  const at::Tensor rotated = at::matmul(z.select(1, 1), R.t());
  return at::stack({shared + rotated, shared - rotated}, 1);
}

void check_lemma2_args(const at::Tensor& R, double gamma, int64_t n, const at::Tensor& seed) {
  TORCH_CHECK(R.dim() == 2 && R.size(0) == R.size(1), "scop: R must be square (C, C), got ",
              R.sizes());
  TORCH_CHECK(at::isFloatingType(R.scalar_type()), "scop: R must be floating point");
  TORCH_CHECK(gamma >= 0.0, "scop: gamma must be >= 0, got ", gamma);
  TORCH_CHECK(std::isfinite(gamma), "scop: gamma must be finite, got ", gamma);
  TORCH_CHECK(n >= 0, "scop: n must be >= 0, got ", n);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "scop: seed must be a one-element int64 CPU tensor");
}

uint64_t seed_from_tensor(const at::Tensor& seed) {
  return static_cast<uint64_t>(seed.item<int64_t>());
}

}  // namespace scop
