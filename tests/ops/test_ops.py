"""The compiled operators against scop_ext.reference, their gradients, registration and errors."""

import itertools
import json
import random
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import scop_ext
from scop_ext.ops import reference
from tests._helpers import layout
from tests.conftest import NEEDS_CUDA

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
SHAPES = [
    (3, 4, 6, 9, 7, 3, 1, 1, 1, 1),  # odd H/W
    (2, 4, 8, 11, 11, 3, 2, 1, 1, 1),  # stride 2
    (1, 6, 9, 8, 8, 3, 1, 1, 1, 3),  # N = 1, groups 3
    (2, 8, 8, 10, 9, 3, 1, 2, 2, 8),  # depthwise, dilation 2
    (4, 5, 7, 6, 5, 1, 1, 0, 1, 1),  # 1x1
    (2, 3, 4, 13, 10, (3, 5), (2, 1), (1, 2), (1, 2), 1),  # rectangular everything
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
NAMES = ("input", "weight", "bias", "beta", "knockoff_bias")


def _case(shape, dtype, device, bias=True, use_knockoff_bias=True, seed=0):
    n, cin, cout, h, w, k, s, p, d, g = shape
    k = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(seed)
    opts = dict(dtype=dtype)
    x = torch.randn(2 * n, cin, h, w, generator=gen, **opts)
    weight = torch.randn(cout, cin // g, *k, generator=gen, **opts) / (cin // g * k[0] * k[1]) ** 0.5
    b = torch.randn(cout, generator=gen, **opts) if bias else None
    beta = torch.rand(cout, generator=gen, **opts)
    nz = torch.randn(n, 2, cout, generator=gen, **opts) if use_knockoff_bias else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(weight), move(b), move(beta), move(nz), dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(shape, kind, dtype, device):
    x, w, b, beta, nz, conv = _case(shape, dtype, device)
    x = layout(x, kind)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, beta, nz)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, beta, nz)]
    out = scop_ext.dual_scaled_conv2d(*leaves, **conv)
    expected = reference.dual_scaled_conv2d(*ref_leaves, **conv)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    if kind == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for name, got, want in zip(NAMES, leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **TOL[dtype], msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("bias,use_knockoff_bias", [(False, False), (True, False), (False, True)])
def test_optional_bias_and_knockoff_bias(bias, use_knockoff_bias, device):
    x, w, b, beta, nz, conv = _case(SHAPES[0], torch.float64, device, bias=bias, use_knockoff_bias=use_knockoff_bias)
    torch.testing.assert_close(
        scop_ext.dual_scaled_conv2d(x, w, b, beta, nz, **conv),
        reference.dual_scaled_conv2d(x, w, b, beta, nz, **conv),
    )


def test_random_shapes_match_reference(device):
    """Many random configurations (seeded): the kernel equals the reference in float64."""
    rng = random.Random(1234)
    for trial in range(40):
        g = rng.choice([1, 1, 2, 4])
        cin, cout = g * rng.randint(1, 4), g * rng.randint(1, 4)
        k, d = rng.choice([1, 2, 3, 5]), rng.randint(1, 2)
        h, w = rng.randint(d * (k - 1) + 1, 14), rng.randint(d * (k - 1) + 1, 14)
        shape = (rng.randint(1, 3), cin, cout, h, w, k, rng.randint(1, 3), rng.randint(0, 2), d, g)
        x, wt, b, beta, nz, conv = _case(shape, torch.float64, device, bias=rng.random() < 0.5, seed=trial)
        x = layout(x, rng.choice(LAYOUTS))
        torch.testing.assert_close(
            scop_ext.dual_scaled_conv2d(x, wt, b, beta, nz, **conv),
            reference.dual_scaled_conv2d(x, wt, b, beta, nz, **conv),
            msg=lambda m: f"shape {shape}: {m}",
        )


def test_bfloat16_cpu_close_to_float32():
    x, w, b, beta, nz, conv = _case(SHAPES[1], torch.float32, "cpu")
    want = reference.dual_scaled_conv2d(x, w, b, beta, nz, **conv)
    got = scop_ext.dual_scaled_conv2d(*(t.bfloat16() for t in (x, w, b, beta, nz)), **conv)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_in_the_region_dtype(input_dtype):
    """Inside autocast the float32 weight, bias, beta and knockoff bias meet an input of either
    dtype, and everything runs in bfloat16, as nn.Conv2d does there."""
    x, w, b, beta, nz, conv = _case(SHAPES[1], torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in (x.to(input_dtype), w, b, beta, nz)]
    raw_args = [[conv[k]] * 2 for k in ("stride", "padding", "dilation")] + [conv["groups"], False]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scop_ext.dual_scaled_conv2d(*leaves, **conv)
        raw, _ = torch.ops.scop.dual_scaled_conv2d.default(*leaves, *raw_args)  # the dispatcher's rule
    assert out.dtype == raw.dtype == torch.bfloat16
    torch.testing.assert_close(raw, out, atol=0, rtol=0)
    ref_leaves = [t.detach().bfloat16().double().requires_grad_() for t in leaves]
    want = reference.dual_scaled_conv2d(*ref_leaves, **conv)
    torch.testing.assert_close(out.double(), want, atol=0.05, rtol=0.02)
    grad = torch.randn_like(want).bfloat16().double()
    out.backward(grad.bfloat16())
    want.backward(grad)
    for name, got, ref in zip(NAMES, leaves, ref_leaves):
        assert got.grad.dtype == got.dtype, f"grad of {name}"
        scale = float(ref.grad.abs().max())
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=0.02 * scale, rtol=0.02, msg=lambda m: f"grad of {name}: {m}")


