// CPU kernel of the Lemma 2 bias sampler: Philox normals filled in parallel, then one GEMM.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../philox.h"
#include "../scop.h"

namespace scop {
namespace {

at::Tensor lemma2_sample_cpu(const at::Tensor& R, double gamma, int64_t n, const at::Tensor& seed) {
  check_lemma2_args(R, gamma, n, seed);
  const uint64_t key = seed_from_tensor(seed);
  at::Tensor z = at::empty({n, 2, R.size(0)}, R.options());
  const int64_t total = z.numel();
  const int64_t blocks = (total + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, R.scalar_type(), "lemma2_sample_cpu", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
      double v[4];
      for (int64_t b = begin; b < end; ++b) {
        philox_normal4(key, static_cast<uint64_t>(b), v);
        for (int j = 0; j < 4 && 4 * b + j < total; ++j) {
          zp[4 * b + j] = static_cast<scalar_t>(v[j]);
        }
      }
    });
  });
  return lemma2_combine(z, R, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(scop, CPU, m) {
  m.impl("lemma2_sample", &lemma2_sample_cpu);
}

}  // namespace scop
