import os

import pytest
import torch

# cuBLAS reads this once, at a process's first cuBLAS call; the tests train with train.deterministic
# in this process after other tests have used CUDA, and torch refuses such a run without it
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def device(request):
    """Run a test on the CPU and, where torch sees one, on a CUDA device too."""
    return torch.device(request.param)
