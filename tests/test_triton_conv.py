"""The Triton depthwise kernel (algorithm="triton") equals the other algorithms, forward and both
gradients. Without a GPU it runs in Triton's interpreter: conftest.py sets TRITON_INTERPRET=1 where
torch sees no CUDA device, before dclsify is imported."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dclsify.surgery import Dcls2d, conv
from dclsify.surgery.bench import PAPER_SHAPES
from dclsify.surgery.conv import large_kernel_conv2d

pytestmark = pytest.mark.skipif(conv.triton_depthwise is None, reason="Triton cannot be imported")


def _runs_on(device: torch.device) -> None:
    refusal = conv.triton_refusal(device)
    if refusal is not None:
        pytest.skip(refusal)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).abs().max() / expected.abs().max())


def _outputs_and_grads(x, w, b, stride, padding, groups, algorithm):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = large_kernel_conv2d(x, w, b, stride, padding, groups, algorithm=algorithm)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y))
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=lambda s: f"{s[1]}x{s[2]}")
def test_the_convnext_stage_shapes_match_direct_in_float32(shape, device):
    """ConvNeXt-T's four stage maps with its 23x23 kernels (padding 11; the 8x7 map crops the kernel to
    15x13), at a small batch and few channels (the interpreter runs a program at a time)."""
    _runs_on(device)
    _, height, width = shape
    torch.manual_seed(0)
    x = torch.randn(2, 3, height, width, device=device)
    w = torch.randn(3, 1, 23, 23, device=device)
    b = torch.randn(3, device=device)
    expected = _outputs_and_grads(x, w, b, 1, 11, 3, "direct")
    got = _outputs_and_grads(x, w, b, 1, 11, 3, "triton")
    errors = {
        name: _relative_error(g, e)
        for name, g, e in zip(("output", "input grad", "weight grad", "bias grad"), got, expected, strict=True)
    }
    print(f"{height}x{width}: worst relative error", errors)
    assert got[0].dtype == torch.float32 and got[0].shape == expected[0].shape
    assert max(errors.values()) < 1e-5, errors


# (batch, channels in, channel multiplier, kernel, stride, padding, map)
ODD = [
    (3, 7, 1, (23, 23), 1, 11, (5, 9)),  # channels and rows not a power of two, kernel cropped
    (1, 4, 2, (5, 9), (2, 1), (2, 4), (11, 10)),  # channel multiplier 2, strided, non-square
    (2, 5, 1, (17, 15), 2, (8, 5), (5, 6)),  # cropped, strided both ways, uneven padding
    (1, 2, 1, (9, 9), 1, 12, (3, 3)),  # padding larger than the kernel
    (2, 3, 1, (7, 7), 3, 0, (13, 8)),  # no padding, stride 3
    (1, 6, 3, (1, 1), 1, 0, (1, 1)),  # 1x1 map and kernel, multiplier 3
    (2, 2, 1, (3, 23), 1, (1, 11), (2, 40)),  # a wide map, a wide kernel
]


@pytest.mark.parametrize("case", ODD, ids=lambda c: f"c{c[1]}x{c[2]}-k{c[3][0]}x{c[3][1]}-s{c[4]}-m{c[6][0]}x{c[6][1]}")
def test_odd_sizes_match_dense_conv_in_float64(case, device):
    _runs_on(device)
    batch, channels, multiplier, kernel, stride, padding, size = case
    torch.manual_seed(1)
    x = torch.randn(batch, channels, *size, dtype=torch.float64, device=device)
    w = torch.randn(channels * multiplier, 1, *kernel, dtype=torch.float64, device=device)
    b = torch.randn(channels * multiplier, dtype=torch.float64, device=device)
    x_, w_, b_ = (t.detach().requires_grad_() for t in (x, w, b))
    y = F.conv2d(x_, w_, b_, stride, padding, groups=channels)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y))
    got = _outputs_and_grads(x, w, b, stride, padding, channels, "triton")
    expected = (y, x_.grad, w_.grad, b_.grad)
    for name, g, e in zip(("output", "input grad", "weight grad", "bias grad"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("blocks", [(512, 512, 64), (64, 64, 16)], ids=["gpu-blocks", "tiny-blocks"])
def test_small_blocks_cover_every_row_pixel_and_tap(blocks, monkeypatch, device):
    """The interpreter runs large blocks (one per map, mostly); a GPU runs the small ones set for it, with
    many programs and masks at every block's edge: the same results with those, and with smaller still."""
    _runs_on(device)
    block, weight_block, weight_pixels = blocks
    module = conv.triton_depthwise
    monkeypatch.setattr(module, "_BLOCK", block)
    monkeypatch.setattr(module, "_WEIGHT_BLOCK", weight_block)
    monkeypatch.setattr(module, "_WEIGHT_PIXELS", weight_pixels)
    for batch, channels, multiplier, kernel, stride, padding, size in [
        (2, 3, 1, (5, 5), 1, 2, (9, 10)),  # 90 pixels: one block of them, or two; rows 4 at a time, or 1
        (2, 3, 2, (5, 9), (2, 1), (2, 4), (11, 10)),  # strided, multiplier 2
    ]:
        torch.manual_seed(5)
        x = torch.randn(batch, channels, *size, dtype=torch.float64, device=device)
        w = torch.randn(channels * multiplier, 1, *kernel, dtype=torch.float64, device=device)
        b = torch.randn(channels * multiplier, dtype=torch.float64, device=device)
        expected = _outputs_and_grads(x, w, b, stride, padding, channels, "direct")
        got = _outputs_and_grads(x, w, b, stride, padding, channels, "triton")
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_random_strided_geometries_match_dense_conv(seed, device):
    _runs_on(device)
    generator = torch.Generator().manual_seed(100 + seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    kernel, padding, stride = (draw(1, 11), draw(1, 11)), (draw(0, 12), draw(0, 12)), (draw(1, 3), draw(1, 3))
    size = tuple(max(draw(1, 12), k - 2 * p) for k, p in zip(kernel, padding, strict=True))
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=generator).to(device)
    w = torch.randn(3, 1, *kernel, dtype=torch.float64, generator=generator).to(device)
    b = torch.zeros(3, dtype=torch.float64, device=device)
    expected = _outputs_and_grads(x, w, b, stride, padding, 3, "direct")
    got = _outputs_and_grads(x, w, b, stride, padding, 3, "triton")
    for g, e in zip(got[:3], expected[:3], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f"{kernel} {padding} {stride} {size}")


