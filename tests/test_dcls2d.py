"""Dcls2d as a module: its kernel, arguments, baking, devices, dtypes, tracing and compiling."""

import copy
import io
import math
import pickle
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from dclsify import Dcls2d, LargeKernelConv2d, dcls_kernel
from dclsify.surgery.bench import peak_bytes
from dclsify.surgery.dcls import dcls_conv2d
from dclsify.surgery.opcount import count_ops


def _layer(channels=8, kernel=7, count=5, **kwargs):
    torch.manual_seed(0)
    kwargs = {"padding": kernel // 2, "groups": channels, **kwargs}
    return Dcls2d(channels, channels, count, dilated_kernel_size=kernel, **kwargs)


def _dense_gaussian_kernel(weight, P, SIG, kh, kw):
    """DCLS-Gauss written out in full, one (C x count x kh x kw) tensor: the definition."""
    rows = torch.arange(kh, dtype=P.dtype, device=P.device).view(kh, 1)
    cols = torch.arange(kw, dtype=P.dtype, device=P.device).view(1, kw)
    y = (rows - (P[1] + kh // 2)[..., None, None]) / (SIG[1].abs() + 0.27)[..., None, None]
    x = (cols - (P[0] + kw // 2)[..., None, None]) / (SIG[0].abs() + 0.27)[..., None, None]
    element = torch.exp(-0.5 * (x**2 + y**2))
    element = element / (element.sum((-2, -1), keepdim=True) + 1e-7)
    return (weight[..., None, None] * element).sum(2)


def test_kernel_is_the_sum_of_normalised_gaussians():
    torch.manual_seed(0)
    weight = torch.randn(6, 2, 9, dtype=torch.float64)
    P = torch.empty(2, 6, 2, 9, dtype=torch.float64).uniform_(-4, 4)
    SIG = torch.empty(2, 6, 2, 9, dtype=torch.float64).uniform_(-1, 1)
    got = dcls_kernel(weight, P, SIG, (9, 11))
    torch.testing.assert_close(got, _dense_gaussian_kernel(weight, P, SIG, 9, 11), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gaussian", [True, False], ids=["gauss", "v1"])
@pytest.mark.parametrize(
    "kernel_size, rows, cols",
    [
        ((9, 9), slice(None), slice(None)),
        ((9, 9), slice(2, 7), slice(1, 9)),
        ((7, 10), slice(1, 6), slice(3, 10)),
        ((10, 7), slice(2, 9), slice(0, 5)),
        ((1, 1), slice(None), slice(None)),
    ],
)
def test_kernel_backward_matches_finite_differences(gaussian, kernel_size, rows, cols, device):
    # the kernel's backward is written by hand: check it against the definition's derivatives
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 4, dtype=torch.float64).to(device).requires_grad_()
    P = torch.empty(2, 3, 2, 4, dtype=torch.float64).uniform_(-5, 5).to(device).requires_grad_()  # some off the edge
    SIG = torch.empty(2, 3, 2, 4, dtype=torch.float64).uniform_(-1, 1).to(device).requires_grad_()
    SIG = SIG if gaussian else None
    inputs = (weight, P) + ((SIG,) if gaussian else ())

    def kernel(*params):
        return dcls_kernel(params[0], params[1], params[2] if gaussian else None, kernel_size, rows, cols)

    assert torch.autograd.gradcheck(kernel, inputs)
    if gaussian:
        torch.testing.assert_close(
            kernel(*inputs), _dense_gaussian_kernel(weight, P, SIG, *kernel_size)[..., rows, cols], rtol=0, atol=1e-9
        )  # not 1e-12: the e^-40 floor shows where an element far off the window meets the 1e-7 normaliser


def test_kernel_taps_are_sliced_as_indexing_would():
    torch.manual_seed(0)
    weight, P, SIG = torch.randn(2, 1, 3), torch.randn(2, 2, 1, 3), torch.rand(2, 2, 1, 3)
    full = dcls_kernel(weight, P, SIG, (7, 10))
    for rows, cols in [(slice(-3, None), slice(2, 50)), (slice(0, 100), slice(-4, -1)), (slice(5, 2), slice(None))]:
        torch.testing.assert_close(dcls_kernel(weight, P, SIG, (7, 10), rows, cols), full[..., rows, cols])
    with pytest.raises(ValueError, match="contiguous"):
        dcls_kernel(weight, P, SIG, (7, 10), slice(0, 7, 2))


def test_kernel_gradients_ignore_autocast_at_backward():
    layer = _layer(channels=4, kernel=9, count=5)
    layer.kernel().square().sum().backward()
    expected = [p.grad.clone() for p in (layer.weight, layer.P, layer.SIG)]
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.kernel().square().sum().backward()
    for param, want in zip((layer.weight, layer.P, layer.SIG), expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-6, atol=1e-7)


def test_position_axes_follow_the_reference_convention():
    # P[0] moves an element along the width (last) axis, P[1] along the height.
    weight = torch.ones(1, 1, 1)
    P = torch.tensor([2.0, -1.0]).view(2, 1, 1, 1)
    SIG = torch.zeros(2, 1, 1, 1)
    for version_sig in (SIG, None):
        kernel = dcls_kernel(weight, P, version_sig, (7, 9))[0, 0]
        assert divmod(kernel.argmax().item(), 9) == (7 // 2 - 1, 9 // 2 + 2)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_bilinear_kernel_splits_an_element_over_its_four_neighbours():
    P = torch.tensor([0.25, -0.5]).view(2, 1, 1, 1)
    kernel = dcls_kernel(torch.full((1, 1, 1), 2.0), P, None, (5, 5))[0, 0]
    expected = torch.zeros(5, 5)
    expected[1:3, 2:4] = 2.0 * torch.tensor([[0.5 * 0.75, 0.5 * 0.25], [0.5 * 0.75, 0.5 * 0.25]])
    torch.testing.assert_close(kernel, expected)


def test_kernel_construction_never_builds_a_count_by_kernel_squared_tensor():
    layer = _layer(channels=96, kernel=23, count=26)
    one_dense_tensor = 96 * 26 * 23 * 23 * 4  # bytes of a float32 (C, count, k, k) tensor
    peak = peak_bytes(lambda: layer.kernel().sum().backward())
    assert 0 < peak < one_dense_tensor / 2


def test_kernel_construction_uses_a_tenth_of_the_reference_memory():
    reference = pytest.importorskip("DCLS.construct.modules", reason="DCLS==0.1.1 (the oracle) is not installed")
    layer = _layer(channels=96, kernel=23, count=26)
    ref = reference.Dcls2d(96, 96, 26, padding=11, dilated_kernel_size=23, groups=96)
    ours = peak_bytes(lambda: layer.kernel().sum().backward())
    theirs = peak_bytes(lambda: ref.DCK(ref.weight, ref.P, ref.SIG).sum().backward())
    assert ours <= theirs / 10


def test_gradients_reach_positions_and_sigmas():
    layer = _layer()
    layer(torch.randn(2, 8, 9, 9)).square().sum().backward()
    for name in ("weight", "P", "SIG", "bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_initialisation_and_clamping():
    torch.manual_seed(0)
    layer = Dcls2d(64, 64, 26, dilated_kernel_size=(5, 9), groups=64)
    assert layer.weight.shape == (64, 1, 26) and layer.P.shape == layer.SIG.shape == (2, 64, 1, 26)
    assert torch.all(layer.SIG == 0.23)
    assert layer.P[0].abs().max() <= 4 and layer.P[1].abs().max() <= 2
    assert layer.P.std().item() == pytest.approx(0.5, rel=0.1)
    bound = 1 / math.sqrt(26)  # kaiming-uniform(a=sqrt(5)) over 26 taps
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    with torch.no_grad():
        layer.P.fill_(10.0)
    layer.clamp_parameters()
    assert torch.all(layer.P[0] == 4) and torch.all(layer.P[1] == 2)
    assert Dcls2d(4, 4, 3, dilated_kernel_size=5, groups=4, version="v1").SIG is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel_count": 0}, r"kernel_count must be an int from 1 to 49 .*got 0"),
        ({"kernel_count": 50}, r"kernel_count must be an int from 1 to 49 .*got 50"),
        ({"dilated_kernel_size": 0}, r"dilated_kernel_size must be a positive int or pair, got 0"),
        ({"in_channels": 6}, r"in_channels must be a positive multiple of groups=4, got 6"),
        ({"out_channels": 5}, r"out_channels must be a positive multiple of groups=4, got 5"),
        ({"version": "max"}, r"version must be one of \('gauss', 'v1'\), got 'max'"),
        ({"algorithm": "winograd"}, r"algorithm must be one of \('auto', .*\), got 'winograd'"),
        ({"padding_mode": "mirror"}, r"padding_mode must be one of .*got 'mirror'"),
        ({"stride": 0}, r"stride must be a positive int or pair, got 0"),
        ({"padding": -1}, r"padding must be a non-negative int or pair"),
    ],
)
def test_invalid_arguments_are_one_clear_value_error(kwargs, message):
    arguments = {"in_channels": 4, "out_channels": 4, "kernel_count": 5, "dilated_kernel_size": 7, "groups": 4}
    with pytest.raises(ValueError, match=message):
        Dcls2d(**{**arguments, **kwargs})


@pytest.mark.parametrize("version", ["gauss", "v1"])
def test_bake_gives_a_conv2d_with_identical_outputs(version):
    layer = _layer(stride=2, version=version).eval()
    x = torch.randn(2, 8, 13, 12)
    baked = layer.bake()
    assert isinstance(baked, torch.nn.Conv2d) and isinstance(baked, LargeKernelConv2d)
    assert not baked.training and baked.weight.shape == (8, 1, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), layer(x), rtol=0, atol=1e-6)
        plain = torch.nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8)
        plain.load_state_dict(baked.state_dict())
        torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=1e-6)


def test_pickle_and_deepcopy_round_trip():
    layer = _layer()
    x = torch.randn(1, 8, 9, 9)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(clone(x), layer(x))
        assert clone.P is not layer.P


def test_moving_dtype_and_device_recomputes_everything():
    layer = _layer()
    x = torch.randn(2, 8, 9, 9)
    y32 = layer(x)
    layer64 = copy.deepcopy(layer).double()
    y64 = layer64(x.double())
    assert y64.dtype == torch.float64
    expected = F.conv2d(x.double(), layer64.kernel(), layer64.bias, 1, 3, 1, 8)
    torch.testing.assert_close(y64, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y32, y64.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["auto", "direct", "channels_last", "fft", "toeplitz"])
def test_cuda_matches_cpu(algorithm):
    layer = _layer(channels=32, kernel=23, count=26, algorithm=algorithm)
    x = torch.randn(2, 32, 16, 15, requires_grad=True)
    layer(x).square().sum().backward()
    expected = [x.grad, layer.P.grad, layer.SIG.grad]
    cuda_layer, cuda_x = copy.deepcopy(layer).cuda(), x.detach().cuda().requires_grad_()
    cuda_layer.zero_grad()
    cuda_layer(cuda_x).square().sum().backward()
    for got, want in zip([cuda_x.grad, cuda_layer.P.grad, cuda_layer.SIG.grad], expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            assert cuda_layer(cuda_x).dtype == dtype


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("algorithm", ["direct", "channels_last", "fft", "toeplitz"])
def test_autocast(algorithm, dtype, tolerance, device):
    layer = _layer(channels=16, kernel=23, count=26, algorithm=algorithm).to(device)
    x = torch.randn(2, 16, 10, 9).to(device)
    expected = layer(x)
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=tolerance * expected.abs().max().item())
    y.float().sum().backward()
    assert layer.P.grad.dtype == torch.float32 and layer.P.grad.abs().sum() > 0


def test_symbolic_trace_keeps_the_operator_whole():
    model = torch.nn.Sequential(_layer(), torch.nn.GELU())
    traced = torch.fx.symbolic_trace(model)
    called = [node.target.__name__ for node in traced.graph.nodes if node.op == "call_function"]
    assert called == ["dcls_conv2d"]
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(traced(x), model(x))

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, Dcls2d) or super().is_leaf_module(module, name)

    graph = LeafTracer().trace(model)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_torch_compile_gives_the_same_outputs_and_gradients(device):
    model = torch.nn.Sequential(_layer(), torch.nn.GELU()).to(device)
    compiled = torch.compile(model)
    x = torch.randn(2, 8, 10, 9, device=device, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    compiled_grad = model[0].P.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(compiled_grad, model[0].P.grad, rtol=1e-4, atol=1e-5)


def test_kernel_can_be_built_for_a_window_of_taps_only():
    layer = _layer(channels=4, kernel=23, count=26)
    rows, cols = slice(4, 19), slice(5, 18)  # what an 8x7 map can reach (surgery/conv.py: _crop)
    full = dcls_kernel(layer.weight, layer.P, layer.SIG, (23, 23))
    torch.testing.assert_close(
        dcls_kernel(layer.weight, layer.P, layer.SIG, (23, 23), rows, cols), full[..., rows, cols]
    )


def _stage(layers=3, channels=8, kernel=9, version="gauss"):
    """Layers sharing one P and SIG, as the rewrite builds a stage, with positions spread over the window."""
    torch.manual_seed(0)
    stage = torch.nn.Sequential(*(_layer(channels, kernel, 5, version=version) for _ in range(layers)))
    for layer in stage[1:]:
        layer.P, layer.SIG = stage[0].P, stage[0].SIG
    with torch.no_grad():
        stage[0].P.uniform_(-(kernel // 2), kernel // 2)
        if stage[0].SIG is not None:
            stage[0].SIG.uniform_(-1, 1)
    return stage


def _each_layer_alone(stage, x):
    """The stage computed without sharing: every layer builds its own profiles."""
    for layer in stage:
        x = dcls_conv2d(
            x, layer.weight, layer.P, layer.SIG, layer.bias, layer.dilated_kernel_size, 1, layer.padding, layer.groups
        )
    return x


def _outputs_and_gradients(stage, forward, x, grad):
    stage.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = forward(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad for p in stage.parameters()]


@pytest.mark.parametrize("version", ["gauss", "v1"])
def test_layers_sharing_positions_build_their_profiles_once_with_the_same_results(version):
    stage = _stage(version=version)
    x, grad = torch.randn(2, 8, 10, 11), torch.randn(2, 8, 10, 11)
    shared = _outputs_and_gradients(stage, stage, x, grad)
    alone = _outputs_and_gradients(stage, partial(_each_layer_alone, stage), x, grad)
    for got, want in zip(shared, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    profile_op = "aten.exp_.default" if version == "gauss" else "aten.relu_.default"
    assert count_ops(lambda: stage(x).sum().backward()).ops[profile_op] == 1
    assert count_ops(lambda: _each_layer_alone(stage, x).sum().backward()).ops[profile_op] == 3


def test_shared_profiles_follow_every_pass_and_every_change_of_the_positions():
    stage = _stage()
    x, grad = torch.randn(2, 8, 10, 11), torch.randn(2, 8, 10, 11)
    once = _outputs_and_gradients(stage, stage, x, grad)[2:]
    stage.zero_grad()
    for _ in range(2):  # gradient accumulation: forward, backward, forward, backward
        stage(x).backward(grad)
    for param, want in zip(stage.parameters(), once, strict=True):
        torch.testing.assert_close(param.grad, 2 * want)
    stage.zero_grad()
    (stage(x) + stage(x)).backward(2 * grad)  # two passes, one backward
    for param, want in zip(stage.parameters(), once, strict=True):
        torch.testing.assert_close(param.grad, 4 * want)
    with torch.no_grad():  # then a layer with gradients after one without
        stage[2](x)
    stage.zero_grad(set_to_none=True)
    stage[0](x).backward(grad)
    assert all(p.grad is not None for p in stage[0].parameters())
    with torch.no_grad():  # positions moved in place (an optimiser step) between passes
        before = stage(x)
        stage[0].P.add_(0.5)
        after = stage(x)
        torch.testing.assert_close(after, _each_layer_alone(stage, x))
        assert not torch.allclose(after, before)
        stage[2](x)  # a layer that did not run since the positions moved still sees them move
        stage[0].P.sub_(0.5)
        torch.testing.assert_close(stage[0](x), _each_layer_alone(stage[:1], x))
    stage[2](x).backward(grad)  # and one whose profiles' backward has run gets new ones
    stage[0](x).backward(grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gets_the_same_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint

    stage = _stage()
    x, grad = torch.randn(2, 8, 10, 11), torch.randn(2, 8, 10, 11)

    def checkpointed(x):
        for layer in stage:
            x = checkpoint(layer, x, use_reentrant=reentrant)
        return x

    for got, want in zip(
        _outputs_and_gradients(stage, checkpointed, x, grad), _outputs_and_gradients(stage, stage, x, grad), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_a_model_is_freed_after_a_forward_pass_without_backward():
    import gc
    import weakref

    stage = _stage()
    stage(torch.randn(1, 8, 9, 9)).sum()  # the shared profiles' graph holds P, and the stage holds them
    copy.deepcopy(stage)(torch.randn(1, 8, 9, 9))  # copies and pickles leave that cache behind
    pickle.loads(pickle.dumps(stage))
    position = weakref.ref(stage[0].P)
    del stage
    gc.collect()
    assert position() is None
