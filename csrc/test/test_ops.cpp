// C++ test of the scop operator library as a libtorch user sees it: the ops are looked up
// through the dispatcher (nothing here calls a symbol of libscop_ops.so, so the test also
// proves the static TORCH_LIBRARY registrations survive linking) and checked against ATen
// composites. Built and run by CMake/CTest (scop_ops_test); exits nonzero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "philox.h"

namespace {

int g_checks = 0;
int g_failures = 0;

void report_failure(const char* file, int line, const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what.c_str());
}

#define EXPECT_MSG(cond, msg)                                   \
  do {                                                         \
    ++g_checks;                                                \
    if (!(cond)) {                                             \
      std::ostringstream scop_oss_;                            \
      scop_oss_ << #cond << " -- " << msg;                     \
      report_failure(__FILE__, __LINE__, scop_oss_.str());     \
    }                                                          \
  } while (0)
#define EXPECT(cond) EXPECT_MSG(cond, "")

// Same shape, dtype and values within rtol/atol (NaN-free inputs only).
#define EXPECT_CLOSE(actual, expected, rtol, atol, label)                                        \
  do {                                                                                         \
    ++g_checks;                                                                                \
    const at::Tensor scop_a_ = (actual);                                                       \
    const at::Tensor scop_e_ = (expected);                                                     \
    std::ostringstream scop_oss_;                                                              \
    bool scop_ok_ = scop_a_.sizes() == scop_e_.sizes() &&                                      \
                    scop_a_.scalar_type() == scop_e_.scalar_type();                            \
    if (!scop_ok_) {                                                                           \
      scop_oss_ << "shape/dtype " << scop_a_.sizes() << " " << scop_a_.scalar_type()          \
                << " vs expected " << scop_e_.sizes() << " " << scop_e_.scalar_type();        \
    } else if (!at::allclose(scop_a_, scop_e_, (rtol), (atol))) {                              \
      scop_ok_ = false;                                                                        \
      scop_oss_ << "max |diff| = "                                                             \
                << (scop_a_.to(at::kDouble) - scop_e_.to(at::kDouble)).abs().max().item<double>() \
                << " (rtol " << (rtol) << ", atol " << (atol) << ")";                          \
    }                                                                                          \
    if (!scop_ok_) report_failure(__FILE__, __LINE__, std::string(label) + ": " + scop_oss_.str()); \
  } while (0)

#define EXPECT_THROWS_C10(stmt, label)                                                  \
  do {                                                                                \
    ++g_checks;                                                                       \
    bool scop_thrown_ = false;                                                        \
    try {                                                                             \
      stmt;                                                                           \
    } catch (const c10::Error&) {                                                     \
      scop_thrown_ = true;                                                            \
    } catch (const std::exception& e) {                                               \
      report_failure(__FILE__, __LINE__,                                              \
                     std::string(label) + ": threw a non-c10 exception: " + e.what()); \
      scop_thrown_ = true;                                                            \
    }                                                                                 \
    if (!scop_thrown_) report_failure(__FILE__, __LINE__, std::string(label) + ": did not throw"); \
  } while (0)

// A c10::Error whose message holds `part`: the check meant, not another one further down.
#define EXPECT_THROWS_WITH(stmt, part, label)                                                   \
  do {                                                                                        \
    ++g_checks;                                                                               \
    std::string scop_msg_;                                                                    \
    try {                                                                                     \
      stmt;                                                                                   \
      scop_msg_ = "did not throw";                                                            \
    } catch (const c10::Error& e) {                                                           \
      const std::string what = e.what_without_backtrace();                                    \
      if (what.find(part) == std::string::npos) scop_msg_ = "threw another error: " + what;  \
    }                                                                                         \
    if (!scop_msg_.empty()) report_failure(__FILE__, __LINE__, std::string(label) + ": " + scop_msg_); \
  } while (0)

// ------------------------------------------------------------------------------------------
// The ops, through the dispatcher, typed by their schemas.
// ------------------------------------------------------------------------------------------
using ConvSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
    int64_t, bool);
using MixBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool);
using Lemma2Sig = at::Tensor(const at::Tensor&, double, c10::SymInt, const at::Tensor&);

c10::TypedOperatorHandle<ConvSig> conv_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("scop::dual_scaled_conv2d", "")
                             .typed<ConvSig>();
  return op;
}

c10::TypedOperatorHandle<MixBackwardSig> mix_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("scop::_dual_mix_backward", "")
                             .typed<MixBackwardSig>();
  return op;
}

c10::TypedOperatorHandle<Lemma2Sig> lemma2_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("scop::lemma2_sample", "").typed<Lemma2Sig>();
  return op;
}

at::Tensor lemma2(const at::Tensor& R, double gamma, int64_t n, int64_t seed) {
  return lemma2_op().call(R, gamma, c10::SymInt(n), at::tensor({seed}, at::kLong));
}

// ------------------------------------------------------------------------------------------
// ATen composites of what the ops compute (see scop_ext/reference.py).
// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> conv_reference(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& beta,
                                                  const std::optional<at::Tensor>& knockoff_bias,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, int64_t groups) {
  // Arithmetic in float64 on the conv output of the input dtype, cast back at the end, as the
  // kernel's opmath pass does.
  const at::Tensor y = at::conv2d(input, weight, {}, stride, padding, dilation, groups).to(at::kDouble);
  const int64_t n = y.size(0) / 2, c = y.size(1);
  at::Tensor r = y.slice(0, 0, n);
  at::Tensor k = y.slice(0, n);
  if (bias.has_value()) {
    r = r + bias->to(at::kDouble).view({1, c, 1, 1});
    k = k + bias->to(at::kDouble).view({1, c, 1, 1});
  }
  if (knockoff_bias.has_value()) {
    r = r + knockoff_bias->select(1, 0).to(at::kDouble).view({n, c, 1, 1});
    k = k + knockoff_bias->select(1, 1).to(at::kDouble).view({n, c, 1, 1});
  }
  const at::Tensor b = beta.to(at::kDouble).view({1, c, 1, 1});
  const at::Tensor out = at::cat({b * r + (1 - b) * k, k});
  return {out.to(input.scalar_type()), (r - k).to(input.scalar_type())};
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------
void test_registration() {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const char* name : {"scop::dual_scaled_conv2d", "scop::_dual_mix_backward", "scop::lemma2_sample"}) {
    const auto handle = dispatcher.findSchema({name, ""});
    EXPECT_MSG(handle.has_value(), name << " is not registered (was libscop_ops.so linked in?)");
    if (handle.has_value()) {
      EXPECT_MSG(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), name << " has no CPU kernel");
      std::printf("  registered: %s\n", c10::toString(handle->schema()).c_str());
    }
  }
  const auto conv = dispatcher.findSchemaOrThrow("scop::dual_scaled_conv2d", "");
  EXPECT(conv.schema().arguments().size() == 10);
  EXPECT(conv.schema().returns().size() == 2);
  EXPECT(dispatcher.findSchemaOrThrow("scop::_dual_mix_backward", "").schema().returns().size() == 3);
  EXPECT(!dispatcher.findSchema({"scop::no_such_op", ""}).has_value());
}

