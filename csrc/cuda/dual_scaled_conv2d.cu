// CUDA kernels of the fused dual-branch scaled convolution. Launched on the current stream
// under a device guard; float32/float16/bfloat16 with opmath (float) accumulation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../scop.h"

namespace scop {
namespace {

constexpr int kThreads = 256;

// One thread per real-half element; the knockoff element sits `half` further on in both
// layouts because the batch dimension is outermost in NCHW and NHWC alike.
template <typename scalar_t, typename opmath_t, bool kChannelsLast>
__global__ void mix_forward_kernel(scalar_t* __restrict__ y, scalar_t* __restrict__ diff,
                                   const opmath_t* __restrict__ beta,
                                   const opmath_t* __restrict__ shifts, int64_t n, int64_t c,
                                   int64_t hw) {
  const int64_t half = n * c * hw;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < half;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = kChannelsLast ? i % c : (i / hw) % c;
    const int64_t s = i / (hw * c);
    const opmath_t r = static_cast<opmath_t>(y[i]) + shifts[s * c + ch];
    const opmath_t k = static_cast<opmath_t>(y[i + half]) + shifts[(n + s) * c + ch];
    y[i] = static_cast<scalar_t>(k + beta[ch] * (r - k));
    y[i + half] = static_cast<scalar_t>(k);
    if (diff) diff[i] = static_cast<scalar_t>(r - k);
  }
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// grad_Y_r = beta g_r and grad_Y_k = (1 - beta) g_r + g_k for element i, accumulating
// sum(g_r diff) into dot and the two gradients into sum_r / sum_k.
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ void mix_backward_element(const scalar_t* grad_out, const scalar_t* diff,
                                                     scalar_t* grad_y, int64_t i, int64_t half,
                                                     opmath_t b, opmath_t& dot, opmath_t& sum_r,
                                                     opmath_t& sum_k) {
  const opmath_t g = static_cast<opmath_t>(grad_out[i]);
  const opmath_t a = b * g;
  const opmath_t k = (opmath_t(1) - b) * g + static_cast<opmath_t>(grad_out[i + half]);
  grad_y[i] = static_cast<scalar_t>(a);
  grad_y[i + half] = static_cast<scalar_t>(k);
  sum_r += a;
  sum_k += k;
  if (diff) dot += g * static_cast<opmath_t>(diff[i]);
}

// NCHW: blocks stride over the (sample, channel) planes; a plane's three sums are block reductions.
template <typename scalar_t, typename opmath_t>
__global__ void mix_backward_planes(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ diff,
                                    scalar_t* __restrict__ grad_y, const opmath_t* __restrict__ beta,
                                    opmath_t* __restrict__ part_grad_beta, opmath_t* __restrict__ part_sums,
                                    int64_t n, int64_t c, int64_t hw) {
  const int64_t half = n * c * hw;
  __shared__ opmath_t smem[3][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t plane = blockIdx.x; plane < n * c; plane += gridDim.x) {
    const opmath_t b = beta[plane % c];
    opmath_t dot = 0, sum_r = 0, sum_k = 0;
    for (int64_t q = threadIdx.x; q < hw; q += blockDim.x) {
      mix_backward_element(grad_out, diff, grad_y, plane * hw + q, half, b, dot, sum_r, sum_k);
    }
    dot = warp_sum(dot);
    sum_r = warp_sum(sum_r);
    sum_k = warp_sum(sum_k);
    if (lane == 0) {
      smem[0][warp] = dot;
      smem[1][warp] = sum_r;
      smem[2][warp] = sum_k;
    }
    __syncthreads();
    if (warp == 0) {
      const int warps = blockDim.x / 32;
      dot = lane < warps ? smem[0][lane] : opmath_t(0);
      sum_r = lane < warps ? smem[1][lane] : opmath_t(0);
      sum_k = lane < warps ? smem[2][lane] : opmath_t(0);
      dot = warp_sum(dot);
      sum_r = warp_sum(sum_r);
      sum_k = warp_sum(sum_k);
      if (lane == 0) {
        part_grad_beta[plane] = dot;
        part_sums[plane] = sum_r;
        part_sums[n * c + plane] = sum_k;
      }
    }
    __syncthreads();  // warp 0 has read smem before the next plane overwrites it
  }
}

// NHWC: block (32 channels x 8 pixel lanes) per (channel tile, sample), striding over both when
// the grid is smaller; loads are coalesced along channels and the 8 pixel lanes are reduced
// through shared memory.
template <typename scalar_t, typename opmath_t>
__global__ void mix_backward_rows(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ diff,
                                  scalar_t* __restrict__ grad_y, const opmath_t* __restrict__ beta,
                                  opmath_t* __restrict__ part_grad_beta, opmath_t* __restrict__ part_sums,
                                  int64_t n, int64_t c, int64_t hw) {
  const int64_t half = n * c * hw;
  const int64_t tiles = (c + 31) / 32;
  __shared__ opmath_t smem[3][8][32];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t ch = tile * 32 + threadIdx.x;
    for (int64_t s = blockIdx.y; s < n; s += gridDim.y) {
      opmath_t dot = 0, sum_r = 0, sum_k = 0;
      if (ch < c) {
        const opmath_t b = beta[ch];
        for (int64_t q = threadIdx.y; q < hw; q += blockDim.y) {
          mix_backward_element(grad_out, diff, grad_y, (s * hw + q) * c + ch, half, b, dot, sum_r, sum_k);
        }
      }
      smem[0][threadIdx.y][threadIdx.x] = dot;
      smem[1][threadIdx.y][threadIdx.x] = sum_r;
      smem[2][threadIdx.y][threadIdx.x] = sum_k;
      __syncthreads();
      if (threadIdx.y == 0 && ch < c) {
        for (int j = 1; j < blockDim.y; ++j) {
          dot += smem[0][j][threadIdx.x];
          sum_r += smem[1][j][threadIdx.x];
          sum_k += smem[2][j][threadIdx.x];
        }
        part_grad_beta[s * c + ch] = dot;
        part_sums[s * c + ch] = sum_r;
        part_sums[(n + s) * c + ch] = sum_k;
      }
      __syncthreads();  // row 0 has read smem before the next sample overwrites it
    }
  }
}

// Launch limits of the grid's x and y dimensions; the kernels stride over whatever lies beyond.
constexpr int64_t kMaxGridX = 2147483647, kMaxGridY = 65535;

unsigned grid_dim(int64_t blocks, int64_t limit) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, limit)));
}

