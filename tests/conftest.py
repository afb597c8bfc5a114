import pytest
import torch

import scop_ext  # noqa: F401  (registers the operators)

CUDA = torch.cuda.is_available() and scop_ext.build_info()["cuda"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
