"""The operator counter, and what it shows: how many operators a Dcls2d step launches, and
that a training step holds nothing a CUDA graph could not capture (checked on the CPU)."""

import pytest
import timm
import torch

from dclsify import Dcls2d
from dclsify.surgery import conv
from dclsify.surgery.opcount import count_ops
from dclsify.surgery.rewrite import rewrite


def test_counter_sorts_views_kernels_copies_and_syncs():
    x = torch.randn(4, 3)
    counter = count_ops(lambda: (x.t().contiguous() + 1).sum().item())
    assert counter.ops["aten.t.default"] == 1 and counter.views == 1  # a view: no work
    assert counter.kernels == 4 and counter.copies == 1  # clone (the copy), add, sum, the read-back
    assert counter.syncs == ["aten._local_scalar_dense.default"]  # .item() waits for the device
    assert count_ops(lambda: x[x > 0]).syncs == ["aten.index.Tensor"]  # an output size known only on the device
    assert count_ops(lambda: torch.empty(3)).kernels == 0


def _stage(layers, algorithm, channels=16, size=(12, 12)):  # 12x12: every tap of 23x23 reaches it
    torch.manual_seed(0)
    stage = torch.nn.Sequential(
        *(
            Dcls2d(channels, channels, 26, padding=11, dilated_kernel_size=23, groups=channels, algorithm=algorithm)
            for _ in range(layers)
        )
    )
    for layer in stage[1:]:
        layer.P, layer.SIG = stage[0].P, stage[0].SIG
    x = torch.randn(2, channels, *size, requires_grad=True)

    def step():
        stage.zero_grad(set_to_none=True)
        stage(x).sum().backward()

    step()
    return count_ops(step)


@pytest.mark.parametrize("algorithm, most", [("direct", 12), ("fft", 25), ("toeplitz", 18)])
def test_a_layer_that_shares_its_positions_adds_few_operators(algorithm, most):
    # per extra layer, forward+backward: the convolution's own operators, two to build the
    # kernel from the shared profiles, five for its gradients and one to add those to the
    # profiles' gradient (direct: pad, conv with bias, their backwards, 2 + 5 + 1). Before the
    # profiles were shared: 57 (direct), 72 (fft), 82 (toeplitz).
    one, three = _stage(1, algorithm), _stage(3, algorithm)
    assert (three.kernels - one.kernels) / 2 <= most
    assert one.syncs == three.syncs == []


def test_a_rewritten_training_step_can_be_captured_after_one_warm_up_step(monkeypatch):
    # what a CUDA graph needs, checked on the CPU: no operator that makes the host wait for
    # the device (.item(), bool(tensor), sizes known only on the device), and nothing
    # measured by algorithm="auto" after the first step (its choices are cached by shape).
    # The optimiser is left out: on a GPU, AdamW(capturable=True) keeps its step counts there.
    model = rewrite(timm.create_model("convnext_atto"), num_classes=5, input_size=(32, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 1, 32, 256)
    layers = [m for m in model.modules() if isinstance(m, Dcls2d)]
    assert layers and all(layer.algorithm == "auto" for layer in layers)

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        model.train()(x).logsumexp(-1).mean().backward()

    @torch.no_grad()
    def evaluate():  # kernels built on every call; auto's choices differ without gradients
        model.eval()(x)

    forward_backward()
    optimizer.step()
    evaluate()

    def measure(*args):
        raise AssertionError("auto measured an algorithm inside a warmed-up step")

    monkeypatch.setattr(conv, "_measure", measure)
    counter = count_ops(forward_backward)
    assert counter.kernels > 0 and counter.syncs == []
    assert count_ops(evaluate).syncs == []
