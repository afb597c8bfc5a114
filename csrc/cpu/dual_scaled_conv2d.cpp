// CPU kernels of the fused dual-branch scaled convolution: at::parallel_for over planes (NCHW)
// or pixel rows (NHWC), at::vec for the inner loop in float32/float64, scalar opmath for bf16.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../scop.h"

namespace scop {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
constexpr bool kVectorize = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// Elements per parallel task: enough work to amortise scheduling, small enough to balance.
constexpr int64_t kGrainElems = 32768;

// channels_last rows hold only C elements (16 in a CIFAR ResNet's first stage), too few for the
// vector loop to pay for a call per row. A sample's H*W*C elements are contiguous and repeat the
// channel pattern every C, so they are walked in spans of whole rows at least kSpanElems long,
// against per-channel values tiled to the span's length.
constexpr int64_t kSpanElems = 512;

inline int64_t span_rows(int64_t c) { return std::max<int64_t>(1, kSpanElems / std::max<int64_t>(c, 1)); }

// Writes `rows` copies of src[0..c) into dst.
template <typename T>
void tile_rows(T* dst, const T* src, int64_t c, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) std::copy(src, src + c, dst + r * c);
}

// out_r = k + beta (r - k) is beta (Y_r + b) + (1 - beta)(Y_k + b~) with one multiply.
// `beta`, `shift_r`, `shift_k` hold one value per element of the row (channels_last rows span
// channels) or, with kPerElement false, one value for the whole row (an NCHW plane is one channel).
template <bool kPerElement, typename scalar_t, typename opmath_t>
void mix_forward_row(scalar_t* yr, scalar_t* yk, scalar_t* d, int64_t len, const opmath_t* beta,
                     const opmath_t* shift_r, const opmath_t* shift_k) {
  constexpr int64_t stride = kPerElement ? 1 : 0;
  int64_t i = 0;
  if constexpr (kVectorize<scalar_t>) {
    using Vec = Vectorized<scalar_t>;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vb = kPerElement ? Vec::loadu(beta + i) : Vec(beta[0]);
      const Vec vshift_r = kPerElement ? Vec::loadu(shift_r + i) : Vec(shift_r[0]);
      const Vec vshift_k = kPerElement ? Vec::loadu(shift_k + i) : Vec(shift_k[0]);
      const Vec r = Vec::loadu(yr + i) + vshift_r;
      const Vec k = Vec::loadu(yk + i) + vshift_k;
      const Vec diff = r - k;
      (k + vb * diff).store(yr + i);
      k.store(yk + i);
      if (d) diff.store(d + i);
    }
  }
  for (; i < len; ++i) {
    const int64_t j = i * stride;
    const opmath_t r = static_cast<opmath_t>(yr[i]) + shift_r[j];
    const opmath_t k = static_cast<opmath_t>(yk[i]) + shift_k[j];
    yr[i] = static_cast<scalar_t>(k + beta[j] * (r - k));
    yk[i] = static_cast<scalar_t>(k);
    if (d) d[i] = static_cast<scalar_t>(r - k);
  }
}

