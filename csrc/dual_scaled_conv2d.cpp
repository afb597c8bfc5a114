// scop::dual_scaled_conv2d and scop::_dual_mix_backward, the part every backend shares: argument
// checks (the second line of defence behind the Python wrapper's) and the preparation of the
// buffers the fused passes in cpu/ and cuda/ fill.
#include <ATen/OpMathType.h>

#include "scop.h"

namespace scop {

at::MemoryFormat dual_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

namespace {

// Second line of defence behind the Python argument checks.
void check_conv_params(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "scop: stride, padding and dilation must have 2 entries each, got ", stride.size(), ", ",
              padding.size(), " and ", dilation.size());
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, "scop: stride and dilation must be >= 1 "
                "and padding >= 0, got stride ", stride, ", padding ", padding, ", dilation ", dilation);
  }
}

void check_dual_conv_args(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& beta,
                          const std::optional<at::Tensor>& knockoff_bias, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "scop: input must be 4-D (2N, C_in, H, W), got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "scop: weight must be 4-D (C_out, C_in/groups, kH, kW), got ",
              weight.dim(), "-D");
  TORCH_CHECK(input.size(0) % 2 == 0, "scop: input batch must be 2N (real then knockoff), got ",
              input.size(0));
  TORCH_CHECK(groups > 0 && input.size(1) == weight.size(1) * groups,
              "scop: input has ", input.size(1), " channels but weight expects ",
              weight.size(1) * groups);
  const int64_t c_out = weight.size(0);
  TORCH_CHECK(c_out % groups == 0, "scop: weight's ", c_out, " output channels are not divisible by groups=",
              groups);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "scop: input must be floating point, got ",
              input.scalar_type());
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == c_out, "scop: beta must have shape (", c_out,
              ",), got ", beta.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && beta.scalar_type() == input.scalar_type(),
              "scop: input, weight and beta must share a dtype");
  TORCH_CHECK(weight.device() == input.device() && beta.device() == input.device(),
              "scop: input, weight and beta must be on one device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c_out, "scop: bias must have shape (", c_out,
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
                "scop: bias must match input's dtype and device");
  }
  if (knockoff_bias.has_value()) {
    TORCH_CHECK(knockoff_bias->dim() == 3 && knockoff_bias->size(0) == input.size(0) / 2 &&
                    knockoff_bias->size(1) == 2 && knockoff_bias->size(2) == c_out,
                "scop: knockoff bias must have shape (", input.size(0) / 2, ", 2, ", c_out,
                "), got ", knockoff_bias->sizes());
    TORCH_CHECK(knockoff_bias->scalar_type() == input.scalar_type() && knockoff_bias->device() == input.device(),
                "scop: knockoff bias must match input's dtype and device");
  }
}

at::Tensor branch_shifts(const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& knockoff_bias, int64_t n, int64_t c,
                         const at::Tensor& like) {
  const auto opmath = at::toOpMathType(like.scalar_type());
  at::Tensor shifts = at::zeros({2, n, c}, like.options().dtype(opmath));
  if (bias.has_value()) {
    shifts.add_(bias->to(opmath));
  }
  if (knockoff_bias.has_value()) {
    shifts.add_(knockoff_bias->to(opmath).permute({1, 0, 2}));
  }
  return shifts;
}

void check_mix_backward_args(const at::Tensor& grad_out, const at::Tensor& beta,
                             const at::Tensor& diff, bool need_beta) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) % 2 == 0,
              "scop: grad_out must be 4-D with an even batch, got ", grad_out.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "scop: grad_out must be floating point, got ",
              grad_out.scalar_type());
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == grad_out.size(1),
              "scop: beta must have shape (", grad_out.size(1), ",), got ", beta.sizes());
  TORCH_CHECK(beta.device() == grad_out.device(), "scop: beta and grad_out must share a device");
  if (need_beta) {
    TORCH_CHECK(diff.dim() == 4 && diff.size(0) == grad_out.size(0) / 2 &&
                    diff.sizes().slice(1) == grad_out.sizes().slice(1),
                "scop: diff must have shape (N, C, H, W) matching grad_out's real half, got ",
                diff.sizes());
    TORCH_CHECK(diff.device() == grad_out.device() && diff.scalar_type() == grad_out.scalar_type(),
                "scop: diff must match grad_out's dtype and device");
  }
}

}  // namespace

DualForward prepare_dual_forward(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& beta,
                                 const std::optional<at::Tensor>& knockoff_bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 bool save_diff) {
  check_dual_conv_args(input, weight, bias, beta, knockoff_bias, groups);
  check_conv_params(stride, padding, dilation);
  const auto fmt = dual_memory_format(input);
  // The conv bias is left to the fused pass, which adds it together with [b, b~].
  at::Tensor y = at::convolution(input, weight, std::nullopt, stride, padding, dilation,
                                 /*transposed=*/false, /*output_padding=*/{0, 0}, groups)
                     .contiguous(fmt);
  DualForward state;
  state.n = y.size(0) / 2;
  state.c = y.size(1);
  state.hw = y.size(2) * y.size(3);
  state.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  state.diff = save_diff ? at::empty({state.n, state.c, y.size(2), y.size(3)}, y.options().memory_format(fmt))
                         : at::empty({0}, y.options());
  state.shifts = branch_shifts(bias, knockoff_bias, state.n, state.c, y);
  state.beta = beta.to(state.shifts.scalar_type()).contiguous();
  state.y = std::move(y);
  return state;
}

MixBackward prepare_mix_backward(const at::Tensor& grad_out, const at::Tensor& beta,
                                 const at::Tensor& diff, bool need_beta) {
  check_mix_backward_args(grad_out, beta, diff, need_beta);
  const auto fmt = dual_memory_format(grad_out);
  MixBackward state;
  state.grad_out = grad_out.contiguous(fmt);
  state.diff = need_beta ? diff.contiguous(fmt) : at::Tensor();
  state.grad_y = at::empty_like(state.grad_out, fmt);
  state.n = grad_out.size(0) / 2;
  state.c = grad_out.size(1);
  state.hw = grad_out.size(2) * grad_out.size(3);
  state.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto acc = grad_out.options().dtype(at::toOpMathType(grad_out.scalar_type()));
  state.part_grad_beta = at::zeros({state.n, state.c}, acc);
  state.part_sums = at::zeros({2 * state.n, state.c}, acc);
  state.beta = beta.to(acc.dtype()).contiguous();
  return state;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_mix_backward(const MixBackward& state,
                                                                   const at::Tensor& beta,
                                                                   bool need_beta, bool need_sums) {
  at::Tensor grad_beta = need_beta ? state.part_grad_beta.sum(0).to(beta.scalar_type())
                                   : at::empty({0}, beta.options());
  // The sums stay in opmath: the caller still reduces them over samples, and rounding them to
  // half precision first would lose that sum's precision (and overflow float16).
  at::Tensor sums = need_sums ? state.part_sums : at::empty({0}, state.part_sums.options());
  return {state.grad_y, grad_beta, sums};
}

}  // namespace scop