int grid_for(int64_t elems) {
  const int64_t blocks = (elems + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, cap)));
}

std::tuple<at::Tensor, at::Tensor> dual_scaled_conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& beta, const std::optional<at::Tensor>& knockoff_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_diff) {
  const c10::cuda::CUDAGuard guard(input.device());
  DualForward st = prepare_dual_forward(input, weight, bias, beta, knockoff_bias, stride, padding,
                                        dilation, groups, save_diff);
  const int64_t half = st.n * st.c * st.hw;
  if (half == 0) return {st.y, st.diff};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st.y.scalar_type(), "dual_scaled_conv2d_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* diff_data = save_diff ? st.diff.data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(half), kThreads, 0, stream>>>(st.y.data_ptr<scalar_t>(), diff_data,
                                                      st.beta.data_ptr<opmath_t>(),
                                                      st.shifts.data_ptr<opmath_t>(), st.n, st.c, st.hw);
    };
    if (st.channels_last) {
      launch(mix_forward_kernel<scalar_t, opmath_t, true>);
    } else {
      launch(mix_forward_kernel<scalar_t, opmath_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {st.y, st.diff};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_mix_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& beta, const at::Tensor& diff, bool need_beta,
    bool need_sums) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  MixBackward st = prepare_mix_backward(grad_out, beta, diff, need_beta);
  const int64_t n = st.n, c = st.c, hw = st.hw;
  if (n * c * hw > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st.grad_out.scalar_type(), "dual_mix_backward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* diff_data = need_beta ? st.diff.data_ptr<scalar_t>() : nullptr;
      const scalar_t* grad_out_data = st.grad_out.data_ptr<scalar_t>();
      scalar_t* grad_y_data = st.grad_y.data_ptr<scalar_t>();
      const opmath_t* beta_data = st.beta.data_ptr<opmath_t>();
      opmath_t* part_grad_beta = st.part_grad_beta.data_ptr<opmath_t>();
      opmath_t* part_sums = st.part_sums.data_ptr<opmath_t>();
      if (st.channels_last) {
        const dim3 block(32, 8), grid(grid_dim((c + 31) / 32, kMaxGridX), grid_dim(n, kMaxGridY));
        mix_backward_rows<scalar_t, opmath_t><<<grid, block, 0, stream>>>(
            grad_out_data, diff_data, grad_y_data, beta_data, part_grad_beta, part_sums, n, c, hw);
      } else {
        const int threads = hw >= 256 ? 256 : (hw >= 128 ? 128 : 64);
        mix_backward_planes<scalar_t, opmath_t><<<grid_dim(n * c, kMaxGridX), threads, 0, stream>>>(
            grad_out_data, diff_data, grad_y_data, beta_data, part_grad_beta, part_sums, n, c, hw);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return finish_mix_backward(st, beta, need_beta, need_sums);
}

}  // namespace

TORCH_LIBRARY_IMPL(scop, CUDA, m) {
  m.impl("dual_scaled_conv2d", &dual_scaled_conv2d_cuda);
  m.impl("_dual_mix_backward", &dual_mix_backward_cuda);
}

}  // namespace scop
