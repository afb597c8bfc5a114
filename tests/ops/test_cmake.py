"""The CMake build of the operator library (CMakeLists.txt) against the installed libtorch.

Configures, builds and runs CTest (csrc/test/test_ops.cpp) so that the C++/libtorch build
cannot rot, then loads the CMake-built library into a fresh Python process through
``torch.ops.load_library``. The build folder is cached in ``build/cmake-test`` so reruns are
incremental (make's dependency tracking and CONFIGURE_DEPENDS globs keep it on the current
sources); a lock serialises concurrent pytest sessions sharing the checkout.

The CUDA variant (-DSCOP_WITH_CUDA=ON) takes ~4 minutes on 2 cores, so it is opt-in:
``SCOP_TEST_CMAKE_CUDA=1 pytest tests/ops/test_cmake.py`` (`make gpu-check` sets it). With a GPU
visible its C++ test must compare the CUDA kernels with the CPU ones, not skip that part.
MAX_JOBS sets the build's parallelism (default 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_ROOT = ROOT / "build"
JOBS = os.environ.get("MAX_JOBS") or "2"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Under `make test`, MAKEFLAGS names a jobserver whose pipes we do not pass on; the make
    # that CMake runs would then warn and fall back to -j1.
    for var in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(var, None)
    env.setdefault("OMP_NUM_THREADS", JOBS)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _tail(text: str, n: int = 80) -> str:
    return "\n".join(text.splitlines()[-n:])


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_is_foreign(build_dir: Path) -> bool:
    """True when the cached build folder was configured for another source tree."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return False
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
            return Path(line.split("=", 1)[1]).resolve() != ROOT
    return True


def _configure(build_dir: Path, with_cuda: bool) -> str:
    import torch

    prefix = torch.utils.cmake_prefix_path
    cmd = [
        "cmake", "-S", str(ROOT), "-B", str(build_dir),
        f"-DCMAKE_PREFIX_PATH={prefix}",
        # Pin Torch_DIR too: the cache would otherwise keep a libtorch found on an earlier run.
        f"-DTorch_DIR={os.path.join(prefix, 'Torch')}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DSCOP_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
    ]
    if _cache_is_foreign(build_dir):
        shutil.rmtree(build_dir)
    proc, _ = _run(cmd, ROOT, timeout=300)
    if proc.returncode != 0 and build_dir.exists():
        # A cache from another generator / compiler / torch cannot be reconfigured: start over.
        shutil.rmtree(build_dir)
        proc, _ = _run(cmd, ROOT, timeout=300)
    assert proc.returncode == 0, f"cmake configure failed:\n{_tail(proc.stdout)}"
    return proc.stdout


def _build_and_ctest(with_cuda: bool) -> tuple[Path, str]:
    """(build folder, CTest's output)."""
    build_dir = BUILD_ROOT / ("cmake-test-cuda" if with_cuda else "cmake-test")
    _configure(build_dir, with_cuda)
    proc, build_s = _run(["cmake", "--build", str(build_dir), "-j", JOBS], ROOT, timeout=1200)
    assert proc.returncode == 0, f"cmake --build failed:\n{_tail(proc.stdout)}"
    # -V for CUDA: the test's own output says whether it compared the CUDA kernels or skipped them
    proc, test_s = _run(["ctest", "--output-on-failure"] + (["-V"] if with_cuda else []), build_dir, timeout=600)
    assert proc.returncode == 0, f"ctest failed:\n{_tail(proc.stdout, 150)}"
    assert "100% tests passed" in proc.stdout, proc.stdout
    assert "scop_ops_test" in proc.stdout, "scop_ops_test was not registered with CTest"
    print(f"cmake build {build_s:.1f}s, ctest {test_s:.1f}s")
    return build_dir, proc.stdout


@pytest.fixture(scope="module")
def cmake_build_dir() -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    with _locked(BUILD_ROOT / "cmake-test.lock"):
        return _build_and_ctest(with_cuda=False)[0]


def test_cmake_build_and_ctest(cmake_build_dir: Path):
    assert (cmake_build_dir / "scop_ops_test").exists()


def test_cmake_library_loads_in_python(cmake_build_dir: Path):
    """libscop_ops.so works as a plain torch.ops library (no scop_ext import: its _C module
    registers the same namespace, and a namespace may only be defined once per process)."""
    libs = sorted(cmake_build_dir.glob("libscop_ops.so*"))
    assert libs, f"no libscop_ops.so in {cmake_build_dir}"
    script = textwrap.dedent(
        """
        import sys, torch
        torch.ops.load_library(sys.argv[1])
        x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
        w, beta, bias = torch.randn(5, 3, 3, 3), torch.rand(5), torch.randn(5)
        knockoff_bias = torch.randn(2, 2, 5)
        out, diff = torch.ops.scop.dual_scaled_conv2d(x, w, bias, beta, knockoff_bias, [1, 1], [1, 1],
                                                      [1, 1], 1, True)
        y = torch.nn.functional.conv2d(x, w, bias, 1, 1)
        r = y[:2] + knockoff_bias[:, 0, :, None, None]
        k = y[2:] + knockoff_bias[:, 1, :, None, None]
        b = beta.view(1, -1, 1, 1)
        torch.testing.assert_close(out, torch.cat([b * r + (1 - b) * k, k]))
        torch.testing.assert_close(diff, r - k)
        seed = torch.tensor([7])
        s = torch.ops.scop.lemma2_sample(torch.eye(4), 0.0, 3, seed)
        assert s.shape == (3, 2, 4) and torch.equal(s[:, 1], -s[:, 0])
        print("ok")
        """
    )
    proc, _ = _run([sys.executable, "-c", script, str(libs[0])], ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), _tail(proc.stdout)


@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("SCOP_TEST_CMAKE_CUDA") != "1",
                    reason="CUDA CMake build takes ~4 min on 2 cores; set SCOP_TEST_CMAKE_CUDA=1")
def test_cmake_cuda_build_and_ctest():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    import torch

    if torch.version.cuda is None:
        pytest.skip("the installed torch is a CPU-only build")
    with _locked(BUILD_ROOT / "cmake-test.lock"):
        _, output = _build_and_ctest(with_cuda=True)
    if torch.cuda.is_available():
        assert "CUDA: compared with CPU" in output, f"the C++ test did not run its CUDA part:\n{_tail(output)}"
