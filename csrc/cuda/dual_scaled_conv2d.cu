// CUDA kernels of the fused dual-branch scaled convolution. Launched on the current stream
// under a device guard; float32/float16/bfloat16 with opmath (float) accumulation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../scop.h"

namespace scop {
namespace {

constexpr int kThreads = 256;

// The knockoff element sits `half` further on than its real one in both layouts, because the
// batch dimension is outermost in NCHW and NHWC alike.
template <typename scalar_t, typename opmath_t, typename index_t>
__device__ __forceinline__ void mix_forward_element(scalar_t* y, scalar_t* diff, index_t i, index_t half,
                                                    opmath_t b, opmath_t shift_r, opmath_t shift_k) {
  const opmath_t r = static_cast<opmath_t>(y[i]) + shift_r;
  const opmath_t k = static_cast<opmath_t>(y[i + half]) + shift_k;
  y[i] = static_cast<scalar_t>(k + b * (r - k));
  y[i + half] = static_cast<scalar_t>(k);
  if (diff) diff[i] = static_cast<scalar_t>(r - k);
}

// One thread per real-half element, channel and sample divided out of the flat index: NHWC, and
// NCHW planes too small to fill a block of mix_forward_planes.
template <typename scalar_t, typename opmath_t, typename index_t, bool kChannelsLast>
__global__ void mix_forward_flat(scalar_t* __restrict__ y, scalar_t* __restrict__ diff,
                                 const opmath_t* __restrict__ beta, const opmath_t* __restrict__ shifts,
                                 index_t n, index_t c, index_t hw) {
  const index_t half = n * c * hw;
  const index_t step = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
  for (index_t i = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
                   static_cast<index_t>(threadIdx.x);
       i < half; i += step) {
    const index_t ch = kChannelsLast ? i % c : (i / hw) % c;
    const index_t s = i / (hw * c);
    mix_forward_element(y, diff, i, half, beta[ch], shifts[s * c + ch], shifts[(n + s) * c + ch]);
  }
}

// NCHW: blockIdx.x strides over the (sample, channel) planes, so a plane's beta and shifts are
// read once per block and no per-element division is left; blockIdx.y and the threads stride
// over its pixels. shifts is (2, N, C) contiguous: plane p's real shift is shifts[p], its
// knockoff shift shifts[N C + p].
template <typename scalar_t, typename opmath_t, typename index_t>
__global__ void mix_forward_planes(scalar_t* __restrict__ y, scalar_t* __restrict__ diff,
                                   const opmath_t* __restrict__ beta, const opmath_t* __restrict__ shifts,
                                   index_t n, index_t c, index_t hw) {
  const index_t planes = n * c, half = planes * hw;
  const index_t step = static_cast<index_t>(gridDim.y) * static_cast<index_t>(blockDim.x);
  for (index_t plane = static_cast<index_t>(blockIdx.x); plane < planes;
       plane += static_cast<index_t>(gridDim.x)) {
    const opmath_t b = beta[plane % c], shift_r = shifts[plane], shift_k = shifts[planes + plane];
    for (index_t q = static_cast<index_t>(blockIdx.y) * static_cast<index_t>(blockDim.x) +
                     static_cast<index_t>(threadIdx.x);
         q < hw; q += step) {
      mix_forward_element(y, diff, plane * hw + q, half, b, shift_r, shift_k);
    }
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

// NHWC: block (32 channels x 8 pixel lanes) per (channel tile, sample, chunk of pixels), striding
// over tiles and samples when the grid is smaller; loads are coalesced along channels and the 8
// pixel lanes are reduced through shared memory. blockIdx.z picks the chunk, pixels
// [z chunk, (z + 1) chunk), and its sums go to slice z of part_grad_beta (splits, N, C) and
// part_sums (splits, 2N, C): every element is written by exactly one thread, no atomics.
template <typename scalar_t, typename opmath_t>
__global__ void mix_backward_rows(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ diff,
                                  scalar_t* __restrict__ grad_y, const opmath_t* __restrict__ beta,
                                  opmath_t* __restrict__ part_grad_beta, opmath_t* __restrict__ part_sums,
                                  int64_t n, int64_t c, int64_t hw, int64_t chunk) {
  const int64_t half = n * c * hw;
  const int64_t tiles = (c + 31) / 32;
  const int64_t q_begin = static_cast<int64_t>(blockIdx.z) * chunk;
  const int64_t q_end = q_begin + chunk < hw ? q_begin + chunk : hw;
  opmath_t* const split_grad_beta = part_grad_beta + static_cast<int64_t>(blockIdx.z) * n * c;
  opmath_t* const split_sums = part_sums + static_cast<int64_t>(blockIdx.z) * 2 * n * c;
  __shared__ opmath_t smem[3][8][32];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t ch = tile * 32 + threadIdx.x;
    for (int64_t s = blockIdx.y; s < n; s += gridDim.y) {
      opmath_t dot = 0, sum_r = 0, sum_k = 0;
      if (ch < c) {
        const opmath_t b = beta[ch];
        for (int64_t q = q_begin + threadIdx.y; q < q_end; q += blockDim.y) {
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
        split_grad_beta[s * c + ch] = dot;
        split_sums[s * c + ch] = sum_r;
        split_sums[(n + s) * c + ch] = sum_k;
      }
      __syncthreads();  // row 0 has read smem before the next sample overwrites it
    }
  }
}

// Launch limits of the grid's dimensions; the kernels stride over whatever lies beyond x and y.
constexpr int64_t kMaxGridX = 2147483647, kMaxGridY = 65535, kMaxGridZ = 65535;

unsigned grid_dim(int64_t blocks, int64_t limit) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, limit)));
}

