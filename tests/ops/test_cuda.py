"""The CUDA kernels' launch paths against the float64 plain-PyTorch reference (GPU only): the
shapes that pick each forward and backward kernel and split their reductions, a side stream and
a second device."""

import pytest
import torch

import scop_ext
from scop_ext.ops import reference
from tests._helpers import layout
from tests.conftest import NEEDS_CUDA

pytestmark = [pytest.mark.cuda, NEEDS_CUDA]

NAMES = ("input", "weight", "bias", "beta", "knockoff_bias")

# (N, C_in, C_out, H_out, W_out): which kernels each one reaches (3x3 conv, padding 1).
SHAPES = [
    (3, 4, 6, 5, 5),  # NCHW forward: 25 pixels per plane, the flat kernel
    (2, 3, 5, 7, 7),  # NCHW forward: planes of 49 pixels, one 64-thread block each
    (3, 5, 70, 17, 19),  # 323 pixels: NCHW backward with 8 warps, forward planes over 2 blocks;
    #                      NHWC backward over 3 channel tiles (the last of 6) and 3 pixel chunks
    (1, 2, 33, 16, 8),  # 128 pixels: one NHWC chunk exactly; 33 channels, a tile of one
    (0, 3, 40, 9, 9),  # N = 0: nothing to launch
]


def _leaves(shape, dtype, device, seed=0):
    n, c_in, c_out, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    tensors = (torch.randn(2 * n, c_in, h, w, **f64), torch.randn(c_out, c_in, 3, 3, **f64) / (9 * c_in) ** 0.5,
               torch.randn(c_out, **f64), torch.rand(c_out, **f64), torch.randn(n, 2, c_out, **f64))
    return [t.to(device, dtype) for t in tensors]


def _check(shape, kind, dtype, device, stall=False):
    """Forward and every gradient on ``device`` against the float64 reference on the CPU.

    ``stall``: queue a sleep on the current stream before the forward and before the backward,
    so that a kernel launched on any other stream would read its input before it is written.
    """
    values = _leaves(shape, dtype, "cpu")
    leaves = [t.to(device).requires_grad_() for t in values]
    leaves[0] = layout(leaves[0].detach(), kind).requires_grad_()
    ref_leaves = [t.double().requires_grad_() for t in values]
    want = reference.dual_scaled_conv2d(*ref_leaves, padding=1)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    want.backward(grad.double())
    grad = grad.to(device)
    if stall:
        torch.cuda._sleep(50_000_000)
    out = scop_ext.dual_scaled_conv2d(*leaves, padding=1)
    assert out.device == leaves[0].device
    if stall:
        torch.cuda._sleep(50_000_000)
    # a product, not out.backward(grad): the grad reaching the fused backward is then computed
    # on the stream after the sleep
    (out * grad).sum().backward()
    # float32: cuDNN's float32 convolution against exact sums of up to 2N x 323 terms
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    pairs = [("output", out, want)] + [(f"grad of {name}", a.grad, b.grad) for name, a, b in zip(NAMES, leaves, ref_leaves)]
    for what, got, expected in pairs:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(got.detach().cpu().double(), expected.detach(), atol=tol * max(scale, 1.0), rtol=tol,
                                   msg=lambda m: f"{shape} {kind}: {what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_launch_paths_match_float64(shape, kind, dtype):
    _check(shape, kind, dtype, "cuda")


def test_runs_on_the_current_stream():
    """The fused kernels go on the caller's stream (a side stream here): see _check's stall."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    R = torch.randn(5, 5, dtype=torch.float64)
    with torch.cuda.stream(side):
        for kind in ("contiguous", "channels_last"):
            _check(SHAPES[2], kind, torch.float64, "cuda", stall=True)
        draw = scop_ext.lemma2_sample(R.cuda(), 0.3, 4, seed=9)
        torch.testing.assert_close(draw.cpu(), scop_ext.lemma2_sample(R, 0.3, 4, seed=9), rtol=0, atol=1e-13)


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the device guard puts every kernel on cuda:1."""
    with torch.cuda.device(0):
        for kind in ("contiguous", "channels_last"):
            _check(SHAPES[2], kind, torch.float64, "cuda:1")
        R = torch.randn(5, 5, dtype=torch.float64)
        draw = scop_ext.lemma2_sample(R.to("cuda:1"), 0.3, 4, seed=9)
        assert draw.device == torch.device("cuda:1")
        torch.testing.assert_close(draw.cpu(), scop_ext.lemma2_sample(R, 0.3, 4, seed=9), rtol=0, atol=1e-13)
