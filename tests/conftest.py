import os
import subprocess
import sys

import pytest
import torch

import scop_ext  # noqa: F401  (registers the operators)
from scop_ext import models
from scop_ext.prune import PruningSpace

CUDA = torch.cuda.is_available() and scop_ext.build_info()["cuda"]

# `scop` subprocesses: one intra-op thread each, so several can share the 2 cores; unbuffered
# output so a killed process has printed what it did.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# The smallest pipeline settings that still run every stage.
TINY = dict(scales_epochs=1, finetune_epochs=1, bn_batches=2, latency=False, batch_size=128)


def prune_args(baseline: str, out, *extra: str) -> list[str]:
    """`scop prune` arguments for a small run of every stage on the session baseline."""
    return ["prune", "--weights", baseline, "--scales-epochs", "2", "--finetune-epochs", "2", "--batch-size", "128",
            "--set", "latency=false", "--set", "bn_batches=2", "--quiet", "--out", str(out), *extra]


# Every GPU test carries the cuda marker (`make gpu-check` selects them with -m cuda;
# tests/test_markers.py checks that none is left out).
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA build")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_CUDA])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _full_float32_on_cuda(request):
    """cuDNN and cuBLAS round float32 operands to TF32 by default on Ampere and later (about 1e-3
    relative), and CUDA tests hold float32 results to 1e-5: full float32 for them, restored after."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: a second thread only adds contention,
    up to 10x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> str:
    """The model stem of a resnet_digits trained for four epochs by `scop train` (read only)."""
    out = tmp_path_factory.mktemp("baseline")
    proc = subprocess.run([sys.executable, "-m", "scop_ext.cli", "train", "--epochs", "4", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"scop train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return str(out / "model")


def _eval_space(build, input_shape):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*input_shape)
    return model, x, PruningSpace(model, x)


@pytest.fixture(scope="module")
def resnet20_space():
    """(resnet20 in eval mode, a 32x32 example input, its PruningSpace); one per test module."""
    return _eval_space(models.resnet20, (1, 3, 32, 32))


@pytest.fixture(scope="module")
def digits_space():
    """(resnet_digits in eval mode, an 8x8 example input, its PruningSpace); one per test module."""
    return _eval_space(models.resnet_digits, (1, 1, 8, 8))
