// The public contract of the `scop` operator namespace: every schema, nothing else. Each
// operator's device-agnostic checks and preparation are in csrc/<op>.cpp, and its kernels in
// cpu/<op>.cpp and cuda/<op>.cu, which register themselves with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(scop, m) {
  // Fused dual-branch scaled convolution (stage 2). Returns (out, diff): out is the mixed paired
  // batch; diff = (Y_r + b) - (Y_k + b~) is kept for grad_beta when save_diff.
  m.def(
      "dual_scaled_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor beta, "
      "Tensor? knockoff_bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool save_diff) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Its backward's fused pass, private (the leading underscore, as torchvision names its own):
  // (grad of the conv output, grad_beta, per-(sample, channel) spatial sums of that grad, from
  // which the bias and knockoff-bias grads follow). The sums are in opmath precision (float32 for
  // float16 and bfloat16), the other outputs in grad_out's dtype.
  m.def(
      "_dual_mix_backward(Tensor grad_out, Tensor beta, Tensor diff, bool need_beta, "
      "bool need_sums) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Lemma 2 bias sampler: [b, b~] of shape (n, 2, C) from Philox normals keyed on `seed` (a
  // one-element int64 CPU tensor, so compiled graphs do not specialise on it).
  m.def("lemma2_sample(Tensor R, float gamma, SymInt n, Tensor seed) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