def test_autocast_to_a_dtype_the_kernel_lacks_names_it():
    x, w, b, beta, nz, conv = _case(SHAPES[0], torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="cast to torch.float16 by autocast"):
        scop_ext.dual_scaled_conv2d(x, w, b, beta, nz, **conv)


# Half-precision results against float64 of the same rounded values, relative to each result's
# largest entry: a few roundings to the type (eps 1e-3 / 8e-3) and float32 sums. bfloat16 on the
# CPU stays within 6e-3 over these shapes; a wrong index is off by O(1).
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.mark.cuda
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cuda_matches_float64(dtype):
    x, w, b, beta, nz, conv = _case(SHAPES[1], torch.float32, "cuda")
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b, beta, nz)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    got = scop_ext.dual_scaled_conv2d(*leaves, **conv)
    want = reference.dual_scaled_conv2d(*ref_leaves, **conv)
    assert got.dtype == dtype
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol * float(want.abs().max()), rtol=tol)
    grad = torch.randn_like(want).to(dtype)
    got.backward(grad)
    want.backward(grad.double())
    for name, leaf, ref in zip(NAMES, leaves, ref_leaves):
        assert leaf.grad.dtype == dtype, f"grad of {name}"
        scale = float(ref.grad.abs().max())
        torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=tol * scale, rtol=tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize(
    "device,dtype",
    [("cpu", torch.bfloat16),
     pytest.param("cuda", torch.float16, marks=[pytest.mark.cuda, NEEDS_CUDA])],
)
def test_bias_gradients_reduced_in_float32(device, dtype):
    """The bias gradient is a sum over samples of per-(sample, channel) spatial sums. Here those are
    about 1e5 and alternate in sign, so the result is much smaller than its terms: summed after
    rounding to a half type they would swamp it (or overflow float16)."""
    n, c, side = 32, 3, 32
    x, w, b, beta, nz, conv = _case((n, c, c, side, side, 1, 1, 0, 1, 1), torch.float32, "cpu")
    gen = torch.Generator().manual_seed(1)
    sign = torch.tensor([1.0, -1.0]).repeat(n)[:, None, None, None]
    grad = (100 * sign + torch.randn(2 * n, c, side, side, generator=gen)).to(dtype)
    leaves = [t.to(device, dtype).requires_grad_() for t in (x, w, b, beta, nz)]
    ref_leaves, magnitudes = ([t.detach().double().cpu().requires_grad_() for t in leaves] for _ in range(2))
    scop_ext.dual_scaled_conv2d(*leaves, **conv).backward(grad.to(device))
    reference.dual_scaled_conv2d(*ref_leaves, **conv).backward(grad.double())
    # the same sums of |terms|, which float32 accumulation errors scale with (beta is in [0, 1])
    reference.dual_scaled_conv2d(*magnitudes, **conv).backward(grad.double().abs())
    # float16 cannot hold the per-sample sums themselves, which is what the knockoff-bias gradient is.
    names = ("bias", "knockoff_bias") if dtype == torch.bfloat16 else ("bias",)
    for name in names:
        i = NAMES.index(name)
        got, want = leaves[i].grad.double().cpu(), ref_leaves[i].grad
        assert leaves[i].grad.dtype == dtype
        # one rounding to dtype, plus float32 accumulation error
        bound = torch.finfo(dtype).eps * want.abs() + 8 * torch.finfo(torch.float32).eps * magnitudes[i].grad
        assert bool(((got - want).abs() <= bound).all()), f"grad of {name}: max error {(got - want).abs().max():.4g}"


