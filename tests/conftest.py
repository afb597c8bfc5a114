import pytest
import torch

import scop_ext  # noqa: F401  (registers the operators)

CUDA = torch.cuda.is_available() and scop_ext.build_info()["cuda"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: a second thread only adds contention,
    up to 10x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
