"""Every convolution algorithm equals F.conv2d, forward and backward, in float64."""

import pytest
import torch
import torch.nn.functional as F

from dclsify.surgery import conv
from dclsify.surgery.conv import ALGORITHMS, large_kernel_conv2d

# (batch, in, out, groups, kernel (h, w), stride, padding, map (h, w))
CASES = [
    (2, 6, 6, 6, (7, 7), 1, 3, (9, 8)),  # depthwise
    (1, 4, 8, 4, (5, 9), (2, 1), (2, 4), (11, 10)),  # depthwise, channel multiplier 2, non-square
    (2, 6, 4, 2, (5, 5), 2, 1, (8, 9)),  # grouped, 3 inputs per group
    (1, 3, 5, 1, (3, 3), 1, 0, (6, 7)),  # dense
    (2, 5, 5, 5, (23, 23), 1, 11, (8, 7)),  # kernel larger than the map: cropped
    (1, 4, 4, 4, (17, 15), 2, (8, 5), (5, 6)),  # cropped, strided, uneven
    (1, 2, 2, 2, (9, 9), 1, 12, (3, 3)),  # padding larger than the kernel
]


def _reference_and_grads(x, w, b, stride, padding, groups, **kwargs):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = kwargs.pop("fn", F.conv2d)(x, w, b, stride, padding, groups=groups, **kwargs)
    grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    y.backward(grad)
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c[3]}-k{c[4][0]}x{c[4][1]}-s{c[5]}-m{c[7][0]}x{c[7][1]}")
def test_algorithm_matches_dense_conv(algorithm, case, device):
    batch, cin, cout, groups, kernel, stride, padding, size = case
    torch.manual_seed(0)
    x = torch.randn(batch, cin, *size, dtype=torch.float64, device=device)
    w = torch.randn(cout, cin // groups, *kernel, dtype=torch.float64, device=device)
    b = torch.randn(cout, dtype=torch.float64, device=device)
    expected = _reference_and_grads(x, w, b, stride, padding, groups)
    if algorithm in ("toeplitz", "triton") and cin // groups != 1:
        refusal = f"'{algorithm}' does not apply here: it needs one input channel per group"
        with pytest.raises(ValueError, match=refusal):
            large_kernel_conv2d(x, w, b, stride, padding, groups, algorithm=algorithm)
        return
    if algorithm == "triton" and conv.triton_refusal(x.device) is not None:
        pytest.skip(conv.triton_refusal(x.device))
    got = _reference_and_grads(
        x, w, b, stride, padding, groups, fn=lambda *a, groups: large_kernel_conv2d(*a, groups, algorithm=algorithm)
    )
    assert got[0].shape == expected[0].shape
    for name, g, e in zip(("output", "input grad", "weight grad", "bias grad"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=f"{algorithm}: {name}")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_match_conv2d_module(mode):
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(4, 4, 5, padding=2, groups=4, padding_mode=mode).double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    for algorithm in ALGORITHMS:
        if algorithm == "triton" and conv.triton_refusal(x.device) is not None:
            continue
        got = large_kernel_conv2d(x, reference.weight, reference.bias, 1, 2, 4, mode, algorithm)
        torch.testing.assert_close(got, reference(x), rtol=1e-9, atol=1e-9)


def test_kernel_is_cropped_to_the_taps_that_reach_the_input():
    # 23 taps, padding 11, 8 input rows: output row y reads kernel rows 11 - y .. 18 - y,
    # so only rows 4 .. 18 are ever used.
    rows, before, after, out = conv._crop(8, 23, 1, 11)
    assert (rows, before, after, out) == (slice(4, 19), 7, 7, 8)
    assert conv._crop(64, 23, 1, 11) == (slice(0, 23), 11, 11, 64)  # nothing to crop


def test_fast_fft_lengths():
    assert [conv._fast_len(n) for n in (1, 43, 75, 86, 97, 128)] == [2, 48, 80, 90, 98, 128]


def test_auto_measures_once_and_caches(monkeypatch):
    conv.clear_chosen_algorithms()
    calls = []
    measure = conv._measure
    monkeypatch.setattr(conv, "_measure", lambda name, *a: calls.append(name) or measure(name, *a))
    x = torch.randn(2, 8, 12, 11, requires_grad=True)
    w = torch.randn(8, 1, 9, 9, requires_grad=True)
    first = large_kernel_conv2d(x, w, None, 1, 4, 8)
    measured = len(calls)
    assert measured >= 2 and set(calls) <= {"direct", "channels_last", "fft", "toeplitz"}
    second = large_kernel_conv2d(x, w, None, 1, 4, 8)
    assert len(calls) == measured  # cached
    torch.testing.assert_close(first, second)
    (choice,) = conv.chosen_algorithms().values()
    assert choice in calls
    with torch.no_grad():  # no backward needed: a different key, measured again
        large_kernel_conv2d(x, w, None, 1, 4, 8)
    assert len(calls) > measured and len(conv.chosen_algorithms()) == 2


def test_unknown_algorithm_is_a_clear_error():
    with pytest.raises(ValueError, match=r"algorithm must be one of .*'fft'.*got 'fast'"):
        large_kernel_conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3), algorithm="fast")