void test_philox_known_answers() {
  struct Case {
    scop::Uint4 ctr;
    uint32_t k0, k1;
    scop::Uint4 expected;
  };
  // Random123 kat_vectors, philox4x32 10 rounds.
  const Case cases[] = {
      {{0u, 0u, 0u, 0u}, 0u, 0u, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Case& c : cases) {
    const scop::Uint4 r = scop::philox4x32_10(c.ctr, c.k0, c.k1);
    char buf[160];
    std::snprintf(buf, sizeof buf, "got %08x %08x %08x %08x, want %08x %08x %08x %08x", r.x, r.y,
                  r.z, r.w, c.expected.x, c.expected.y, c.expected.z, c.expected.w);
    EXPECT_MSG(r.x == c.expected.x && r.y == c.expected.y && r.z == c.expected.z &&
                  r.w == c.expected.w,
              buf);
  }
  // The normals: finite, and block b of key s is fixed by (s, b) alone.
  double a[4], b[4];
  scop::philox_normal4(0x123456789abcdefull, 7, a);
  scop::philox_normal4(0x123456789abcdefull, 7, b);
  for (int j = 0; j < 4; ++j) {
    EXPECT(std::isfinite(a[j]) && a[j] == b[j]);
  }
}

struct ConvCase {
  int64_t n, c_in, c_out, h, w, k, groups;
  std::vector<int64_t> stride, padding, dilation;
};

void test_dual_scaled_conv2d() {
  const ConvCase cases[] = {
      // odd sizes: vector tails in both layouts
      {2, 4, 19, 5, 7, 3, 1, {1, 1}, {1, 1}, {1, 1}},
      {3, 6, 10, 9, 8, 3, 2, {2, 1}, {0, 2}, {1, 2}},
      // N = 1: a single real/knockoff pair
      {1, 3, 7, 5, 9, 3, 1, {1, 1}, {1, 1}, {1, 1}},
      // large enough for at::parallel_for to split the planes / rows
      {4, 3, 24, 32, 32, 1, 1, {1, 1}, {0, 0}, {1, 1}},
  };
  const at::ScalarType dtypes[] = {at::kFloat, at::kDouble, at::kBFloat16};
  int run = 0;
  for (const ConvCase& cc : cases) {
    for (const at::ScalarType dtype : dtypes) {
      for (const bool channels_last : {false, true}) {
        for (const bool with_extras : {true, false}) {
          const auto opts = at::TensorOptions().dtype(dtype);
          at::Tensor input = at::randn({2 * cc.n, cc.c_in, cc.h, cc.w}, opts);
          const at::Tensor weight = at::randn({cc.c_out, cc.c_in / cc.groups, cc.k, cc.k}, opts);
          const at::Tensor beta = at::rand({cc.c_out}, opts);
          std::optional<at::Tensor> bias, knockoff_bias;
          if (with_extras) {
            bias = at::randn({cc.c_out}, opts);
            knockoff_bias = at::randn({cc.n, 2, cc.c_out}, opts);
          }
          if (channels_last) input = input.contiguous(at::MemoryFormat::ChannelsLast);
          const bool save_diff = with_extras;  // also covers save_diff=false
          auto [out, diff] = conv_op().call(input, weight, bias, beta, knockoff_bias, cc.stride, cc.padding,
                                            cc.dilation, cc.groups, save_diff);
          auto [want_out, want_diff] = conv_reference(input, weight, bias, beta, knockoff_bias, cc.stride,
                                                      cc.padding, cc.dilation, cc.groups);
          std::ostringstream what;
          what << "dual_scaled_conv2d " << dtype << (channels_last ? " channels_last" : " NCHW")
               << (with_extras ? " +bias+knockoff_bias" : " plain") << " case n=" << cc.n
               << " c_out=" << cc.c_out;
          const double rtol = dtype == at::kBFloat16 ? 2e-2 : (dtype == at::kFloat ? 1e-5 : 1e-12);
          const double atol = dtype == at::kBFloat16 ? 5e-2 : (dtype == at::kFloat ? 1e-5 : 1e-12);
          EXPECT_CLOSE(out, want_out, rtol, atol, what.str() + " out");
          if (save_diff) {
            EXPECT_CLOSE(diff, want_diff, rtol, atol, what.str() + " diff");
          } else {
            EXPECT_MSG(diff.numel() == 0, what.str() << ": diff should be empty without save_diff");
          }
          if (channels_last) {
            EXPECT_MSG(out.is_contiguous(at::MemoryFormat::ChannelsLast),
                      what.str() << ": out should stay channels_last");
          } else {
            EXPECT_MSG(out.is_contiguous(), what.str() << ": out should be contiguous NCHW");
          }
          ++run;
        }
      }
    }
  }
  std::printf("  dual_scaled_conv2d: %d configurations\n", run);
}

void test_dual_mix_backward() {
  struct Shape {
    int64_t n, c, h, w;
  };
  const Shape shapes[] = {{2, 19, 5, 7}, {3, 8, 16, 16}, {1, 33, 1, 1}};
  int run = 0;
  for (const Shape& s : shapes) {
    for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
      for (const bool channels_last : {false, true}) {
        const auto opts = at::TensorOptions().dtype(dtype);
        at::Tensor grad_out = at::randn({2 * s.n, s.c, s.h, s.w}, opts);
        const at::Tensor beta = at::rand({s.c}, opts);
        const at::Tensor diff = at::randn({s.n, s.c, s.h, s.w}, opts);  // NCHW even when grad is not
        if (channels_last) grad_out = grad_out.contiguous(at::MemoryFormat::ChannelsLast);

        // Expected values from ATen autograd through the composite forward
        // out = cat(beta*r + (1-beta)*k, k), r = y_r + s_r, k = y_k + s_k, with r - k == diff.
        const at::Tensor y = at::randn({2 * s.n, s.c, s.h, s.w}, opts).requires_grad_(true);
        const at::Tensor b = beta.clone().requires_grad_(true);
        const at::Tensor y_r = y.slice(0, 0, s.n), y_k = y.slice(0, s.n);
        const at::Tensor shift_r = (diff - y_r.detach() + y_k.detach());  // makes r - k == diff
        const at::Tensor r = y_r + shift_r, k = y_k;
        const at::Tensor bv = b.view({1, s.c, 1, 1});
        const at::Tensor out = at::cat({bv * r + (1 - bv) * k, k});
        out.backward(grad_out);
        const at::Tensor want_grad_y = y.grad();
        const at::Tensor want_grad_beta = b.grad();
        const at::Tensor want_sums = want_grad_y.sum({2, 3});

        // The same from the plain formulas.
        const at::Tensor g_r = grad_out.slice(0, 0, s.n), g_k = grad_out.slice(0, s.n);
        const at::Tensor b4 = beta.view({1, s.c, 1, 1});
        const at::Tensor formula_grad_y = at::cat({b4 * g_r, (1 - b4) * g_r + g_k});
        const at::Tensor formula_grad_beta = (g_r * diff).sum({0, 2, 3});

        const double tol = dtype == at::kFloat ? 1e-4 : 1e-10;
        std::ostringstream what;
        what << "dual_mix_backward " << dtype << (channels_last ? " channels_last" : " NCHW")
             << " n=" << s.n << " c=" << s.c << " hw=" << s.h << "x" << s.w;
        EXPECT_CLOSE(formula_grad_y, want_grad_y, tol, tol, what.str() + " (formula vs autograd) grad_y");
        EXPECT_CLOSE(formula_grad_beta, want_grad_beta, tol, tol,
                    what.str() + " (formula vs autograd) grad_beta");

        auto [grad_y, grad_beta, sums] = mix_backward_op().call(grad_out, beta, diff, true, true);
        EXPECT_CLOSE(grad_y, want_grad_y, tol, tol, what.str() + " grad_y");
        EXPECT_CLOSE(grad_beta, want_grad_beta, tol, tol, what.str() + " grad_beta");
        EXPECT_CLOSE(sums, want_sums, tol, tol, what.str() + " sums");
        if (channels_last) {
          EXPECT_MSG(grad_y.is_contiguous(at::MemoryFormat::ChannelsLast),
                    what.str() << ": grad_y should stay channels_last");
        }

        // need_beta / need_sums off: empty outputs, grad_y unchanged, diff not even looked at.
        auto [grad_y2, grad_beta2, sums2] =
            mix_backward_op().call(grad_out, beta, at::empty({0}, opts), false, false);
        EXPECT_CLOSE(grad_y2, want_grad_y, tol, tol, what.str() + " grad_y (no beta, no sums)");
        EXPECT_MSG(grad_beta2.numel() == 0 && sums2.numel() == 0,
                  what.str() << ": grad_beta/sums should be empty when not requested");
        ++run;
      }
    }
  }
  {
    // bfloat16: grad_y and grad_beta come back in bfloat16, the sums in float, because the caller
    // still reduces them over samples.
    const auto opts = at::TensorOptions().dtype(at::kBFloat16);
    const at::Tensor grad_out = at::randn({4, 5, 6, 7}, opts), beta = at::rand({5}, opts);
    const at::Tensor diff = at::randn({2, 5, 6, 7}, opts);
    auto [grad_y, grad_beta, sums] = mix_backward_op().call(grad_out, beta, diff, true, true);
    const at::Tensor g = grad_out.to(at::kDouble), b = beta.to(at::kDouble).view({1, 5, 1, 1});
    const at::Tensor g_r = g.slice(0, 0, 2), g_k = g.slice(0, 2);
    const at::Tensor want_grad_y = at::cat({b * g_r, (1 - b) * g_r + g_k});
    EXPECT_CLOSE(grad_y, want_grad_y.to(at::kBFloat16), 1e-2, 1e-2, "dual_mix_backward bf16 grad_y");
    EXPECT_CLOSE(grad_beta, (g_r * diff.to(at::kDouble)).sum({0, 2, 3}).to(at::kBFloat16), 2e-2, 2e-2,
                 "dual_mix_backward bf16 grad_beta");
    EXPECT_CLOSE(sums, want_grad_y.sum({2, 3}).to(at::kFloat), 1e-5, 1e-4, "dual_mix_backward bf16 sums");
    ++run;
  }
  std::printf("  dual_mix_backward: %d configurations\n", run);
}

