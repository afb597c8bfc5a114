"""Loads the compiled operator library and says which backends it carries."""

import importlib
import json
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


def _built_cuda_arch() -> list[str] | None:
    # setup.py writes what nvcc built beside the library (the .so itself does not say).
    try:
        with open(os.path.join(os.path.dirname(_C.__file__), "_C_build.json")) as f:
            return json.load(f)["cuda_arch"]
    except (OSError, ValueError, KeyError):
        return None


def build_info() -> dict:
    """What was built and what can run here.

    Returns a dict: ``cpu`` / ``cuda`` (whether kernels for that backend are registered),
    ``cuda_arch`` (the CUDA targets compiled in, cubins then PTX, e.g. ``['sm_75', 'sm_80',
    'sm_90', 'compute_90']``; None for a CPU-only build or one that did not record them),
    ``cuda_available`` (whether a GPU is usable now), ``torch`` (the running torch) and
    ``library`` (path of the loaded operator library).
    """
    ops = ("scop::dual_scaled_conv2d", "scop::_dual_mix_backward", "scop::lemma2_sample")
    return {
        "cpu": all(_has_kernel(op, "CPU") for op in ops),
        "cuda": all(_has_kernel(op, "CUDA") for op in ops),
        "cuda_arch": _built_cuda_arch(),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "library": os.path.abspath(_C.__file__),
    }
