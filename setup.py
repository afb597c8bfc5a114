"""Builds scop_ext and its operator library.

The C++ operators are always built. The CUDA operators are built when torch is a CUDA build and
a toolkit is found, and either a GPU is visible or FORCE_CUDA=1 (to build on a machine without
one). TORCH_CUDA_ARCH_LIST picks the architectures, as for any torch extension.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if not (forced or torch.cuda.is_available()):
        return False
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but the installed torch is a CPU-only build")
        return False
    if CUDA_HOME is None:
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the "
                               "folder whose bin/ holds the real nvcc")
        return False
    return True


def _nvidia_include_dirs() -> list[str]:
    """Headers of the CUDA libraries that torch's pip wheel ships (cuSPARSE, cuBLAS, ...).

    ATen's CUDA headers include them, and a bare toolkit install may not have them all.
    """
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extension():
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"]
    if _build_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "scop_ext._C",
            sources,
            include_dirs=_nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        )
    return CppExtension("scop_ext._C", sources, extra_compile_args={"cxx": cxx})


setup(
    name="scop-ext",
    version="0.1.0",
    description="Knockoff-controlled filter pruning (SCOP) for PyTorch, with C++/CUDA operators",
    packages=find_packages(include=["scop_ext", "scop_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    # torch and torchvision are installed pinned beforehand (see Makefile); listing torchvision
    # here unpinned could pull a newer torch into a working environment.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scikit-learn",
        "torch-pruning>=1.5",
        "tqdm",
        "matplotlib",
        "safetensors",
        "pyyaml",
    ],
    extras_require={
        "vision": ["torchvision"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"],
    },
    entry_points={"console_scripts": ["scop=scop_ext.cli:main"]},
)