@pytest.mark.cuda
@NEEDS_CUDA
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_cuda_batch_beyond_grid_y_limit(kind):
    """N = 65537 > 65535, the most blocks a grid's y dimension takes: the kernels stride over it."""
    x, w, b, beta, nz, conv = _case((65537, 2, 3, 2, 2, 1, 1, 0, 1, 1), torch.float32, "cuda")
    leaves = [t.requires_grad_() for t in (layout(x, kind), w, b, beta, nz)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = scop_ext.dual_scaled_conv2d(*leaves, **conv)
    expected = reference.dual_scaled_conv2d(*ref_leaves, **conv)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for name, got, want in zip(NAMES, leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-3, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_empty_batch(kind, device):
    """N = 0 forward and backward: zero gradients for the parameters, nothing launched on no data."""
    x, w, b, beta, _, conv = _case(SHAPES[0], torch.float32, device, use_knockoff_bias=False)
    leaves = [t.requires_grad_() for t in (layout(x[:0], kind), w, b, beta)]
    out = scop_ext.dual_scaled_conv2d(*leaves, None, **conv)
    assert out.shape == (0, w.shape[0], 9, 7)
    out.sum().backward()
    assert leaves[0].grad.shape == leaves[0].shape
    for name, leaf in zip(NAMES[1:], leaves[1:]):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), f"grad of {name}"


def test_gradcheck(device):
    x, w, b, beta, nz, conv = _case((2, 4, 6, 5, 6, 3, 2, 1, 1, 2), torch.float64, device)
    leaves = [t.requires_grad_() for t in (layout(x, "channels_last"), w, b, beta, nz)]
    assert torch.autograd.gradcheck(lambda *a: scop_ext.dual_scaled_conv2d(*a, **conv), leaves)


def test_double_backward_raises_instead_of_dropping_terms(device):
    x, w, b, beta, nz, conv = _case(SHAPES[0], torch.float64, device)
    leaves = [t.requires_grad_() for t in (x, w, b, beta, nz)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    grads = torch.autograd.grad(scop_ext.dual_scaled_conv2d(*leaves, **conv).square().sum(), leaves, create_graph=True)
    want = torch.autograd.grad(reference.dual_scaled_conv2d(*ref_leaves, **conv).square().sum(), ref_leaves)
    for got, expected in zip(grads, want):  # create_graph=True alone still gives the first order
        torch.testing.assert_close(got, expected, **TOL[torch.float64])
    with pytest.raises(RuntimeError, match="scop.dual_scaled_conv2d does not support double backward"):
        torch.autograd.grad(grads[3].sum(), beta)


def test_lemma2_sample_gradcheck(device):
    R = torch.randn(5, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: scop_ext.lemma2_sample(r, 0.3, 7, seed=11), (R,))


def test_opcheck_dual_scaled_conv2d(device):
    x, w, b, beta, nz, conv = _case((2, 4, 6, 5, 6, 3, 1, 1, 1, 2), torch.float32, device)
    for leaves, save_diff in (((x, w, b, beta.clone().requires_grad_(), nz), True), ((x, w, None, beta, None), False)):
        args = (*leaves, [conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"], save_diff)
        torch.library.opcheck(torch.ops.scop.dual_scaled_conv2d.default, args)
    args = (layout(x, "channels_last").requires_grad_(), w.requires_grad_(), b, beta, None, [1, 1], [1, 1], [1, 1], 2, True)
    torch.library.opcheck(torch.ops.scop.dual_scaled_conv2d.default, args)


def test_opcheck_dual_mix_backward(device):
    g = torch.randn(4, 6, 5, 3, device=device)
    beta, diff = torch.rand(6, device=device), torch.randn(2, 6, 5, 3, device=device)
    for need_beta, need_sums in itertools.product((True, False), repeat=2):
        torch.library.opcheck(torch.ops.scop._dual_mix_backward.default, (g, beta, diff, need_beta, need_sums))


def test_opcheck_lemma2_sample(device):
    R = torch.randn(5, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.scop.lemma2_sample.default, (R, 0.5, 3, torch.tensor([7])))


def _backward_flops(weight_grad: bool, input_grad: bool) -> int:
    x, w, b, beta, nz, conv = _case((4, 8, 8, 16, 16, 3, 1, 1, 1, 1), torch.float32, "cpu")
    x.requires_grad_(input_grad)
    w.requires_grad_(weight_grad)
    beta.requires_grad_()
    out = scop_ext.dual_scaled_conv2d(x, w, b, beta, nz, **conv)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    return counter.get_total_flops()


def test_frozen_weight_computes_no_weight_gradient():
    conv_flops = 2 * 8 * 8 * 16 * 16 * 8 * 9  # one 3x3 convolution over 2N = 8 images
    assert _backward_flops(weight_grad=True, input_grad=True) == 2 * conv_flops
    assert _backward_flops(weight_grad=False, input_grad=True) == conv_flops
    assert _backward_flops(weight_grad=False, input_grad=False) == 0


# --------------------------------------------------------------------------------- bad input

def _good():
    x, w, b, beta, nz, conv = _case((2, 4, 6, 8, 8, 3, 1, 1, 1, 1), torch.float32, "cpu")
    return dict(input=x, weight=w, bias=b, beta=beta, knockoff_bias=nz, **conv)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(input=a["input"][0]), "input must be 4-D"),
        (lambda a: a.update(input=a["input"][:3]), "input batch must be 2N"),
        (lambda a: a.update(input=a["input"][:, :3]), "input has 3 channels"),
        (lambda a: a.update(weight=a["weight"][:, :, 0]), "weight must be 4-D"),
        (lambda a: a.update(beta=a["beta"][:5]), r"beta must have shape \(6,\)"),
        (lambda a: a.update(beta=torch.full((6,), float("nan"))), "beta contains NaN"),
        (lambda a: a.update(bias=a["bias"][:2]), r"bias must have shape \(6,\)"),
        (lambda a: a.update(knockoff_bias=a["knockoff_bias"][:, 0]), "knockoff_bias must have shape"),
        (lambda a: a.update(beta=a["beta"].double()), "beta has dtype torch.float64"),
        (lambda a: a.update(input=a["input"].int()), "input must be a floating-point"),
        (lambda a: a.update(stride=0), "stride must be >= 1"),
        (lambda a: a.update(padding=(1, 2, 3)), "padding must be an int or a pair"),
        (lambda a: a.update(groups=4), "expects 16"),
        (lambda a: a.update(input=a["input"][..., :1, :1], padding=0), "too small for a kernel"),
        (lambda a: a.update(beta=a["beta"].to("meta")), "beta is on meta"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        scop_ext.dual_scaled_conv2d(**args)


FLOATING_DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point}, key=str)


def test_kernel_dtype_list_matches_the_kernels(device):
    """The wrappers refuse dtypes by scop_ext.ops.checks.KERNEL_DTYPES, a hand copy of the C++
    dispatch lists: every floating dtype must run in all three raw ops exactly when it is listed."""
    def accepted(call) -> bool:
        try:
            call()
        except NotImplementedError:  # what a dispatch macro (or ATen) raises for an unlisted dtype
            return False
        return True

    calls = {
        "dual_scaled_conv2d": lambda t: torch.ops.scop.dual_scaled_conv2d.default(
            t(4, 3, 5, 5), t(2, 3, 3, 3), t(2), t(2), t(2, 2, 2), [1, 1], [0, 0], [1, 1], 1, True),
        "dual_mix_backward": lambda t: torch.ops.scop._dual_mix_backward.default(t(4, 2, 3, 3), t(2), t(2, 2, 3, 3), True, True),
        "lemma2_sample": lambda t: torch.ops.scop.lemma2_sample.default(t(3, 3), 0.5, 2, torch.tensor([1])),
    }
    for name, call in calls.items():
        runs = [d for d in FLOATING_DTYPES if accepted(lambda: call(lambda *shape: torch.rand(*shape).to(device, d)))]
        assert set(runs) == set(scop_ext.ops.checks.KERNEL_DTYPES[device.type]), f"{name} on {device.type} runs in {runs}"


def test_build_info_names_the_nvcc_targets_built():
    """setup.py records nvcc's targets beside the library: none for a CPU-only build; for a CUDA
    one, cubins (sm_XY) then PTX (compute_XY), the PTX last when the list asked for it (the
    Makefile's default without a GPU, 7.5;8.0;9.0+PTX, does)."""
    info = scop_ext.build_info()
    arch = info["cuda_arch"]
    if not info["cuda"]:
        assert arch is None
        return
    assert arch, "a CUDA build that records no target"
    assert all(re.fullmatch(r"(sm|compute)_\d+a?", a) for a in arch), arch
    kinds = [a.split("_")[0] for a in arch]
    assert kinds == sorted(kinds, key=lambda kind: kind == "compute"), f"PTX must come after the cubins: {arch}"
    listed = json.loads((Path(info["library"]).parent / "_C_build.json").read_text())["torch_cuda_arch_list"]
    if listed and "+PTX" in listed:
        assert arch[-1].startswith("compute_"), arch


def test_raw_op_rejects_bad_input_in_cpp():
    """The C++ checks are the second line of defence when the Python wrapper is bypassed."""
    a = _good()
    with pytest.raises(RuntimeError, match="batch must be 2N"):
        torch.ops.scop.dual_scaled_conv2d(a["input"][:3], a["weight"], None, a["beta"], None, [1, 1], [1, 1], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match="beta must have shape"):
        torch.ops.scop.dual_scaled_conv2d(a["input"], a["weight"], None, a["beta"][:2], None, [1, 1], [1, 1], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 CPU tensor"):
        torch.ops.scop.lemma2_sample(torch.eye(3), 1.0, 2, torch.tensor([1.0]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(R=torch.eye(3)[:2]), "R must be square"),
        (dict(R=torch.eye(3).long()), "R must be a floating-point"),
        (dict(gamma=-1.0), "gamma must be finite and >= 0"),
        (dict(n=-2), "n must be an int >= 0"),
        (dict(seed=torch.tensor([1.5])), "seed must be an int or a one-element int64"),
    ],
)
def test_sampler_bad_input(kwargs, match):
    args = dict(R=torch.eye(3), gamma=0.1, n=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        scop_ext.lemma2_sample(args.pop("R"), args.pop("gamma"), args.pop("n"), **args)


@pytest.mark.cuda
@NEEDS_CUDA
def test_mixed_devices_rejected():
    a = _good()
    a["beta"] = a["beta"].cuda()
    with pytest.raises(ValueError, match="beta is on cuda"):
        scop_ext.dual_scaled_conv2d(**a)