// grad_Y_r = beta g_r, grad_Y_k = (1 - beta) g_r + g_k; accumulates sum(g_r d) and the two
// spatial sums into acc_dot / acc_sum_r / acc_sum_k (per element with kPerElement, one value
// otherwise).
template <bool kPerElement, typename scalar_t, typename opmath_t>
void mix_backward_row(const scalar_t* gr, const scalar_t* gk, const scalar_t* d, scalar_t* gyr,
                      scalar_t* gyk, int64_t len, const opmath_t* beta, opmath_t* acc_dot,
                      opmath_t* acc_sum_r, opmath_t* acc_sum_k) {
  constexpr int64_t stride = kPerElement ? 1 : 0;
  int64_t i = 0;
  if constexpr (kVectorize<scalar_t>) {
    using Vec = Vectorized<scalar_t>;
    if constexpr (!kPerElement) {
      const Vec vb(beta[0]), one(1);
      Vec vdot(0), vsum_r(0), vsum_k(0);
      for (; i + Vec::size() <= len; i += Vec::size()) {
        const Vec g = Vec::loadu(gr + i);
        const Vec a = vb * g;
        const Vec b = (one - vb) * g + Vec::loadu(gk + i);
        a.store(gyr + i);
        b.store(gyk + i);
        vsum_r = vsum_r + a;
        vsum_k = vsum_k + b;
        if (d) vdot = vdot + g * Vec::loadu(d + i);
      }
      acc_dot[0] += at::vec::vec_reduce_all<scalar_t>(std::plus<Vec>(), vdot);
      acc_sum_r[0] += at::vec::vec_reduce_all<scalar_t>(std::plus<Vec>(), vsum_r);
      acc_sum_k[0] += at::vec::vec_reduce_all<scalar_t>(std::plus<Vec>(), vsum_k);
    } else {
      const Vec one(1);
      for (; i + Vec::size() <= len; i += Vec::size()) {
        const Vec vb = Vec::loadu(beta + i);
        const Vec g = Vec::loadu(gr + i);
        const Vec a = vb * g;
        const Vec b = (one - vb) * g + Vec::loadu(gk + i);
        a.store(gyr + i);
        b.store(gyk + i);
        (Vec::loadu(acc_sum_r + i) + a).store(acc_sum_r + i);
        (Vec::loadu(acc_sum_k + i) + b).store(acc_sum_k + i);
        if (d) (Vec::loadu(acc_dot + i) + g * Vec::loadu(d + i)).store(acc_dot + i);
      }
    }
  }
  for (; i < len; ++i) {
    const int64_t j = i * stride;
    const opmath_t g = static_cast<opmath_t>(gr[i]);
    const opmath_t a = beta[j] * g;
    const opmath_t b = (opmath_t(1) - beta[j]) * g + static_cast<opmath_t>(gk[i]);
    gyr[i] = static_cast<scalar_t>(a);
    gyk[i] = static_cast<scalar_t>(b);
    acc_sum_r[j] += a;
    acc_sum_k[j] += b;
    if (d) acc_dot[j] += g * static_cast<opmath_t>(d[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> dual_scaled_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& beta, const std::optional<at::Tensor>& knockoff_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_diff) {
  DualForward st = prepare_dual_forward(input, weight, bias, beta, knockoff_bias, stride, padding,
                                        dilation, groups, save_diff);
  const int64_t n = st.n, c = st.c, hw = st.hw;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st.y.scalar_type(), "dual_scaled_conv2d_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* y_data = st.y.data_ptr<scalar_t>();
    scalar_t* diff_data = save_diff ? st.diff.data_ptr<scalar_t>() : nullptr;
    const opmath_t* beta_data = st.beta.data_ptr<opmath_t>();
    const opmath_t* shift_r = st.shifts.data_ptr<opmath_t>();
    const opmath_t* shift_k = shift_r + n * c;
    const int64_t half = n * c * hw;
    if (!st.channels_last) {
      at::parallel_for(0, n * c, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(hw, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t p = begin; p < end; ++p) {
                           mix_forward_row<false>(y_data + p * hw, y_data + half + p * hw,
                                                  diff_data ? diff_data + p * hw : nullptr, hw,
                                                  beta_data + p % c, shift_r + p, shift_k + p);
                         }
                       });
    } else {
      // Tasks are spans of rows that never cross a sample, so each needs one sample's shifts.
      const int64_t rows = span_rows(c), spans_per_sample = (hw + rows - 1) / rows;
      at::parallel_for(0, n * spans_per_sample, std::max<int64_t>(1, kGrainElems / (rows * c)),
                       [&](int64_t begin, int64_t end) {
                         std::vector<opmath_t> tiles(3 * rows * c);
                         opmath_t* tile_beta = tiles.data();
                         opmath_t* tile_r = tile_beta + rows * c;
                         opmath_t* tile_k = tile_r + rows * c;
                         tile_rows(tile_beta, beta_data, c, rows);
                         int64_t tiled_sample = -1;
                         for (int64_t span = begin; span < end; ++span) {
                           const int64_t s = span / spans_per_sample;
                           const int64_t first = (span % spans_per_sample) * rows;
                           const int64_t len = (std::min(hw, first + rows) - first) * c;
                           if (s != tiled_sample) {
                             tile_rows(tile_r, shift_r + s * c, c, rows);
                             tile_rows(tile_k, shift_k + s * c, c, rows);
                             tiled_sample = s;
                           }
                           const int64_t off = (s * hw + first) * c;
                           mix_forward_row<true>(y_data + off, y_data + half + off,
                                                 diff_data ? diff_data + off : nullptr, len, tile_beta,
                                                 tile_r, tile_k);
                         }
                       });
    }
  });
  return {st.y, st.diff};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_mix_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& beta, const at::Tensor& diff, bool need_beta,
    bool need_sums) {
  MixBackward st = prepare_mix_backward(grad_out, beta, diff, need_beta);
  const int64_t n = st.n, c = st.c, hw = st.hw;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st.grad_out.scalar_type(), "dual_mix_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* grad_out_data = st.grad_out.data_ptr<scalar_t>();
    const scalar_t* diff_data = need_beta ? st.diff.data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_y_data = st.grad_y.data_ptr<scalar_t>();
    const opmath_t* beta_data = st.beta.data_ptr<opmath_t>();
    opmath_t* part_grad_beta = st.part_grad_beta.data_ptr<opmath_t>();
    opmath_t* part_sums = st.part_sums.data_ptr<opmath_t>();
    const int64_t half = n * c * hw;
    if (!st.channels_last) {
      at::parallel_for(0, n * c, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(hw, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t p = begin; p < end; ++p) {
                           mix_backward_row<false>(grad_out_data + p * hw, grad_out_data + half + p * hw,
                                                   diff_data ? diff_data + p * hw : nullptr, grad_y_data + p * hw,
                                                   grad_y_data + half + p * hw, hw, beta_data + p % c,
                                                   part_grad_beta + p, part_sums + p, part_sums + n * c + p);
                         }
                       });
    } else {
      // One task per sample: its sums accumulate into tiled per-channel buffers, folded to C at
      // the end, so no two tasks write the same partial sums.
      const int64_t rows = std::min(span_rows(c), std::max<int64_t>(hw, 1));
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        std::vector<opmath_t> tiles(4 * rows * c);
        opmath_t* tile_beta = tiles.data();
        opmath_t* tile_dot = tile_beta + rows * c;
        opmath_t* tile_sum_r = tile_dot + rows * c;
        opmath_t* tile_sum_k = tile_sum_r + rows * c;
        tile_rows(tile_beta, beta_data, c, rows);
        for (int64_t s = begin; s < end; ++s) {
          std::fill(tile_dot, tile_dot + 3 * rows * c, opmath_t(0));
          for (int64_t first = 0; first < hw; first += rows) {
            const int64_t len = (std::min(hw, first + rows) - first) * c;
            const int64_t off = (s * hw + first) * c;
            mix_backward_row<true>(grad_out_data + off, grad_out_data + half + off,
                                   diff_data ? diff_data + off : nullptr, grad_y_data + off,
                                   grad_y_data + half + off, len, tile_beta, tile_dot, tile_sum_r,
                                   tile_sum_k);
          }
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t ch = 0; ch < c; ++ch) {
              part_grad_beta[s * c + ch] += tile_dot[r * c + ch];
              part_sums[s * c + ch] += tile_sum_r[r * c + ch];
              part_sums[(n + s) * c + ch] += tile_sum_k[r * c + ch];
            }
          }
        }
      });
    }
  });
  return finish_mix_backward(st, beta, need_beta, need_sums);
}

}  // namespace

TORCH_LIBRARY_IMPL(scop, CPU, m) {
  m.impl("dual_scaled_conv2d", &dual_scaled_conv2d_cpu);
  m.impl("_dual_mix_backward", &dual_mix_backward_cpu);
}

}  // namespace scop