void test_lemma2_sample() {
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    const auto opts = at::TensorOptions().dtype(dtype);
    const int64_t n = 3, c = 5;  // n*2*c = 30: the last Philox block is partly used
    const at::Tensor R = at::randn({c, c}, opts);
    const double gamma = 0.7;

    const at::Tensor a = lemma2(R, gamma, n, 1234);
    const at::Tensor b = lemma2(R, gamma, n, 1234);
    const at::Tensor other = lemma2(R, gamma, n, 1235);
    EXPECT_MSG(a.sizes() == at::IntArrayRef({n, 2, c}), "lemma2_sample shape " << a.sizes());
    EXPECT_MSG(a.scalar_type() == dtype, "lemma2_sample dtype " << a.scalar_type());
    EXPECT_MSG(at::equal(a, b), "lemma2_sample: the same seed must give identical samples");
    EXPECT_MSG(!at::equal(a, other), "lemma2_sample: different seeds gave identical samples");

    // Against the Philox stream drawn here from philox.h: element i of z (n, 2, C) is
    // philox_normal4(seed, i / 4)[i % 4].
    const int64_t seed = -42;  // negative seeds are reinterpreted as uint64
    std::vector<double> zs(n * 2 * c);
    for (size_t i = 0; i < zs.size(); ++i) {
      double v[4];
      scop::philox_normal4(static_cast<uint64_t>(seed), i / 4, v);
      zs[i] = v[i % 4];
    }
    const at::Tensor z = at::tensor(zs, at::kDouble).view({n, 2, c}).to(dtype);
    const at::Tensor shared = z.select(1, 0) * std::sqrt(gamma);
    const at::Tensor rotated = at::matmul(z.select(1, 1), R.t());
    const at::Tensor want = at::stack({shared + rotated, shared - rotated}, 1);
    const double tol = dtype == at::kFloat ? 1e-5 : 1e-12;
    std::ostringstream what;
    what << "lemma2_sample " << dtype << " vs philox.h";
    EXPECT_CLOSE(lemma2(R, gamma, n, seed), want, tol, tol, what.str());

    // R = I, gamma = 0: b = z2, b~ = -z2.
    const at::Tensor eye = at::eye(c, opts);
    const at::Tensor s = lemma2(eye, 0.0, 7, 99);
    EXPECT_MSG(at::equal(s.select(1, 1), -s.select(1, 0)),
              "lemma2_sample with R=I, gamma=0: out[:,1] must equal -out[:,0]");
    EXPECT_MSG(s.abs().sum().item<double>() > 0, "lemma2_sample with R=I, gamma=0 is all zero");

    const at::Tensor empty = lemma2(R, gamma, 0, 5);
    EXPECT_MSG(empty.sizes() == at::IntArrayRef({0, 2, c}), "lemma2_sample n=0 shape " << empty.sizes());
  }
}

