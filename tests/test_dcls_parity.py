"""Dcls2d against the reference implementation, DCLS==0.1.1 (a test oracle only)."""

import logging

import pytest
import torch

from dclsify import Dcls2d

reference = pytest.importorskip("DCLS.construct.modules", reason="DCLS==0.1.1 (the oracle) is not installed")

# (channels, kernel, count, stride, bias, batch, map size): every value the issue names
# appears, on depthwise layers; map sizes stay small to keep the oracle fast.
DEPTHWISE = [
    (96, 23, 26, 1, True, 8, (16, 15)),
    (96, 7, 5, 2, False, 1, (13, 12)),
    (96, 31, 34, 1, False, 1, (9, 10)),
    (384, 17, 26, 2, True, 1, (8, 7)),
    (384, 23, 34, 1, False, 8, (6, 5)),
    (384, 7, 26, 1, True, 8, (8, 7)),
    (768, 23, 26, 1, True, 1, (8, 7)),
    (768, 31, 5, 2, True, 8, (5, 4)),
    (768, 17, 34, 1, False, 1, (4, 4)),
]


def _reference_layer(**kwargs):
    logging.disable(logging.WARNING)  # the oracle warns about its CUDA kernel on every construction
    try:
        return reference.Dcls2d(**kwargs)
    finally:
        logging.disable(logging.NOTSET)


def _assert_parity(kwargs, x, algorithm="auto", position_range=(0.0, 1.0), tolerance=1e-4):
    """Outputs and gradients agree to ``tolerance`` of the largest value, in the dtype of ``x``, with
    each coordinate of each position of a magnitude uniform in ``position_range`` times half the
    window, of a random sign."""
    torch.manual_seed(0)
    ref = _reference_layer(**kwargs).to(x.device, x.dtype)
    with torch.no_grad():  # positions spread over the window and sigmas of both signs, not just the init
        low, high = (bound * (ref.dilated_kernel_size[0] // 2) for bound in position_range)
        sign = torch.randint(0, 2, ref.P.shape, device=x.device) * 2 - 1
        ref.P.uniform_(low, high).mul_(sign)
        if ref.SIG is not None:
            ref.SIG.uniform_(-1.0, 1.0)
    ours = Dcls2d(**kwargs, algorithm=algorithm).to(x.device, x.dtype)
    ours.load_state_dict(ref.state_dict())
    results = []
    for layer in (ref, ours):
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y))
        results.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    names = ["output", "input grad"] + [name for name, _ in ours.named_parameters()]
    for name, expected, got in zip(names, *results, strict=True):
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= tolerance * scale, f"{name} differs from DCLS 0.1.1"


@pytest.mark.parametrize("version", ["gauss", "v1"])
@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: f"c{c[0]}-k{c[1]}-n{c[2]}-s{c[3]}-b{int(c[4])}-B{c[5]}")
def test_depthwise_matches_reference(version, case, device):
    channels, kernel, count, stride, bias, batch, size = case
    kwargs = dict(
        in_channels=channels,
        out_channels=channels,
        kernel_count=count,
        stride=stride,
        padding=kernel // 2,
        dilated_kernel_size=kernel,
        groups=channels,
        bias=bias,
        version=version,
    )
    torch.manual_seed(1)
    _assert_parity(kwargs, torch.randn(batch, channels, *size).to(device))


@pytest.mark.parametrize("version", ["gauss", "v1"])
@pytest.mark.parametrize("algorithm", ["direct", "channels_last", "fft", "toeplitz"])
def test_every_algorithm_matches_reference(version, algorithm, device):
    kwargs = dict(
        in_channels=32, out_channels=32, kernel_count=26, padding=11, dilated_kernel_size=23, groups=32, version=version
    )
    torch.manual_seed(2)
    _assert_parity(kwargs, torch.randn(2, 32, 12, 11).to(device), algorithm)


@pytest.mark.parametrize("version", ["gauss", "v1"])
@pytest.mark.parametrize("groups, in_channels, out_channels", [(1, 3, 4), (2, 6, 4), (4, 4, 8)])
def test_grouped_and_dense_match_reference(version, groups, in_channels, out_channels):
    kwargs = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_count=9,
        stride=2,
        padding=(2, 3),
        dilated_kernel_size=7,
        groups=groups,
        version=version,
    )
    torch.manual_seed(3)
    _assert_parity(kwargs, torch.randn(2, in_channels, 11, 10))


# Positions never clamped (the paper's training): elements straddling the window's edge, wholly
# outside it, and so far out that only the far tails of their Gaussians reach it (v1's hat, none).
OUTSIDE = {"straddling": (1.0, 1.5), "outside": (1.5, 4.0), "far": (3.0, 10.0)}


@pytest.mark.parametrize("version", ["gauss", "v1"])
@pytest.mark.parametrize("kernel, count", [(7, 5), (23, 26)], ids=["k7", "k23"])
@pytest.mark.parametrize("band", list(OUTSIDE), ids=list(OUTSIDE))
def test_positions_outside_the_window_match_reference(version, kernel, count, band):
    # In float64: the gradient of an element cut by the edge is a difference of nearly equal terms,
    # whose float32 rounding (in both implementations) would hide a difference of formula.
    kwargs = dict(
        in_channels=8,
        out_channels=8,
        kernel_count=count,
        padding=kernel // 2,
        dilated_kernel_size=kernel,
        groups=8,
        version=version,
    )
    torch.manual_seed(4)
    x = torch.randn(2, 8, 12, 11, dtype=torch.float64)
    _assert_parity(kwargs, x, position_range=OUTSIDE[band], tolerance=1e-9)


def test_far_tails_outside_the_window_match_reference_in_float32():
    # Elements 9 to 30 taps off a 7x7 window: the layer's kernel is their Gaussians' tails alone,
    # values the reference holds as normal float32 numbers (down to e^-87), and so must we.
    kwargs = dict(in_channels=8, out_channels=8, kernel_count=5, padding=3, dilated_kernel_size=7, groups=8)
    torch.manual_seed(4)
    _assert_parity(kwargs, torch.randn(2, 8, 12, 11), position_range=OUTSIDE["far"])


@pytest.mark.parametrize("version", ["gauss", "v1"])
def test_same_seed_same_initialisation(version):
    kwargs = dict(
        in_channels=96, out_channels=96, kernel_count=26, padding=11, dilated_kernel_size=23, groups=96, version=version
    )
    torch.manual_seed(5)
    expected = _reference_layer(**kwargs).state_dict()
    torch.manual_seed(5)
    got = Dcls2d(**kwargs).state_dict()
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
