// Declarations shared by the operator schemas (ops.cpp) and the per-backend kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace scop {

// Layout the fused passes work in: channels_last when the input is strided that way,
// otherwise contiguous NCHW. The Python fake kernels apply the same rule.
at::MemoryFormat dual_memory_format(const at::Tensor& t);

// Second line of defence behind the Python argument checks.
void check_dual_conv_args(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& beta,
                          const std::optional<at::Tensor>& noise, int64_t groups);

// One ATen convolution over the whole paired batch, returned in dual_memory_format(input).
at::Tensor paired_convolution(const at::Tensor& input, const at::Tensor& weight,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups);

// Per-branch additive shifts in opmath precision, shape (2, N, C): row 0 holds
// bias + b for the real half, row 1 bias + b~ for the knockoff half.
at::Tensor branch_shifts(const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& noise, int64_t n, int64_t c,
                         const at::Tensor& like);

void check_mix_backward_args(const at::Tensor& grad_out, const at::Tensor& beta,
                             const at::Tensor& diff, bool need_beta);

// b = sqrt(gamma) z1 + R z2,  b~ = sqrt(gamma) z1 - R z2, from normals z of shape (n, 2, C).
at::Tensor lemma2_combine(const at::Tensor& z, const at::Tensor& R, double gamma);

void check_lemma2_args(const at::Tensor& R, double gamma, int64_t n, const at::Tensor& seed);

uint64_t seed_from_tensor(const at::Tensor& seed);

}  // namespace scop