void test_bad_inputs() {
  const at::Tensor w = at::randn({4, 3, 3, 3});
  const at::Tensor beta = at::rand({4});
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  EXPECT_THROWS_C10(conv_op().call(at::randn({3, 3, 8, 8}), w, std::nullopt, beta, std::nullopt,
                                  one, zero, one, 1, false),
                   "dual_scaled_conv2d with an odd batch");
  EXPECT_THROWS_C10(conv_op().call(at::randn({4, 3, 8, 8}), w, std::nullopt, at::rand({5}),
                                  std::nullopt, one, zero, one, 1, false),
                   "dual_scaled_conv2d with beta of the wrong length");
  EXPECT_THROWS_C10(conv_op().call(at::randn({4, 3, 8, 8}), w, std::nullopt, beta,
                                  at::randn({2, 2, 3}), one, zero, one, 1, false),
                   "dual_scaled_conv2d with knockoff_bias of the wrong shape");
  EXPECT_THROWS_C10(conv_op().call(at::randn({4, 3, 8, 8}, at::kDouble), w, std::nullopt, beta,
                                  std::nullopt, one, zero, one, 1, false),
                   "dual_scaled_conv2d with mixed dtypes");
  EXPECT_THROWS_C10(mix_backward_op().call(at::randn({3, 4, 2, 2}), beta, at::randn({1, 4, 2, 2}),
                                          true, true),
                   "dual_mix_backward with an odd batch");
  EXPECT_THROWS_C10(mix_backward_op().call(at::randn({4, 4, 2, 2}), beta, at::randn({2, 4, 3, 2}),
                                          true, true),
                   "dual_mix_backward with diff of the wrong shape");
  // The checks ATen's own convolution would otherwise meet first, or not at all.
  EXPECT_THROWS_WITH(conv_op().call(at::randn({4, 4, 8, 8}), at::randn({5, 2, 3, 3}), std::nullopt, at::rand({5}),
                                    std::nullopt, one, zero, one, 2, false),
                     "output channels are not divisible by groups=2", "dual_scaled_conv2d with C_out % groups != 0");
  const std::vector<int64_t> three{1, 1, 1};
  EXPECT_THROWS_WITH(conv_op().call(at::randn({4, 3, 8, 8}), w, std::nullopt, beta, std::nullopt, three, zero,
                                    one, 1, false),
                     "must have 2 entries each, got 3, 2 and 2", "dual_scaled_conv2d with 3 strides");
  EXPECT_THROWS_WITH(conv_op().call(at::randn({4, 3, 8, 8}), w, std::nullopt, beta, std::nullopt, one, three,
                                    one, 1, false),
                     "must have 2 entries each, got 2, 3 and 2", "dual_scaled_conv2d with 3 paddings");
  EXPECT_THROWS_WITH(conv_op().call(at::randn({4, 3, 8, 8}), w, std::nullopt, beta, std::nullopt, one, zero,
                                    std::vector<int64_t>{1}, 1, false),
                     "must have 2 entries each, got 2, 2 and 1", "dual_scaled_conv2d with 1 dilation");
  EXPECT_THROWS_WITH(mix_backward_op().call(at::ones({4, 4, 2, 2}, at::kLong), beta, at::empty({0}), false, true),
                     "grad_out must be floating point", "dual_mix_backward with an integer grad_out");
  const at::Tensor R = at::eye(3);
  EXPECT_THROWS_C10(lemma2_op().call(R, 1.0, c10::SymInt(2), at::tensor({1}, at::kInt)),
                   "lemma2_sample with an int32 seed");
  EXPECT_THROWS_C10(lemma2_op().call(R, -1.0, c10::SymInt(2), at::tensor({int64_t{1}}, at::kLong)),
                   "lemma2_sample with gamma < 0");
  EXPECT_THROWS_C10(lemma2_op().call(at::randn({3, 2}), 1.0, c10::SymInt(2),
                                    at::tensor({int64_t{1}}, at::kLong)),
                   "lemma2_sample with a non-square R");
}

