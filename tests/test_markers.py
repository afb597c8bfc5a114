"""Every GPU test carries the cuda marker: `make gpu-check` selects them with `-m cuda`, so one
without it would never run anywhere. A test counts as a GPU test when its name or a parameter
id mentions cuda (what `-k cuda` matches)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unmarked_gpu_tests(root: Path, *paths: str) -> list[str]:
    """Node ids under ``paths`` that ``-k cuda`` selects but ``-m cuda`` does not, from a
    collection in a subprocess (so every test file is seen, whatever this session collected)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-k", "cuda", "-m", "not cuda", *paths], cwd=root, capture_output=True, text=True, timeout=900)
    # exit status 5: nothing selected, which is what we hope for
    assert proc.returncode in (0, 5), f"collection failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_gpu_tests_are_marked():
    assert unmarked_gpu_tests(ROOT, "tests") == []


def test_the_check_finds_an_unmarked_gpu_test(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: GPU\n")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_on_cuda(): pass\n"
        "@pytest.mark.cuda\n"
        "def test_marked_on_cuda(): pass\n"
        "@pytest.mark.parametrize('device', ['cpu', 'cuda', pytest.param('cuda:1', marks=pytest.mark.cuda)])\n"
        "def test_devices(device): pass\n"
    )
    assert unmarked_gpu_tests(tmp_path, "test_sample.py") == ["test_sample.py::test_on_cuda", "test_sample.py::test_devices[cuda]"]
