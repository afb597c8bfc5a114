"""Property-based fuzzing of the compiled operators (hypothesis) and a sanitizer run of the CPU kernels.

Valid random configurations must match ``scop_ext.reference`` forward and backward; every invalid
one must raise a ValueError naming the argument at the Python boundary, and the raw
``torch.ops.scop`` ops must turn bad arguments into Python exceptions (their TORCH_CHECKs), never
a crash. The profile is fixed (``derandomize=True``, no database) so CI replays the same examples;
``--hypothesis-show-statistics`` prints how many ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scop_ext
from scop_ext.ops import reference
from tests._helpers import layout
from tests.conftest import NEEDS_CUDA

ROOT = Path(__file__).resolve().parents[2]


pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:TF32 acceleration")]  # said by torch.backends.mkldnn.flags


def native_conv():
    """ATen's own convolution instead of oneDNN's, for the references.

    oneDNN in torch 2.14 (CPU) has two bugs the fuzzing hit: a float32 convolution *with a bias*
    on a channels_last input or weight segfaults (NULL read in brgemm_convolution_fwd_t::
    perform_outwork) for e.g. input (2, 3, 1, 2), weight (1, 3, 2, 1), stride (1, 3), padding
    (3, 1), dilation (2, 3); and its bf16 convolution returns garbage (reads uninitialised memory)
    for e.g. input (6, 2, 6, 5), weight (1, 2, 1, 4), stride (1, 3), padding (0, 1), dilation
    (1, 2). The fused op never hands its bias to the convolution, so only the references (F.conv2d
    with a bias) meet the first; the second is avoided for the bf16 cases below.
    """
    return torch.backends.mkldnn.flags(enabled=False)


def fuzz(max_examples: int):
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# (input scale, weight scale) per dtype: ordinary, products near the top of the range, products
# in the subnormal range, and subnormal inputs themselves.
MAGNITUDES = {
    torch.float32: [(1.0, 1.0), (1e15, 1e15), (1e-20, 1e-20), (2e-39, 1.0), (1e30, 1e-30)],
    torch.float64: [(1.0, 1.0), (1e150, 1e150), (1e-160, 1e-160), (5e-309, 1.0)],
    torch.bfloat16: [(1.0, 1.0), (1e15, 1e15), (1e-15, 1e-15)],
}
# The same without subnormal products, for CUDA: cuDNN may flush subnormals to zero.
NORMAL_MAGNITUDES = {torch.float32: [(1.0, 1.0), (1e15, 1e15), (1e30, 1e-30)], torch.float64: [(1.0, 1.0), (1e150, 1e150)]}
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


@st.composite
def conv_cases(draw, dtypes=(torch.float32, torch.float64), magnitudes=MAGNITUDES):
    """A valid configuration of the fused op with its tensors (built from a drawn torch seed)."""
    dtype = draw(st.sampled_from(dtypes))
    g = draw(st.sampled_from([1, 1, 2, 3]))
    c_in, c_out = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    hw = [max(1, dilation[i] * (k[i] - 1) + 1 - 2 * padding[i]) + draw(st.integers(0, 8)) for i in (0, 1)]
    n = draw(st.integers(0, 3))
    xs, ws = draw(st.sampled_from(magnitudes[dtype]))
    beta_kind = draw(st.sampled_from(["uniform", "zeros", "ones", "binary"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    f64 = dict(dtype=torch.float64, generator=gen)
    fan_in = c_in // g * k[0] * k[1]
    x = torch.randn(2 * n, c_in, *hw, **f64) * xs
    w = torch.randn(c_out, c_in // g, *k, **f64) * (ws / fan_in**0.5)
    beta = {
        "uniform": lambda: torch.rand(c_out, **f64),
        "zeros": lambda: torch.zeros(c_out, dtype=torch.float64),
        "ones": lambda: torch.ones(c_out, dtype=torch.float64),
        "binary": lambda: torch.randint(0, 2, (c_out,), generator=gen).double(),
    }[beta_kind]()
    bias = torch.randn(c_out, **f64) * xs * ws if draw(st.booleans()) else None
    knockoff_bias = torch.randn(n, 2, c_out, **f64) * xs * ws if draw(st.booleans()) else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x = layout(cast(x), draw(st.sampled_from(LAYOUTS)))
    w = cast(w)
    if draw(st.booleans()):
        w = w.contiguous(memory_format=torch.channels_last)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=g)
    return dict(input=x, weight=w, bias=cast(bias), beta=cast(beta), knockoff_bias=cast(knockoff_bias)), conv


def _magnitudes(args, conv, grad, ref_dtype) -> dict[str, torch.Tensor]:
    """Per element, the sum of |terms| behind each output and gradient of the op.

    Rounding errors scale with these, not with the results, which cancellation can make
    arbitrarily small: the same computation on absolute values (beta, in [0, 1], stays as is).
    """
    absolute = {k: None if v is None else v.detach().to(ref_dtype).abs().requires_grad_() for k, v in args.items()}
    absolute["beta"] = args["beta"].detach().to(ref_dtype)
    out = reference.dual_scaled_conv2d(**absolute, **conv)
    out.backward(grad.abs().to(ref_dtype))
    mags = {"forward": out.detach(), **{k: v.grad for k, v in absolute.items() if v is not None and k != "beta"}}
    # grad_beta = sum g_r (r - k) over batch and pixels: bounded by sum |g_r| (|r| + |k|)
    n = len(out) // 2
    y = torch.nn.functional.conv2d(absolute["input"], absolute["weight"], absolute["bias"], **conv).detach()
    r, k = y[:n], y[n:]
    if absolute["knockoff_bias"] is not None:
        r = r + absolute["knockoff_bias"].detach()[:, 0, :, None, None]
        k = k + absolute["knockoff_bias"].detach()[:, 1, :, None, None]
    mags["beta"] = (grad[:n].abs().to(ref_dtype) * (r + k)).sum((0, 2, 3))
    return mags


def _assert_close(got, want, magnitude, dtype, what):
    """|got - want| <= TOL x magnitude, element by element, with a floor of subnormal spacings."""
    got, want, magnitude = got.detach().double(), want.detach().double(), magnitude.double()
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bad = ~((got - want).abs() <= TOL[dtype] * magnitude + 1e3 * tiny)  # also catches NaN
    if bool(bad.any()):
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ, e.g. at {i}: got "
                             f"{float(got[i]):.6g}, reference {float(want[i]):.6g}, magnitude {float(magnitude[i]):.3g}")


def _check_against_reference(args, conv, dtype, ref_dtype):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in args.items()}
    ref_leaves = {k: None if v is None else v.detach().to(ref_dtype).requires_grad_() for k, v in args.items()}
    out = scop_ext.dual_scaled_conv2d(**leaves, **conv)
    with native_conv():
        want = reference.dual_scaled_conv2d(**ref_leaves, **conv)
        assert out.shape == want.shape and out.dtype == dtype
        grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(want.device)
        mags = _magnitudes(args, conv, grad, ref_dtype)
        want.backward(grad.to(ref_dtype))
    _assert_close(out, want, mags["forward"], dtype, "forward")
    out.backward(grad.to(dtype))
    for name, leaf in leaves.items():
        if leaf is not None:
            _assert_close(leaf.grad, ref_leaves[name].grad, mags[name], dtype, f"grad of {name}")


@fuzz(max_examples=1000)
@given(conv_cases())
def test_fused_conv_matches_reference(case):
    args, conv = case
    dtype = args["input"].dtype
    _check_against_reference(args, conv, dtype, dtype)


@fuzz(max_examples=300)
@given(conv_cases(dtypes=(torch.bfloat16,)))
def test_fused_conv_bfloat16_close_to_float32(case):
    """bf16 on CPU (scalar opmath path) against the float32 reference of the same rounded values.

    The fused op's own convolution runs on ATen's native path here too (see native_conv).
    """
    args, conv = case
    with native_conv():
        _check_against_reference(args, conv, torch.bfloat16, torch.float32)


@pytest.mark.cuda
@NEEDS_CUDA
@fuzz(max_examples=200)
@given(conv_cases(magnitudes=NORMAL_MAGNITUDES))
def test_fused_conv_cuda_matches_reference(case):
    """The CUDA kernels on the same kind of configurations, against the reference on the GPU in
    the same dtype. Layouts come over as .to() keeps them: a strided view arrives contiguous."""
    args, conv = case
    args = {k: None if v is None else v.to("cuda") for k, v in args.items()}
    _check_against_reference(args, conv, args["input"].dtype, args["input"].dtype)


# ------------------------------------------------------------------------ invalid arguments


def _odd_batch(a, c):
    a["input"] = torch.cat([a["input"], a["input"].new_zeros(1, *a["input"].shape[1:])])


def _channels(a, c):
    a["input"] = torch.cat([a["input"], a["input"][:, :1]], 1)


def _too_small(a, c):
    c["padding"] = 0
    w = a["weight"]
    a["weight"] = torch.zeros(*w.shape[:2], a["input"].shape[2] + 1, w.shape[3], dtype=w.dtype)


def _cout_not_divisible(a, c):
    x = a["input"]
    a.update(input=torch.cat([x[:, :1]] * 2, 1), weight=x.new_zeros(3, 1, 1, 1), beta=x.new_zeros(3), bias=None,
             knockoff_bias=None)
    c["groups"] = 2


def _other_float(t):
    return t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)


# (name, mutation of (tensors, conv kwargs), regex the ValueError must match)
MUTATIONS = [
    ("input not a tensor", lambda a, c: a.update(input=a["input"].tolist()), "input must be a torch.Tensor"),
    ("input 3-D", lambda a, c: a.update(input=a["input"][:, 0]), "input must be 4-D"),
    ("input 5-D", lambda a, c: a.update(input=a["input"][None]), "input must be 4-D"),
    ("input integer", lambda a, c: a.update(input=a["input"].to(torch.int32)), "input must be a floating-point"),
    ("input complex", lambda a, c: a.update(input=a["input"].to(torch.complex64)), "input must be a floating-point"),
    ("float16 on CPU", lambda a, c: a.update({k: v.half() for k, v in a.items() if v is not None}),
     "input has dtype torch.float16, which the cpu kernel does not support"),
    ("odd batch", _odd_batch, "input batch must be 2N"),
    ("channel mismatch", _channels, "input has \\d+ channels but weight"),
    ("weight 3-D", lambda a, c: a.update(weight=a["weight"][..., 0]), "weight must be 4-D"),
    ("weight integer", lambda a, c: a.update(weight=a["weight"].to(torch.int64)), "weight must be a floating-point"),
    ("weight dtype", lambda a, c: a.update(weight=_other_float(a["weight"])), "weight has dtype"),
    ("beta short", lambda a, c: a.update(beta=a["beta"][:-1]), "beta must have shape"),
    ("beta long", lambda a, c: a.update(beta=torch.cat([a["beta"], a["beta"]])), "beta must have shape"),
    ("beta 2-D", lambda a, c: a.update(beta=a["beta"][None]), "beta must be 1-D"),
    ("beta NaN", lambda a, c: a["beta"].__setitem__(0, float("nan")), "beta contains NaN or Inf"),
    ("beta Inf", lambda a, c: a["beta"].__setitem__(-1, float("-inf")), "beta contains NaN or Inf"),
    ("beta dtype", lambda a, c: a.update(beta=_other_float(a["beta"])), "beta has dtype"),
    ("beta on meta", lambda a, c: a.update(beta=a["beta"].to("meta")), "beta is on meta"),
    ("bias shape", lambda a, c: a.update(bias=torch.zeros(a["beta"].numel() + 1, dtype=a["beta"].dtype)), "bias must have shape"),
    ("bias dtype", lambda a, c: a.update(bias=_other_float(torch.zeros_like(a["beta"]))), "bias has dtype"),
    ("bias integer", lambda a, c: a.update(bias=torch.zeros(a["beta"].shape, dtype=torch.int32)), "bias must be a floating-point"),
    ("bias on meta", lambda a, c: a.update(bias=torch.zeros_like(a["beta"], device="meta")), "bias is on meta"),
    ("knockoff_bias shape", lambda a, c: a.update(knockoff_bias=torch.zeros(len(a["input"]) // 2 + 1, 2, a["beta"].numel(), dtype=a["beta"].dtype)),
     "knockoff_bias must have shape"),
    ("knockoff_bias 2-D", lambda a, c: a.update(knockoff_bias=torch.zeros(2, a["beta"].numel(), dtype=a["beta"].dtype)),
     "knockoff_bias must have shape"),
    ("knockoff_bias dtype", lambda a, c: a.update(knockoff_bias=_other_float(a["beta"].new_zeros(len(a["input"]) // 2, 2, a["beta"].numel()))),
     "knockoff_bias has dtype"),
    ("stride 0", lambda a, c: c.update(stride=(1, 0)), "stride must be >= 1"),
    ("stride negative", lambda a, c: c.update(stride=-2), "stride must be >= 1"),
    ("stride triple", lambda a, c: c.update(stride=(1, 1, 1)), "stride must be an int or a pair"),
    ("stride float", lambda a, c: c.update(stride=1.5), "stride must be an int or a pair"),
    ("stride bool", lambda a, c: c.update(stride=True), "stride must be an int or a pair"),
    ("padding negative", lambda a, c: c.update(padding=(0, -1)), "padding must be >= 0"),
    ("padding string", lambda a, c: c.update(padding="same"), "padding must be an int or a pair"),
    ("dilation 0", lambda a, c: c.update(dilation=0), "dilation must be >= 1"),
    ("groups 0", lambda a, c: c.update(groups=0), "groups must be a positive int"),
    ("groups negative", lambda a, c: c.update(groups=-1), "groups must be a positive int"),
    ("groups float", lambda a, c: c.update(groups=1.0), "groups must be a positive int"),
    ("groups bool", lambda a, c: c.update(groups=True), "groups must be a positive int"),
    ("groups mismatch", lambda a, c: c.update(groups=c["groups"] + 1), "input has \\d+ channels but weight"),
    ("C_out not divisible by groups", _cout_not_divisible, "output channels are not divisible by groups"),
    ("input too small", _too_small, "input height \\d+ is too small"),
]


@fuzz(max_examples=600)
@given(conv_cases(), st.sampled_from(MUTATIONS))
def test_invalid_arguments_raise_value_error_naming_them(case, mutation):
    args, conv = case
    name, mutate, match = mutation
    mutate(args, conv)
    with pytest.raises(ValueError, match=match):
        scop_ext.dual_scaled_conv2d(**args, **conv)


# --------------------------------------------------------------------------- Lemma 2 sampler


@st.composite
def sampler_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    c = draw(st.integers(0, 17))
    n = draw(st.integers(0, 9))  # n * 2 * C covers every remainder mod 4: the Philox block tail
    gamma = draw(st.one_of(st.just(0.0), st.floats(0.0, 1e3, allow_nan=False, allow_subnormal=True)))
    seed = draw(st.integers(-(2**63), 2**63 - 1))
    scale = draw(st.sampled_from([1.0, 1e-30, 1e30]) if dtype != torch.bfloat16 else st.just(1.0))
    R = torch.randn(c, c, dtype=torch.float64, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))))
    R = (R * scale).to(dtype)
    if draw(st.booleans()):
        R = R.T  # a non-contiguous view
    return R, gamma, n, seed


@fuzz(max_examples=600)
@given(sampler_cases())
def test_lemma2_sample_matches_reference(case):
    R, gamma, n, seed = case
    got = scop_ext.lemma2_sample(R, gamma, n, seed=seed)
    assert got.shape == (n, 2, R.shape[0]) and got.dtype == R.dtype
    ref_dtype = torch.float32 if R.dtype == torch.bfloat16 else R.dtype  # bf16 matmuls round differently
    want = reference.lemma2_sample(R.to(ref_dtype), gamma, n, seed)
    z = reference.philox_normal(n * 2 * R.shape[0], seed).view(n, 2, R.shape[0]).abs()
    magnitude = gamma**0.5 * z[:, 0] + z[:, 1] @ R.double().abs().T
    _assert_close(got, want, torch.stack([magnitude, magnitude], 1), R.dtype, "lemma2_sample")


SAMPLER_MUTATIONS = [
    ("R not a tensor", dict(R=[[1.0]]), "R must be a torch.Tensor"),
    ("R 1-D", dict(R=torch.ones(3)), "R must be 2-D"),
    ("R 3-D", dict(R=torch.ones(2, 2, 2)), "R must be 2-D"),
    ("R not square", dict(R=torch.ones(3, 2)), "R must be square"),
    ("R integer", dict(R=torch.eye(3, dtype=torch.int64)), "R must be a floating-point"),
    ("R bool", dict(R=torch.eye(3, dtype=torch.bool)), "R must be a floating-point"),
    ("R float16 on CPU", dict(R=torch.eye(3).half()), "R has dtype torch.float16, which the cpu kernel"),
    ("gamma negative", dict(gamma=-1e-9), "gamma must be finite and >= 0"),
    ("gamma NaN", dict(gamma=float("nan")), "gamma must be finite and >= 0"),
    ("gamma Inf", dict(gamma=float("inf")), "gamma must be finite and >= 0"),
    ("gamma string", dict(gamma="0.1"), "gamma must be a number"),
    ("gamma None", dict(gamma=None), "gamma must be a number"),
    ("gamma bool", dict(gamma=True), "gamma must be a number"),
    ("n negative", dict(n=-1), "n must be an int >= 0"),
    ("n float", dict(n=2.0), "n must be an int >= 0"),
    ("n bool", dict(n=True), "n must be an int >= 0"),
    ("seed too large", dict(seed=2**63), "seed must fit in int64"),
    ("seed too small", dict(seed=-(2**63) - 1), "seed must fit in int64"),
    ("seed float tensor", dict(seed=torch.tensor([1.0])), "seed must be an int or a one-element int64"),
    ("seed int32 tensor", dict(seed=torch.tensor([1], dtype=torch.int32)), "seed must be an int or a one-element int64"),
    ("seed two elements", dict(seed=torch.tensor([1, 2])), "seed must be an int or a one-element int64"),
    ("seed float", dict(seed=1.5), "seed must be an int or a one-element int64"),
    ("seed on meta", dict(seed=torch.tensor([1], device="meta")), "seed must be an int or a one-element int64"),
]


@fuzz(max_examples=300)
@given(sampler_cases(), st.sampled_from(SAMPLER_MUTATIONS))
def test_sampler_invalid_arguments_raise_value_error(case, mutation):
    R, gamma, n, seed = case
    _, changes, match = mutation
    args = dict(R=R, gamma=gamma, n=n, seed=seed) | changes
    with pytest.raises(ValueError, match=match):
        scop_ext.lemma2_sample(args.pop("R"), args.pop("gamma"), args.pop("n"), **args)


# --------------------------------------------------------------- raw ops, in a child process

# The raw ops skip the Python checks, so only the C++ TORCH_CHECKs (and ATen's own) stand between
# a bad argument and the kernels. A crash there would kill pytest, so the fuzzing runs in a child
# process that prints each case before running it: a segfault fails this test and names the case.
RAW_FUZZ = r'''
import sys, torch
if len(sys.argv) > 2:  # another build of the library (the ASan one), without scop_ext's Python side
    torch.ops.load_library(sys.argv[2])
else:
    import scop_ext
from hypothesis import given, settings, HealthCheck, strategies as st

conv = torch.ops.scop.dual_scaled_conv2d.default
mix = torch.ops.scop._dual_mix_backward.default
sample = torch.ops.scop.lemma2_sample.default
ran = [0]

def base(d):
    g = d(st.sampled_from([1, 2]))
    n, c_in, c_out = d(st.integers(0, 2)), g * d(st.integers(1, 3)), g * d(st.integers(1, 3))
    h, w, k = d(st.integers(3, 7)), d(st.integers(3, 7)), d(st.integers(1, 3))
    dtype = d(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    t = lambda *s: torch.randn(*s).to(dtype)
    return dict(input=t(2 * n, c_in, h, w), weight=t(c_out, c_in // g, k, k), bias=t(c_out), beta=t(c_out),
                knockoff_bias=t(n, 2, c_out), stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=g, save_diff=True)

def change(**kw):
    return lambda a: a.update({k: (f(a) if callable(f) else f) for k, f in kw.items()})

# (what, change to the conv arguments, regex of the message; "scop:" marks our own TORCH_CHECKs)
CONV = [
    ("odd batch", change(input=lambda a: torch.cat([a["input"], a["input"].new_zeros(1, *a["input"].shape[1:])])), "scop: input batch must be 2N"),
    ("input 3-D", change(input=lambda a: a["input"][:, 0]), "scop: input must be 4-D"),
    ("weight 5-D", change(weight=lambda a: a["weight"][None]), "scop: weight must be 4-D"),
    ("channels", change(input=lambda a: torch.cat([a["input"]] * 2, 1)), "scop: input has \\d+ channels"),
    ("groups 0", change(groups=0), "scop: input has \\d+ channels"),
    ("groups negative", change(groups=-3), "scop: input has \\d+ channels"),
    ("beta short", change(beta=lambda a: a["beta"][1:]), "scop: beta must have shape"),
    ("beta 0-D", change(beta=lambda a: a["beta"][0]), "scop: beta must have shape"),
    ("bias long", change(bias=lambda a: torch.cat([a["bias"], a["bias"]])), "scop: bias must have shape"),
    ("knockoff_bias shape", change(knockoff_bias=lambda a: a["knockoff_bias"][:, :1]), "scop: knockoff bias must have shape"),
    ("knockoff_bias 4-D", change(knockoff_bias=lambda a: a["knockoff_bias"][None]), "scop: knockoff bias must have shape"),
    ("beta dtype", change(beta=lambda a: a["beta"].to(torch.float64 if a["beta"].dtype != torch.float64 else torch.float32)),
     "scop: input, weight and beta must share a dtype"),
    ("bias dtype", change(bias=lambda a: a["bias"].to(torch.float64 if a["bias"].dtype != torch.float64 else torch.float32)),
     "scop: bias must match"),
    ("knockoff_bias integer", change(knockoff_bias=lambda a: a["knockoff_bias"].long()), "scop: knockoff bias must match"),
    ("all integer", lambda a: a.update({k: a[k].long() for k in ("input", "weight", "bias", "beta", "knockoff_bias")}), "scop: input must be floating point, got Long"),
    ("all float16 on CPU", lambda a: a.update({k: a[k].half() for k in ("input", "weight", "bias", "beta", "knockoff_bias")}), "not implemented for 'Half'"),
    ("beta on meta", change(beta=lambda a: a["beta"].to("meta")), "must be on one device|no fake impl or Meta kernel"),
    ("stride 0", change(stride=[0, 1]), "scop: stride and dilation must be >= 1 and padding >= 0"),
    ("stride negative", change(stride=[1, -4]), "scop: stride and dilation must be >= 1 and padding >= 0"),
    ("stride of 3", change(stride=[1, 1, 1]), "scop: stride, padding and dilation must have 2 entries each"),
    ("padding negative", change(padding=[-1, 0]), "scop: stride and dilation must be >= 1 and padding >= 0"),
    ("dilation 0", change(dilation=[1, 0]), "scop: stride and dilation must be >= 1 and padding >= 0"),
    ("kernel larger than input", change(weight=lambda a: a["weight"].new_zeros(*a["weight"].shape[:2], 9, 9)), "Kernel size can't be greater"),
]
MIX = [
    ("grad_out 3-D", lambda g, b, d: (g[:, 0], b, d, True, True), "scop: grad_out must be 4-D"),
    ("grad_out odd batch", lambda g, b, d: (torch.cat([g, g.new_zeros(1, *g.shape[1:])]), b, d, True, True), "scop: grad_out must be 4-D with an even batch"),
    ("beta short", lambda g, b, d: (g, b[1:], d, True, True), "scop: beta must have shape"),
    ("beta 2-D", lambda g, b, d: (g, b[None], d, False, True), "scop: beta must have shape"),
    ("diff shape", lambda g, b, d: (g, b, d[:, :, 1:], True, False), "scop: diff must have shape"),
    ("diff batch", lambda g, b, d: (g, b, torch.cat([d, d.new_zeros(1, *d.shape[1:])]), True, True), "scop: diff must have shape"),
    ("diff dtype", lambda g, b, d: (g, b, d.to(torch.float64 if d.dtype != torch.float64 else torch.float32), True, True), "scop: diff must match"),
    ("integer", lambda g, b, d: (g.long(), b, d.long(), True, True), "scop: grad_out must be floating point, got Long"),
    ("beta on meta", lambda g, b, d: (g, b.to("meta"), d, True, True), "must be on one device|no fake impl or Meta kernel"),
]
SAMPLE = [
    ("R 1-D", lambda R, s: (R[0], 0.5, 2, s), "scop: R must be square"),
    ("R not square", lambda R, s: (torch.cat([R, R]), 0.5, 2, s), "scop: R must be square"),
    ("R integer", lambda R, s: (R.long(), 0.5, 2, s), "scop: R must be floating point"),
    ("R complex", lambda R, s: (R.to(torch.complex64), 0.5, 2, s), "scop: R must be floating point"),
    ("R float16 on CPU", lambda R, s: (R.half(), 0.5, 2, s), "not implemented for 'Half'"),
    ("gamma negative", lambda R, s: (R, -0.5, 2, s), "scop: gamma must be >= 0"),
    ("gamma NaN", lambda R, s: (R, float("nan"), 2, s), "scop: gamma must be >= 0"),
    ("gamma Inf", lambda R, s: (R, float("inf"), 2, s), "scop: gamma must be finite"),
    ("n negative", lambda R, s: (R, 0.5, -3, s), "scop: n must be >= 0"),
    ("n overflowing the storage size", lambda R, s: (R, 0.5, 2**62, s), "overflow"),
    ("seed float", lambda R, s: (R, 0.5, 2, s.double()), "scop: seed must be a one-element int64 CPU tensor"),
    ("seed int32", lambda R, s: (R, 0.5, 2, s.int()), "scop: seed must be a one-element int64 CPU tensor"),
    ("seed two elements", lambda R, s: (R, 0.5, 2, torch.cat([s, s])), "scop: seed must be a one-element int64 CPU tensor"),
    ("seed empty", lambda R, s: (R, 0.5, 2, s[:0]), "scop: seed must be a one-element int64 CPU tensor"),
    ("seed on meta", lambda R, s: (R, 0.5, 2, s.to("meta")), "seed must be a CPU tensor|no fake impl or Meta kernel"),
]

def expect_error(what, call, match):
    import re
    print(what, flush=True)
    try:
        call()
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        assert re.search(match, str(exc), re.I), f"{what}: message {str(exc)[:300]!r} does not match {match!r}"
    else:
        raise AssertionError(f"{what}: no exception")
    ran[0] += 1

profile = settings(max_examples=int(sys.argv[1]), derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

@profile
@given(st.data(), st.sampled_from(CONV))
def fuzz_conv(data, case):
    what, mutate, match = case
    a = base(data.draw)
    mutate(a)
    expect_error(f"dual_scaled_conv2d: {what}", lambda: conv(*a.values()), match)

@profile
@given(st.data(), st.sampled_from(MIX))
def fuzz_mix(data, case):
    what, mutate, match = case
    a = base(data.draw)
    g = torch.randn(2 * len(a["knockoff_bias"]), len(a["beta"]), 4, 5).to(a["beta"].dtype)
    d = torch.randn(len(a["knockoff_bias"]), len(a["beta"]), 4, 5).to(a["beta"].dtype)
    expect_error(f"dual_mix_backward: {what}", lambda: mix(*mutate(g, a["beta"], d)), match)

@profile
@given(st.integers(1, 9), st.sampled_from([torch.float32, torch.float64]), st.integers(-(2**63), 2**63 - 1), st.sampled_from(SAMPLE))
def fuzz_sample(c, dtype, seed, case):
    what, mutate, match = case
    R, s = torch.randn(c, c, dtype=dtype), torch.tensor([seed])
    expect_error(f"lemma2_sample: {what}", lambda: sample(*mutate(R, s)), match)

fuzz_conv()
fuzz_mix()
fuzz_sample()
print(f"RAW-OPS-OK {ran[0]}", flush=True)
'''


def test_raw_ops_reject_bad_arguments_without_crashing(tmp_path):
    script = tmp_path / "raw_fuzz.py"
    script.write_text(RAW_FUZZ)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "200"], capture_output=True, text=True, env=env, timeout=300)
    last = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert proc.returncode == 0, (
        f"raw-op fuzzing exited with {proc.returncode} (negative: killed by signal) after case {last[0]!r}\n"
        f"{proc.stderr[-3000:]}"
    )
    count = int(last[0].split()[1])
    assert count >= 3 * 150, f"only {count} raw-op cases ran"
    print(f"raw-op fuzz cases: {count}")


# ------------------------------------------------------------------- AddressSanitizer (slow)

ASAN_DRIVER = r'''
import sys, torch
from hypothesis import given, settings, HealthCheck, strategies as st
torch.ops.load_library(sys.argv[1])  # the ASan build; scop_ext is not imported (same op namespace)
conv, mix = torch.ops.scop.dual_scaled_conv2d.default, torch.ops.scop._dual_mix_backward.default
sample = torch.ops.scop.lemma2_sample.default
F = torch.nn.functional
ran = [0]

def layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x

def check(n, c_in, c_out, h, w, k, stride, padding, groups, dtype, in_layout, grad_layout, extras, need_beta, need_sums):
    c_in, c_out = c_in * groups, c_out * groups
    x = layout(torch.randn(2 * n, c_in, h + k - 1, w + k - 1).to(dtype), in_layout)
    wt = torch.randn(c_out, c_in // groups, k, k).to(dtype)
    beta = torch.rand(c_out).to(dtype)
    bias, knockoff_bias = (torch.randn(c_out).to(dtype), torch.randn(n, 2, c_out).to(dtype)) if extras else (None, None)
    out, diff = conv(x, wt, bias, beta, knockoff_bias, [stride] * 2, [padding] * 2, [1, 1], groups, need_beta)
    # the reference in float64 (ATen's native path; its bias is added separately, see native_conv)
    with torch.backends.mkldnn.flags(enabled=False):
        y = F.conv2d(x.double(), wt.double(), None, stride, padding, 1, groups)
    if extras:
        y = y + bias.double().view(1, -1, 1, 1)
        y = torch.cat([y[:n] + knockoff_bias[:, 0, :, None, None].double(), y[n:] + knockoff_bias[:, 1, :, None, None].double()])
    r, kk = y[:n], y[n:]
    b = beta.double().view(1, -1, 1, 1)
    tol = {torch.float32: 1e-3, torch.float64: 1e-8, torch.bfloat16: 0.1}[dtype]
    scale = float(y.abs().max()) if y.numel() else 0.0
    torch.testing.assert_close(out.double(), torch.cat([b * r + (1 - b) * kk, kk]), rtol=tol, atol=tol * (scale + 1))
    g = layout(torch.randn(out.shape).to(dtype), grad_layout)
    gy, gb, sums = mix(g, beta, diff if need_beta else g.new_empty(0), need_beta, need_sums)
    gr, gk = g[:n].double(), g[n:].double()
    torch.testing.assert_close(gy.double(), torch.cat([b * gr, (1 - b) * gr + gk]), rtol=tol, atol=tol)
    if need_beta:
        terms = (gr.abs() * (r.abs() + kk.abs())).sum((0, 2, 3))
        assert bool(((gb.double() - (gr * (r - kk)).sum((0, 2, 3))).abs() <= tol * (terms + 1)).all())
    if need_sums:
        assert sums.shape == (2 * n, c_out)
    ran[0] += 1

dims = st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(1, 20), st.integers(1, 9), st.integers(1, 9),
                 st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.sampled_from([1, 1, 2]),
                 st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
                 st.sampled_from(["contiguous", "channels_last", "strided"]),
                 st.sampled_from(["contiguous", "channels_last", "strided"]), st.booleans(), st.booleans(), st.booleans())

@settings(max_examples=int(sys.argv[2]), derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(dims)
def fuzz_conv(case):
    check(*case)

@settings(max_examples=int(sys.argv[2]), derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 40), st.integers(0, 9), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       st.integers(-(2**63), 2**63 - 1))
def fuzz_sample(c, n, dtype, seed):
    s = sample(torch.randn(c, c).to(dtype), 0.3, n, torch.tensor([seed]))
    assert s.shape == (n, 2, c) and bool(torch.isfinite(s).all())
    ran[0] += 1

# N = 1 and odd sizes in every layout and dtype first, so they are covered whatever the draws
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for kind in ("contiguous", "channels_last", "strided"):
        for c_out in (1, 7, 17, 33):
            check(1, 3, c_out, 5, 7, 3, 1, 1, 1, dtype, kind, kind, True, True, True)
fuzz_conv()
fuzz_sample()
print(f"ASAN-DRIVER-OK {ran[0]}")
'''


def _asan_preload() -> str | None:
    """LD_PRELOAD for a Python process that loads an ASan-built library: the runtime must come
    first, and libstdc++ right after it, or ASan cannot find the real __cxa_throw and aborts on
    the first C++ exception (every failing TORCH_CHECK is one)."""
    paths = []
    for lib in ("libasan.so", "libstdc++.so"):
        proc = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True)
        path = proc.stdout.strip()
        if proc.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
            return None
        paths.append(path)
    return " ".join(paths)


@pytest.mark.slow
def test_cpu_kernels_under_address_sanitizer():
    """Builds scop_ops and its C++ test with -fsanitize=address (CMake -DSCOP_SANITIZE=address)
    and runs them: the C++ test, then from Python (libasan preloaded) the kernels on fuzzed valid
    arguments and the raw ops on the fuzzed invalid ones of test_raw_ops_reject_bad_arguments.

    libtorch itself is not instrumented, so only our kernels' accesses are checked (which is the
    point). LeakSanitizer is off: libtorch keeps its operator registry and thread pools alive until
    exit on purpose, and LSan would report those as leaks.
    """
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        pytest.skip("needs cmake and g++")
    preload = _asan_preload()
    if preload is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    from tests.ops.test_cmake import BUILD_ROOT, _env, _locked, _tail

    build = BUILD_ROOT / "cmake-asan"
    env = {**_env(), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=86"}
    start = time.monotonic()
    with _locked(BUILD_ROOT / "cmake-test.lock"):
        prefix = torch.utils.cmake_prefix_path
        steps = [
            ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
             f"-DTorch_DIR={os.path.join(prefix, 'Torch')}", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
             "-DSCOP_SANITIZE=address"],
            ["cmake", "--build", str(build), "-j", "2"],
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, f"{cmd[:2]} failed:\n{_tail(proc.stdout + proc.stderr)}"
        built = time.monotonic()
        lib = sorted(build.glob("libscop_ops.so*"))[0]
        symbols = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout
        assert "__asan_report_load" in symbols, "libscop_ops.so is not instrumented"
        proc = subprocess.run([str(build / "scop_ops_test")], cwd=build, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "0 failures" in proc.stdout, (
            f"scop_ops_test under ASan exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr, 120)}")
        assert "ERROR: AddressSanitizer" not in proc.stderr
        counts = []
        for name, script, args in (("asan_driver.py", ASAN_DRIVER, [str(lib), "300"]),
                                   ("raw_fuzz.py", RAW_FUZZ, ["100", str(lib)])):
            (build / name).write_text(script)
            proc = subprocess.run([sys.executable, str(build / name), *args], cwd=build,
                                  env={**env, "LD_PRELOAD": preload}, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0 and "-OK " in proc.stdout, (
                f"{name} under ASan exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr, 120)}")
            assert "ERROR: AddressSanitizer" not in proc.stderr
            counts.append(proc.stdout.strip().splitlines()[-1])
    print(f"ASan: build {built - start:.0f} s, runs {time.monotonic() - built:.0f} s; {'; '.join(counts)}")
