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
// `beta`, `sr`, `sk` hold one value per element of the row (channels_last rows span channels)
// or, with kPerElement false, one value for the whole row (an NCHW plane is one channel).
template <bool kPerElement, typename scalar_t, typename opmath_t>
void mix_forward_row(scalar_t* yr, scalar_t* yk, scalar_t* d, int64_t len, const opmath_t* beta,
                     const opmath_t* sr, const opmath_t* sk) {
  constexpr int64_t stride = kPerElement ? 1 : 0;
  int64_t i = 0;
  if constexpr (kVectorize<scalar_t>) {
    using Vec = Vectorized<scalar_t>;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec vb = kPerElement ? Vec::loadu(beta + i) : Vec(beta[0]);
      const Vec vsr = kPerElement ? Vec::loadu(sr + i) : Vec(sr[0]);
      const Vec vsk = kPerElement ? Vec::loadu(sk + i) : Vec(sk[0]);
      const Vec r = Vec::loadu(yr + i) + vsr;
      const Vec k = Vec::loadu(yk + i) + vsk;
      const Vec diff = r - k;
      (k + vb * diff).store(yr + i);
      k.store(yk + i);
      if (d) diff.store(d + i);
    }
  }
  for (; i < len; ++i) {
    const int64_t j = i * stride;
    const opmath_t r = static_cast<opmath_t>(yr[i]) + sr[j];
    const opmath_t k = static_cast<opmath_t>(yk[i]) + sk[j];
    yr[i] = static_cast<scalar_t>(k + beta[j] * (r - k));
    yk[i] = static_cast<scalar_t>(k);
    if (d) d[i] = static_cast<scalar_t>(r - k);
  }
}

