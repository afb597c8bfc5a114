// CUDA kernel of the Lemma 2 bias sampler: the same Philox stream as the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../philox.h"
#include "../scop.h"

namespace scop {
namespace {

template <typename scalar_t>
__global__ void philox_normal_kernel(scalar_t* __restrict__ z, int64_t total, uint64_t key) {
  const int64_t blocks = (total + 3) / 4;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double v[4];
    philox_normal4(key, static_cast<uint64_t>(b), v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * b + j < total) z[4 * b + j] = static_cast<scalar_t>(v[j]);
    }
  }
}

at::Tensor lemma2_sample_cuda(const at::Tensor& R, double gamma, int64_t n, const at::Tensor& seed) {
  check_lemma2_args(R, gamma, n, seed);
  const c10::cuda::CUDAGuard guard(R.device());
  // The key is read on the host: a captured graph would replay this draw's key every time and
  // repeat [b, b~] silently, so capture is refused rather than wrong.
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "scop: lemma2_sample cannot run during CUDA graph capture (its Philox key is read on the "
              "host, so every replay would repeat the captured draw); draw the knockoff bias outside the graph");
  const uint64_t key = seed_from_tensor(seed);
  at::Tensor z = at::empty({n, 2, R.size(0)}, R.options());
  const int64_t total = z.numel();
  if (total > 0) {
    const int64_t blocks = (total + 3) / 4;
    const int threads = 256;
    const int grid = static_cast<int>(std::min<int64_t>((blocks + threads - 1) / threads, 65535));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "lemma2_sample_cuda", [&] {
      philox_normal_kernel<scalar_t><<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          z.data_ptr<scalar_t>(), total, key);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return lemma2_combine(z, R, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(scop, CUDA, m) {
  m.impl("lemma2_sample", &lemma2_sample_cuda);
}

}  // namespace scop