// With a CUDA build of the library and a visible GPU: the CUDA kernels against the CPU ones.
void test_cuda_matches_cpu() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const bool has_kernel =
      dispatcher.findSchemaOrThrow("scop::dual_scaled_conv2d", "").hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  if (!has_kernel || !at::hasCUDA()) {
    std::printf("  CUDA: skipped (%s)\n", has_kernel ? "no GPU visible" : "library built without CUDA");
    return;
  }
  // cuDNN and cuBLAS round float32 to TF32 by default on Ampere and later (about 1e-3 relative):
  // the comparison at 1e-4 needs full float32.
  at::globalContext().setAllowTF32CuDNN(false);
  at::globalContext().setAllowTF32CuBLAS(false);
  const auto cuda = at::Device(at::kCUDA, 0);
  for (const bool channels_last : {false, true}) {
    at::Tensor input = at::randn({6, 5, 9, 11});
    if (channels_last) input = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor w = at::randn({21, 5, 3, 3}), beta = at::rand({21}), bias = at::randn({21});
    const at::Tensor knockoff_bias = at::randn({3, 2, 21});
    const std::vector<int64_t> one{1, 1};
    auto [out, diff] = conv_op().call(input, w, bias, beta, knockoff_bias, one, one, one, 1, true);
    auto [out_c, diff_c] = conv_op().call(input.to(cuda), w.to(cuda), bias.to(cuda), beta.to(cuda),
                                          knockoff_bias.to(cuda), one, one, one, 1, true);
    EXPECT_CLOSE(out_c.cpu(), out, 1e-4, 1e-4, "CUDA dual_scaled_conv2d out");
    EXPECT_CLOSE(diff_c.cpu(), diff, 1e-4, 1e-4, "CUDA dual_scaled_conv2d diff");

    at::Tensor g = at::randn_like(out);
    auto [gy, gb, sums] = mix_backward_op().call(g, beta, diff, true, true);
    auto [gy_c, gb_c, sums_c] = mix_backward_op().call(g.to(cuda), beta.to(cuda), diff.to(cuda), true, true);
    EXPECT_CLOSE(gy_c.cpu(), gy, 1e-4, 1e-4, "CUDA dual_mix_backward grad_y");
    EXPECT_CLOSE(gb_c.cpu(), gb, 1e-3, 1e-3, "CUDA dual_mix_backward grad_beta");
    EXPECT_CLOSE(sums_c.cpu(), sums, 1e-3, 1e-3, "CUDA dual_mix_backward sums");
  }
  const at::Tensor R = at::randn({7, 7});
  EXPECT_CLOSE(lemma2(R.to(cuda), 0.3, 5, 77).cpu(), lemma2(R, 0.3, 5, 77), 1e-5, 1e-5,
              "CUDA lemma2_sample vs CPU (same Philox stream)");
  std::printf("  CUDA: compared with CPU\n");
}