@pytest.mark.parametrize("seed", range(40))
def test_random_geometries_match_dense_conv(seed, device):
    # Crops, wrap-arounds and strides meet in many ways: sizes, paddings and strides at random.
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    kernel = (draw(1, 13), draw(1, 13))
    padding = (draw(0, 14), draw(0, 14))
    stride = (draw(1, 3), draw(1, 3))
    size = tuple(max(draw(1, 12), k - 2 * p) for k, p in zip(kernel, padding, strict=True))
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=generator).to(device)
    w = torch.randn(3, 1, *kernel, dtype=torch.float64, generator=generator).to(device)
    bias = torch.zeros(3, dtype=torch.float64, device=device)
    expected = _reference_and_grads(x, w, bias, stride, padding, 3)
    for algorithm in ("fft", "toeplitz", "direct"):
        got = _reference_and_grads(
            x,
            w,
            bias,
            stride,
            padding,
            3,
            fn=lambda *a, groups, algorithm=algorithm: large_kernel_conv2d(*a, groups, algorithm=algorithm),
        )
        for g, e in zip(got[:3], expected[:3], strict=True):
            torch.testing.assert_close(
                g, e, rtol=1e-9, atol=1e-9, msg=f"{algorithm} {kernel} {padding} {stride} {size}"
            )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_edge_inputs_behave_as_conv2d(algorithm):
    torch.manual_seed(0)
    w = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    if algorithm == "triton" and conv.triton_refusal(w.device) is not None:
        pytest.skip(conv.triton_refusal(w.device))
    with pytest.raises(ValueError, match=r"padded input \(3\) is smaller than the kernel \(5\)"):
        large_kernel_conv2d(torch.randn(1, 4, 3, 3, dtype=torch.float64), w, groups=4, algorithm=algorithm)
    unbatched = torch.randn(4, 9, 8, dtype=torch.float64)  # (C, H, W), as nn.Conv2d accepts
    torch.testing.assert_close(
        large_kernel_conv2d(unbatched, w, None, 1, 2, 4, algorithm=algorithm), F.conv2d(unbatched, w, None, 1, 2, 1, 4)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone, so must we
        assert large_kernel_conv2d(unbatched, w, None, 1, 2, 4, algorithm=algorithm).dtype == torch.float64
    with pytest.raises(ValueError, match="padding must be a non-negative int or pair"):
        large_kernel_conv2d(unbatched, w, None, 1, "same", 4, algorithm=algorithm)


def test_auto_never_chooses_an_algorithm_that_ran_out_of_memory(monkeypatch):
    conv.clear_chosen_algorithms()
    fft = conv._KERNELS["fft"]

    def exhausted(*args):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setitem(conv._KERNELS, "fft", exhausted)
    monkeypatch.setitem(conv._KERNELS, "direct", exhausted)
    x, w = torch.randn(1, 4, 40, 40, dtype=torch.float64), torch.randn(4, 1, 23, 23, dtype=torch.float64)
    with torch.no_grad():
        y = large_kernel_conv2d(x, w, None, 1, 11, 4)
    assert set(conv.chosen_algorithms().values()) <= {"channels_last", "toeplitz"}
    torch.testing.assert_close(y, fft(x, w, conv._plan((40, 40), (23, 23), (1, 1), (11, 11)), 4))
    conv.clear_chosen_algorithms()


def test_auto_under_deterministic_algorithms_takes_the_estimate_without_timing(monkeypatch, device):
    # timings differ from process to process, and the algorithms agree only to rounding
    conv.clear_chosen_algorithms()
    monkeypatch.setattr(conv, "_measure", lambda *args: pytest.fail("timed under deterministic algorithms"))
    x = torch.randn(2, 8, 12, 11, device=device, requires_grad=True)
    w = torch.randn(8, 1, 9, 9, device=device, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        large_kernel_conv2d(x, w, None, 1, 4, 8).sum().backward()
        for algorithm in ALGORITHMS:  # none raises: each has a deterministic path here
            if algorithm == "triton" and conv.triton_refusal(x.device) is not None:
                continue
            large_kernel_conv2d(x, w, None, 1, 4, 8, algorithm=algorithm).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    ((key, choice),) = conv.chosen_algorithms().items()
    plan = conv._plan((12, 11), (9, 9), (1, 1), (4, 4))
    candidates = [name for name in conv._applicable(x, w, plan) if name not in conv.NOT_CHOSEN_BY_AUTO]
    assert key.deterministic and choice == min(candidates, key=lambda name: conv._estimated_cost(name, x, w, plan))
    conv.clear_chosen_algorithms()
