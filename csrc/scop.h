// Declarations shared by each operator's device-agnostic part (csrc/<op>.cpp) and its per-backend
// kernels (cpu/<op>.cpp, cuda/<op>.cu). The schemas are in schemas.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace scop {

// Layout the fused passes work in: channels_last when the input is strided that way,
// otherwise contiguous NCHW. The Python fake kernels apply the same rule.
at::MemoryFormat dual_memory_format(const at::Tensor& t);

// Everything a backend's fused forward pass needs, prepared the same way for every backend:
// the checked arguments, the convolution of the whole paired batch (computed by ATen and
// private to this call, so the fused pass writes the output into it), the diff buffer, and
// beta and the per-branch shifts in opmath precision.
struct DualForward {
  at::Tensor y;       // (2N, C, H, W) conv output, becomes the op's output
  at::Tensor diff;    // (N, C, H, W) or empty when !save_diff
  at::Tensor beta;    // (C,) opmath
  at::Tensor shifts;  // (2, N, C) opmath: bias + b for the real half, bias + b~ for the knockoff half
  bool channels_last;
  int64_t n, c, hw;
};
DualForward prepare_dual_forward(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& beta,
                                 const std::optional<at::Tensor>& knockoff_bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 bool save_diff);

// The same for the fused backward pass. part_grad_beta (N, C) and part_sums (2N, C) take per-(sample,
// channel) partial sums that are reduced over samples afterwards: no atomics, and results do not
// depend on the thread or block count.
struct MixBackward {
  at::Tensor grad_out;  // contiguous in the layout the pass runs in
  at::Tensor diff;      // same layout, or undefined when !need_beta
  at::Tensor grad_y;
  at::Tensor beta;      // (C,) opmath
  at::Tensor part_grad_beta, part_sums;
  bool channels_last;
  int64_t n, c, hw;
};
MixBackward prepare_mix_backward(const at::Tensor& grad_out, const at::Tensor& beta,
                                 const at::Tensor& diff, bool need_beta);
// (grad_y, grad_beta or empty, sums in opmath or empty): the op's outputs from the filled buffers.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_mix_backward(const MixBackward& state,
                                                                   const at::Tensor& beta,
                                                                   bool need_beta, bool need_sums);

// b = sqrt(gamma) z1 + R z2,  b~ = sqrt(gamma) z1 - R z2, from normals z of shape (n, 2, C).
at::Tensor lemma2_combine(const at::Tensor& z, const at::Tensor& R, double gamma);

void check_lemma2_args(const at::Tensor& R, double gamma, int64_t n, const at::Tensor& seed);

uint64_t seed_from_tensor(const at::Tensor& seed);

}  // namespace scop
