import os

import pytest
import torch

# cuBLAS reads this once, at a process's first cuBLAS call; the tests train with train.deterministic
# in this process after other tests have used CUDA, and torch refuses such a run without it
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Without a GPU, the Triton kernel (algorithm="triton") runs in Triton's interpreter, which a kernel
# takes when it is defined: so before any test imports dclsify
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def device(request):
    """Run a test on the CPU and, where torch sees one, on a CUDA device too."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tagger_checkpoint(tmp_path_factory):
    """test_train's tiny model trained on its tones and chirp ("low", "middle", "high", "chirp"), once
    for the session: test_predict and test_sed tag sounds with it."""
    from test_train import TINY, make_set

    from dclsify.pipeline.recipe import load_recipe
    from dclsify.pipeline.train import train

    folder = tmp_path_factory.mktemp("predict")
    quiet = ["augment.speed_p=0", "augment.erase_p=0", "augment.mixup_alpha=0", "train.epochs=6", "train.lr=4e-3"]
    result = train(load_recipe(None, TINY + quiet), make_set(folder / "train.h5", 24, 0), None, folder / "run")
    return result.run_dir / "last.safetensors"
