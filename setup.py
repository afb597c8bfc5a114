"""Builds scop_ext and its operator library.

The C++ operators are always built. The CUDA operators are built when torch is a CUDA build and
a toolkit is found, and either a GPU is visible or FORCE_CUDA=1 (to build on a machine without
one). TORCH_CUDA_ARCH_LIST picks the architectures, as for any torch extension (without it, the
visible GPUs'); the ones built are recorded beside the library for ``scop_ext.build_info()``.
"""

import glob
import json
import os
import re
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, _get_cuda_arch_flags

# Written beside the built library; scop_ext/ops/loader.py reads it.
BUILD_RECORD = "_C_build.json"


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


def _wheel_include_flags() -> list[str]:
    """``-isystem`` flags for the headers of the CUDA libraries torch's pip wheel ships (cuBLAS,
    cuSPARSE, ...), which ATen's CUDA headers include and a bare toolkit may lack.

    The wheel also carries its own cuda_runtime.h & co.; as -I folders ahead of the toolkit's
    include/ they would shadow it (trouble once the two differ in version). -isystem folders are
    searched after every -I one, so the toolkit's headers win and the wheel only fills the gaps,
    as CMakeLists.txt arranges with its folder of links.
    """
    try:
        import nvidia
    except ImportError:
        return []
    dirs = sorted({d for base in nvidia.__path__ for d in glob.glob(os.path.join(base, "*", "include"))})
    return [flag for d in dirs if os.path.isdir(d) for flag in ("-isystem", d)]


def _cuda_arch_flags() -> list[str]:
    """nvcc's -gencode flags for TORCH_CUDA_ARCH_LIST, as torch would add them. Passing them
    ourselves makes the record name exactly what was built (torch adds none of its own then)."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        raise RuntimeError('building the CUDA kernels without a visible GPU needs TORCH_CUDA_ARCH_LIST, '
                           'e.g. "7.5;8.0;9.0+PTX" (what the Makefile uses then)')
    return _get_cuda_arch_flags()


def _arch_names(flags: list[str]) -> list[str]:
    """The targets of -gencode flags: cubins (sm_XY) by architecture, then PTX (compute_XY)."""
    codes = {m.group(1) for flag in flags if (m := re.search(r"code=((?:sm|compute)_\w+)", flag))}
    return sorted(codes, key=lambda code: (code.startswith("compute_"), int(re.sub(r"\D", "", code)), code))


class RecordingBuildExtension(BuildExtension):
    """BuildExtension that writes beside each built library the CUDA targets it holds
    (``cuda_arch``: null for a CPU-only build) and the TORCH_CUDA_ARCH_LIST they came from."""

    def run(self):
        super().run()
        for ext in self.extensions:
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_RECORD)
            with open(path, "w") as f:
                json.dump({"cuda_arch": getattr(ext, "cuda_arch", None),
                           "torch_cuda_arch_list": getattr(ext, "cuda_arch_list", None)}, f)


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"]
    # at::parallel_for is a header template: without -fopenmp its `#pragma omp parallel` is
    # ignored and our CPU kernels run on one thread whatever torch.get_num_threads() says.
    # The extension then links libgomp.so.1, the soname torch itself has loaded.
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _build_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        wheel = _wheel_include_flags()
        arch = _cuda_arch_flags()
        ext = CUDAExtension(
            "scop_ext._C",
            sources,
            extra_compile_args={"cxx": cxx + wheel, "nvcc": ["-O3", "-lineinfo"] + arch + wheel},
            extra_link_args=link,
        )
        ext.cuda_arch, ext.cuda_arch_list = _arch_names(arch), os.environ.get("TORCH_CUDA_ARCH_LIST")
        return ext
    return CppExtension("scop_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="scop-ext",
    version="0.1.0",
    description="Knockoff-controlled filter pruning (SCOP) for PyTorch, with C++/CUDA operators",
    packages=find_packages(include=["scop_ext", "scop_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": RecordingBuildExtension},
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
