import pytest
import torch


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def device(request):
    """Run a test on the CPU and, where torch sees one, on a CUDA device too."""
    return torch.device(request.param)
