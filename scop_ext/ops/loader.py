"""Loads the compiled operator library and says which backends it carries."""

import importlib
import os

import torch

_HINT = (
    "Build it from the source tree with `pip install --no-build-isolation -e .` "
    "(or `make build`), against the torch that is installed now."
)

try:
    _C = importlib.import_module("scop_ext._C")
except ImportError as exc:  # a missing or stale .so: say what to do, not where it failed
    raise ImportError(
        f"scop_ext's compiled operators could not be loaded ({exc}). {_HINT}"
    ) from exc


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def build_info() -> dict:
    """What was built and what can run here.

    Returns a dict: ``cpu`` / ``cuda`` (whether kernels for that backend are registered),
    ``cuda_available`` (whether a GPU is usable now), ``torch`` (the running torch) and
    ``library`` (path of the loaded operator library).
    """
    ops = ("scop::dual_scaled_conv2d", "scop::_dual_mix_backward", "scop::lemma2_sample")
    return {
        "cpu": all(_has_kernel(op, "CPU") for op in ops),
        "cuda": all(_has_kernel(op, "CUDA") for op in ops),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "library": os.path.abspath(_C.__file__),
    }