def test_bf16_autocast_returns_what_conv2d_returns(device):
    """Under autocast the output is in the autocast dtype, as F.conv2d's; the gradients come back in the
    dtypes of their tensors (float32), summed in float32."""
    _runs_on(device)
    torch.manual_seed(2)
    x = torch.randn(2, 4, 8, 7, device=device, requires_grad=True)
    w = torch.randn(4, 1, 23, 23, device=device, requires_grad=True)
    results = {}
    for algorithm in ("direct", "triton"):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = large_kernel_conv2d(x, w, None, 1, 11, 4, algorithm=algorithm)
        grads = torch.autograd.grad(y.float().square().sum(), (x, w))
        results[algorithm] = (y, *grads)
    assert [t.dtype for t in results["triton"]] == [t.dtype for t in results["direct"]]
    assert results["triton"][0].dtype == torch.bfloat16
    for got, expected in zip(results["triton"], results["direct"], strict=True):
        assert _relative_error(got, expected) < 2e-2  # bf16 rounding of the inputs (direct) or of the output


def test_a_dcls_layer_computes_the_same_through_triton(device):
    """Dcls2d(algorithm="triton"): output and the gradients of input, weight, positions and bias."""
    _runs_on(device)
    torch.manual_seed(3)
    layers = {
        algorithm: Dcls2d(6, 6, kernel_count=8, dilated_kernel_size=13, padding=6, groups=6, algorithm=algorithm)
        for algorithm in ("direct", "triton")
    }
    layers["triton"].load_state_dict(layers["direct"].state_dict())
    x = torch.randn(2, 6, 9, 11)
    results = {}
    for algorithm, layer in layers.items():
        layer.to(device)
        inputs = x.to(device).requires_grad_()
        y = layer(inputs)
        y.square().sum().backward()
        results[algorithm] = [y, inputs.grad] + [p.grad for p in layer.parameters()]
    assert len(results["triton"]) >= 5  # weight, P, SIG, bias
    for got, expected in zip(results["triton"], results["direct"], strict=True):
        assert _relative_error(got, expected) < 1e-5


def test_an_empty_batch_gives_empty_results(device):
    _runs_on(device)
    x = torch.randn(0, 3, 6, 7, device=device, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, device=device, requires_grad=True)
    y = large_kernel_conv2d(x, w, None, 1, 2, 3, algorithm="triton")
    y.sum().backward()
    assert y.shape == (0, 3, 6, 7) and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_the_same_bits_on_every_run(device):
    """No atomics: the weight gradient is summed in one fixed order."""
    _runs_on(device)
    torch.manual_seed(4)
    x, w, b = torch.randn(3, 4, 16, 15, device=device), torch.randn(4, 1, 23, 23, device=device), torch.zeros(4)
    first, second = (_outputs_and_grads(x, w, b.to(device), 1, 11, 4, "triton") for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_auto_does_not_choose_triton_before_it_is_measured_on_a_gpu(device):
    _runs_on(device)
    conv.clear_chosen_algorithms()
    x = torch.randn(1, 4, 8, 7, device=device, requires_grad=True)
    large_kernel_conv2d(x, torch.randn(4, 1, 23, 23, device=device), None, 1, 11, 4).sum().backward()
    assert "triton" not in conv.chosen_algorithms().values() and "triton" in conv.NOT_CHOSEN_BY_AUTO
    conv.clear_chosen_algorithms()


def test_triton_refuses_what_it_cannot_compute():
    grouped = torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="'triton' does not apply here: it needs one input channel per group"):
        large_kernel_conv2d(*grouped, None, 1, 1, 2, algorithm="triton")
    # on the CPU without the interpreter: one clear error, naming the way to run it
    script = (
        "import torch\n"
        "from dclsify.surgery.conv import large_kernel_conv2d\n"
        "try:\n"
        "    large_kernel_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), None, 1, 1, 2, algorithm='triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), *sys.path]))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (
        "algorithm 'triton' does not apply here: it runs on CUDA tensors, or on the CPU when TRITON_INTERPRET=1"
        " is set before dclsify is imported; not on cpu"
    )