int grid_for(int64_t elems) {
  const int64_t blocks = (elems + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, cap)));
}

template <typename scalar_t, typename opmath_t, typename index_t>
void launch_mix_forward(DualForward& st, scalar_t* diff, cudaStream_t stream) {
  scalar_t* y = st.y.data_ptr<scalar_t>();
  const opmath_t* beta = st.beta.data_ptr<opmath_t>();
  const opmath_t* shifts = st.shifts.data_ptr<opmath_t>();
  const auto n = static_cast<index_t>(st.n), c = static_cast<index_t>(st.c), hw = static_cast<index_t>(st.hw);
  const int64_t half = st.n * st.c * st.hw;
  if (st.channels_last) {
    mix_forward_flat<scalar_t, opmath_t, index_t, true><<<grid_for(half), kThreads, 0, stream>>>(
        y, diff, beta, shifts, n, c, hw);
  } else if (st.hw < 32) {  // a plane below one warp would leave most of a planes block idle
    mix_forward_flat<scalar_t, opmath_t, index_t, false><<<grid_for(half), kThreads, 0, stream>>>(
        y, diff, beta, shifts, n, c, hw);
  } else {
    const int64_t threads = std::min<int64_t>(kThreads, (st.hw + 31) / 32 * 32);  // whole warps
    const dim3 grid(grid_dim(st.n * st.c, kMaxGridX), grid_dim((st.hw + threads - 1) / threads, kMaxGridY));
    mix_forward_planes<scalar_t, opmath_t, index_t><<<grid, static_cast<unsigned>(threads), 0, stream>>>(
        y, diff, beta, shifts, n, c, hw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> dual_scaled_conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& beta, const std::optional<at::Tensor>& knockoff_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_diff) {
  const c10::cuda::CUDAGuard guard(input.device());
  DualForward st = prepare_dual_forward(input, weight, bias, beta, knockoff_bias, stride, padding,
                                        dilation, groups, save_diff);
  if (st.n * st.c * st.hw == 0) return {st.y, st.diff};
  // 32-bit index math (64-bit division is a long instruction sequence) when every index fits
  // with room to spare: indices stay below y's numel, and each grid-stride loop's last step
  // past its end adds less than that again.
  const bool index32 = st.y.numel() <= std::numeric_limits<int32_t>::max() / 2;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st.y.scalar_type(), "dual_scaled_conv2d_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* diff = save_diff ? st.diff.data_ptr<scalar_t>() : nullptr;
    if (index32) {
      launch_mix_forward<scalar_t, opmath_t, int32_t>(st, diff, stream);
    } else {
      launch_mix_forward<scalar_t, opmath_t, int64_t>(st, diff, stream);
    }
  });
  return {st.y, st.diff};
}

// Pixels per block of the NHWC backward: a fixed count, not one derived from the GPU's size, so
// the partial sums, and so the results, are the same on every device (larger only when the
// chunks would not fit in the grid's z dimension). Without the split a grid of C/32 x N blocks
// (16 for C = 64, N = 8) leaves most of a large GPU idle.
constexpr int64_t kRowsChunk = 128;

template <typename scalar_t, typename opmath_t>
void launch_mix_backward_rows(MixBackward& st, const scalar_t* diff, cudaStream_t stream) {
  const int64_t n = st.n, c = st.c, hw = st.hw;
  const int64_t chunk = std::max(kRowsChunk, (hw + kMaxGridZ - 1) / kMaxGridZ);
  const int64_t splits = (hw + chunk - 1) / chunk;
  at::Tensor beta_parts = splits == 1 ? st.part_grad_beta : at::zeros({splits, n, c}, st.part_grad_beta.options());
  at::Tensor sum_parts = splits == 1 ? st.part_sums : at::zeros({splits, 2 * n, c}, st.part_sums.options());
  const dim3 block(32, 8);
  const dim3 grid(grid_dim((c + 31) / 32, kMaxGridX), grid_dim(n, kMaxGridY), static_cast<unsigned>(splits));
  mix_backward_rows<scalar_t, opmath_t><<<grid, block, 0, stream>>>(
      st.grad_out.data_ptr<scalar_t>(), diff, st.grad_y.data_ptr<scalar_t>(), st.beta.data_ptr<opmath_t>(),
      beta_parts.data_ptr<opmath_t>(), sum_parts.data_ptr<opmath_t>(), n, c, hw, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {  // ATen's reduction adds the chunks in a fixed order: deterministic
    st.part_grad_beta = beta_parts.sum(0);
    st.part_sums = sum_parts.sum(0);
  }
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
      if (st.channels_last) {
        launch_mix_backward_rows<scalar_t, opmath_t>(st, diff_data, stream);
        return;
      }
      const int threads = hw >= 256 ? 256 : (hw >= 128 ? 128 : 64);
      mix_backward_planes<scalar_t, opmath_t><<<grid_dim(n * c, kMaxGridX), threads, 0, stream>>>(
          st.grad_out.data_ptr<scalar_t>(), diff_data, st.grad_y.data_ptr<scalar_t>(), st.beta.data_ptr<opmath_t>(),
          st.part_grad_beta.data_ptr<opmath_t>(), st.part_sums.data_ptr<opmath_t>(), n, c, hw);
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