// grad_Y_r = beta g_r, grad_Y_k = (1 - beta) g_r + g_k; accumulates sum(g_r d) and the two
// spatial sums into acc_p / acc_r / acc_k (per element with kPerElement, one value otherwise).
template <bool kPerElement, typename scalar_t, typename opmath_t>
void mix_backward_row(const scalar_t* gr, const scalar_t* gk, const scalar_t* d, scalar_t* gyr,
                      scalar_t* gyk, int64_t len, const opmath_t* beta, opmath_t* acc_p,
                      opmath_t* acc_r, opmath_t* acc_k) {
  constexpr int64_t stride = kPerElement ? 1 : 0;
  int64_t i = 0;
  if constexpr (kVectorize<scalar_t>) {
    using Vec = Vectorized<scalar_t>;
    if constexpr (!kPerElement) {
      const Vec vb(beta[0]), one(1);
      Vec vp(0), vr(0), vk(0);
      for (; i + Vec::size() <= len; i += Vec::size()) {
        const Vec g = Vec::loadu(gr + i);
        const Vec a = vb * g;
        const Vec b = (one - vb) * g + Vec::loadu(gk + i);
        a.store(gyr + i);
        b.store(gyk + i);
        vr = vr + a;
        vk = vk + b;
        if (d) vp = vp + g * Vec::loadu(d + i);
      }
      acc_p[0] += at::vec::vec_reduce_all<scalar_t>(std::plus<Vec>(), vp);
      acc_r[0] += at::vec::vec_reduce_all<scalar_t>(std::plus<Vec>(), vr);
      acc_k[0] += at::vec::vec_reduce_all<scalar_t>(std::plus<Vec>(), vk);
    } else {
      const Vec one(1);
      for (; i + Vec::size() <= len; i += Vec::size()) {
        const Vec vb = Vec::loadu(beta + i);
        const Vec g = Vec::loadu(gr + i);
        const Vec a = vb * g;
        const Vec b = (one - vb) * g + Vec::loadu(gk + i);
        a.store(gyr + i);
        b.store(gyk + i);
        (Vec::loadu(acc_r + i) + a).store(acc_r + i);
        (Vec::loadu(acc_k + i) + b).store(acc_k + i);
        if (d) (Vec::loadu(acc_p + i) + g * Vec::loadu(d + i)).store(acc_p + i);
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
    acc_r[j] += a;
    acc_k[j] += b;
    if (d) acc_p[j] += g * static_cast<opmath_t>(d[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> dual_scaled_conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& beta, const std::optional<at::Tensor>& noise, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_diff) {
  DualForward st = prepare_dual_forward(input, weight, bias, beta, noise, stride, padding, dilation,
                                        groups, save_diff);
  const int64_t n = st.n, c = st.c, hw = st.hw;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st.y.scalar_type(), "dual_scaled_conv2d_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* yp = st.y.data_ptr<scalar_t>();
    scalar_t* dp = save_diff ? st.diff.data_ptr<scalar_t>() : nullptr;
    const opmath_t* bp = st.beta.data_ptr<opmath_t>();
    const opmath_t* sr = st.shifts.data_ptr<opmath_t>();
    const opmath_t* sk = sr + n * c;
    const int64_t half = n * c * hw;
    if (!st.channels_last) {
      at::parallel_for(0, n * c, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(hw, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t p = begin; p < end; ++p) {
                           mix_forward_row<false>(yp + p * hw, yp + half + p * hw,
                                                  dp ? dp + p * hw : nullptr, hw, bp + p % c, sr + p, sk + p);
                         }
                       });
    } else {
      // Tasks are spans of rows that never cross a sample, so each needs one sample's shifts.
      const int64_t rows = span_rows(c), spans_per_sample = (hw + rows - 1) / rows;
      at::parallel_for(0, n * spans_per_sample, std::max<int64_t>(1, kGrainElems / (rows * c)),
                       [&](int64_t begin, int64_t end) {
                         std::vector<opmath_t> tiles(3 * rows * c);
                         opmath_t *tb = tiles.data(), *tr = tb + rows * c, *tk = tr + rows * c;
                         tile_rows(tb, bp, c, rows);
                         int64_t tiled_sample = -1;
                         for (int64_t span = begin; span < end; ++span) {
                           const int64_t s = span / spans_per_sample;
                           const int64_t first = (span % spans_per_sample) * rows;
                           const int64_t len = (std::min(hw, first + rows) - first) * c;
                           if (s != tiled_sample) {
                             tile_rows(tr, sr + s * c, c, rows);
                             tile_rows(tk, sk + s * c, c, rows);
                             tiled_sample = s;
                           }
                           const int64_t off = (s * hw + first) * c;
                           mix_forward_row<true>(yp + off, yp + half + off, dp ? dp + off : nullptr, len, tb, tr, tk);
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
    const scalar_t* gp = st.grad_out.data_ptr<scalar_t>();
    const scalar_t* dp = need_beta ? st.diff.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = st.grad_y.data_ptr<scalar_t>();
    const opmath_t* bp = st.beta.data_ptr<opmath_t>();
    opmath_t* pp = st.part_p.data_ptr<opmath_t>();
    opmath_t* sp = st.part_s.data_ptr<opmath_t>();
    const int64_t half = n * c * hw;
    if (!st.channels_last) {
      at::parallel_for(0, n * c, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(hw, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t p = begin; p < end; ++p) {
                           mix_backward_row<false>(gp + p * hw, gp + half + p * hw,
                                                   dp ? dp + p * hw : nullptr, op + p * hw, op + half + p * hw,
                                                   hw, bp + p % c, pp + p, sp + p, sp + n * c + p);
                         }
                       });
    } else {
      // One task per sample: its sums accumulate into tiled per-channel buffers, folded to C at
      // the end, so no two tasks write the same partial sums.
      const int64_t rows = std::min(span_rows(c), std::max<int64_t>(hw, 1));
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        std::vector<opmath_t> tiles(4 * rows * c);
        opmath_t *tb = tiles.data(), *ap = tb + rows * c, *ar = ap + rows * c, *ak = ar + rows * c;
        tile_rows(tb, bp, c, rows);
        for (int64_t s = begin; s < end; ++s) {
          std::fill(ap, ap + 3 * rows * c, opmath_t(0));
          for (int64_t first = 0; first < hw; first += rows) {
            const int64_t len = (std::min(hw, first + rows) - first) * c;
            const int64_t off = (s * hw + first) * c;
            mix_backward_row<true>(gp + off, gp + half + off, dp ? dp + off : nullptr, op + off,
                                   op + half + off, len, tb, ap, ar, ak);
          }
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t ch = 0; ch < c; ++ch) {
              pp[s * c + ch] += ap[r * c + ch];
              sp[s * c + ch] += ar[r * c + ch];
              sp[(n + s) * c + ch] += ak[r * c + ch];
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
  m.impl("dual_mix_backward", &dual_mix_backward_cpu);
}

}  // namespace scop