struct NamedTest {
  const char* name;
  void (*fn)();
};

}  // namespace

int main() {
  at::manual_seed(0);
  const NamedTest tests[] = {
      {"registration", test_registration},
      {"philox_known_answers", test_philox_known_answers},
      {"dual_scaled_conv2d", test_dual_scaled_conv2d},
      {"dual_mix_backward", test_dual_mix_backward},
      {"lemma2_sample", test_lemma2_sample},
      {"bad_inputs", test_bad_inputs},
      {"cuda_matches_cpu", test_cuda_matches_cpu},
  };
  int failed_tests = 0;
  for (const NamedTest& t : tests) {
    const int before = g_failures;
    std::printf("[ RUN  ] %s\n", t.name);
    try {
      t.fn();
    } catch (const std::exception& e) {
      report_failure(__FILE__, __LINE__, std::string(t.name) + ": unexpected exception: " + e.what());
    }
    const bool ok = g_failures == before;
    failed_tests += ok ? 0 : 1;
    std::printf("[ %s ] %s\n", ok ? " OK " : "FAIL", t.name);
  }
  std::printf("scop_ops_test: %d checks, %d failures, %d of %zu tests failed\n", g_checks,
              g_failures, failed_tests, sizeof(tests) / sizeof(tests[0]));
  return g_failures == 0 ? 0 : 1;
}
