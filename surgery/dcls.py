"""Dilated Convolution with Learnable Spacings (DCLS) for 2-D inputs.

Each output/input channel pair of a :class:`Dcls2d` owns ``kernel_count``
elements: a weight ``W``, a position ``P`` (kernel units, centred at 0) and, for
the Gaussian version, a spread ``SIG``. The dense ``kernel x kernel`` kernel is
the sum of the elements, each spread over the window by an interpolation
profile normalised to sum 1:

``gauss``
    a Gaussian of standard deviation ``|SIG| + 0.27`` (DCLS-Gauss);
``v1``
    bilinear interpolation (the "hat" function ``max(0, 1 - |d|)``).

Both profiles are separable: an element is the outer product of a row profile
and a column profile, its normaliser the product of their sums, and the kernel a
sum of ``count`` outer products per channel pair: one batched matrix product.
Nothing of size ``C x count x kernel^2`` is ever built.

Axis convention (as the reference ``DCLS`` package): ``P[0]`` and ``SIG[0]`` run
along the kernel's width (last) axis, ``P[1]`` and ``SIG[1]`` along its height. For a
non-square window the reference centres and clamps ``P[0]`` by the *height*; here each
axis uses its own size, so non-square layers differ from it on purpose.

Gradients are first-order only (the kernel construction and the FFT have hand-written backwards):
double backward, e.g. a gradient penalty, is not supported.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx
from torch import Tensor, nn

from .conv import ALGORITHMS, PADDING_MODES, _pair, conv_plan, large_kernel_conv2d, planned_conv2d

VERSIONS = ("gauss", "v1")
SIGMA_FLOOR = 0.27  # DCLS-Gauss adds this to |SIG|: the narrowest Gaussian allowed
SIGMA_INIT = 0.23
POSITION_INIT_STD = 0.5
_NORM_EPS = 1e-7  # in the normaliser, as the reference: an element pushed off the window fades out
EXPONENT_FLOOR = -40.0


def _profiles(centre: Tensor, sigma: Tensor | None, size: int) -> tuple[Tensor, Tensor]:
    """Every element's unnormalised profile along one axis, (..., size), and the offsets
    that its backward needs: ``(grid - centre) / std`` (Gaussian) or ``grid - centre`` (bilinear)."""
    grid = torch.arange(size, device=centre.device, dtype=centre.dtype)
    if sigma is None:  # bilinear
        offset = grid - centre.unsqueeze(-1)
        return (1 - offset.abs()).relu_(), offset
    inverse_std = (sigma.abs() + SIGMA_FLOOR).reciprocal_().unsqueeze(-1)
    scaled = torch.addcmul(-centre.unsqueeze(-1) * inverse_std, grid, inverse_std)
    exponent = torch.addcmul(scaled.new_zeros(()), scaled, scaled, value=-0.5)
    # exp() of very negative numbers, and products of its results, pass through denormals,
    # 40x slower on CPUs: the profile is lowered by e^-40 and is exactly 0 below it (the
    # reference's 1e-7 in the normaliser already makes such elements vanish).
    return exponent.clamp_(min=EXPONENT_FLOOR).exp_().sub_(math.exp(EXPONENT_FLOOR)), scaled


def _profiles_backward(grad: Tensor, profile: Tensor, offset: Tensor, sigma: Tensor | None):
    """Gradients of the centres and sigmas from the gradient of the profiles."""
    if sigma is None:  # d/dcentre relu(1 - |grid - centre|) = sign(grid - centre) where positive
        return (grad * offset.sign()).masked_fill_(profile == 0, 0).sum(-1), None
    # d profile / d centre = scaled * profile / std; d profile / d std = scaled^2 * profile / std
    inverse_std = (sigma.abs() + SIGMA_FLOOR).reciprocal_()
    grad_scaled = grad.mul_(profile).mul_(offset)
    grad_centre = grad_scaled.sum(-1) * inverse_std
    return grad_centre, grad_scaled.mul_(offset).sum(-1) * inverse_std * sigma.sign()


class _DclsKernel(torch.autograd.Function):
    """The cropped dense kernel from (weight, P, SIG), with one hand-written backward: on a
    GPU each autograd node is a kernel launch, and on a CPU each a pass over memory."""

    @staticmethod
    def forward(ctx, weight, P, SIG, kernel_size, rows, cols):
        kh, kw = kernel_size
        cout, cin_per_group, count = weight.shape
        pairs = cout * cin_per_group
        # both axes at once ([0]: columns, [1]: rows), over the larger window
        centre = P + kh // 2 if kh == kw else torch.stack((P[0] + kw // 2, P[1] + kh // 2))
        profile, offset = _profiles(centre, SIG, max(kh, kw))
        if kh != kw:  # the shorter axis's profile ends with its window
            profile[int(kh < kw), ..., min(kh, kw) :] = 0
        # An element's 2-D profile rows x cols sums to rows.sum() * cols.sum() over the window.
        sums = profile.sum(-1)
        normaliser = sums[0] * sums[1] + _NORM_EPS
        scale = weight / normaliser
        col_crop, row_crop = profile[0, ..., cols], profile[1, ..., rows]
        scaled_rows = (scale.unsqueeze(-1) * row_crop).reshape(pairs, count, -1)
        # kernel[h, w] = sum_n scale[n] rows[n, h] cols[n, w] for every channel pair
        kernel = torch.bmm(scaled_rows.transpose(1, 2), col_crop.reshape(pairs, count, -1))
        ctx.save_for_backward(profile, offset, SIG, sums, normaliser, scale)
        ctx.crops = rows, cols
        return kernel.view(cout, cin_per_group, *kernel.shape[1:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # as the forward: in the parameters' dtype
            return _DclsKernel._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        profile, offset, SIG, sums, normaliser, scale = ctx.saved_tensors
        rows, cols = ctx.crops
        cout, cin_per_group, count = scale.shape
        pairs = cout * cin_per_group
        col_crop, row_crop = profile[0, ..., cols], profile[1, ..., rows]
        grad = grad.reshape(pairs, *grad.shape[2:])
        scaled_rows = (scale.unsqueeze(-1) * row_crop).reshape(pairs, count, -1)
        grad_scaled_rows = torch.bmm(grad, col_crop.reshape(pairs, count, -1).transpose(1, 2))
        grad_col_crop = torch.bmm(scaled_rows, grad).view_as(col_crop)
        grad_scaled_rows = grad_scaled_rows.transpose(1, 2).reshape(row_crop.shape)
        grad_scale = (grad_scaled_rows * row_crop).sum(-1)
        grad_normaliser = -grad_scale * scale / normaliser
        # each profile tap reaches the loss through its axis's sum and, inside the crop, the kernel
        grad_sums = torch.stack((grad_normaliser * sums[1], grad_normaliser * sums[0]))
        grad_profile = grad_sums.unsqueeze(-1).expand_as(profile).contiguous()
        grad_profile[0, ..., cols] += grad_col_crop
        grad_profile[1, ..., rows] += grad_scaled_rows.mul_(scale.unsqueeze(-1))
        grad_centre, grad_sigma = _profiles_backward(grad_profile, profile, offset, SIG)
        return grad_scale / normaliser, grad_centre, grad_sigma, None, None, None


def _span(taps: slice, size: int) -> slice:
    """``taps`` as slice(start, stop) within range(size), as indexing would read it
    (``slice.indices`` is not traceable by torch.compile)."""
    if taps.step not in (None, 1):
        raise ValueError(f"rows and cols must be contiguous slices, got {taps}")

    def bound(index: int | None, default: int) -> int:
        if index is None:
            return default
        return min(max(index + size if index < 0 else index, 0), size)

    start = bound(taps.start, 0)
    return slice(start, max(start, bound(taps.stop, size)))


def dcls_kernel(
    weight: Tensor,
    P: Tensor,
    SIG: Tensor | None,
    kernel_size: tuple[int, int],
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> Tensor:
    """The dense kernel (C_out, C_in/groups, kh, kw) of a DCLS layer, or only its ``rows`` and ``cols``.

    ``SIG=None`` selects the bilinear (``v1``) profile. Computed in the
    parameters' dtype with autocast off: a kernel built in bf16 would lose its
    sub-pixel positions.
    """
    kh, kw = kernel_size
    rows, cols = _span(rows, kh), _span(cols, kw)
    with torch.autocast(weight.device.type, enabled=False):
        return _DclsKernel.apply(weight, P, SIG, (kh, kw), rows, cols)


def dcls_conv2d(
    input: Tensor,
    weight: Tensor,
    P: Tensor,
    SIG: Tensor | None,
    bias: Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
    padding_mode: str = "zeros",
    algorithm: str = "auto",
) -> Tensor:
    """A DCLS convolution: the kernel, built only where it can reach the input, then convolved."""
    input, plan = conv_plan(input, kernel_size, stride, padding, padding_mode)
    kernel = dcls_kernel(weight, P, SIG, kernel_size, plan.rows, plan.cols)
    return planned_conv2d(input, kernel, bias, plan, groups, algorithm)


# Under plain torch.fx.symbolic_trace these stay single call_function nodes: their
# shape-dependent control flow and autocast contexts cannot be traced.
torch.fx.wrap("dcls_conv2d")
torch.fx.wrap("large_kernel_conv2d")


def _check(name: str, ok: bool, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _positive_pair(name: str, value) -> tuple[int, int]:
    pair = _pair(value)
    _check(name, len(pair) == 2 and all(isinstance(v, int) and v >= 1 for v in pair), "a positive int or pair", value)
    return pair


class Dcls2d(nn.Module):
    """2-D convolution whose kernel elements learn where they sit.

    A drop-in for ``DCLS.construct.modules.Dcls2d`` (same arguments, parameter
    names and shapes, initialisation and, for square windows, outputs), with a fast
    kernel construction and a measured choice of convolution algorithm. It has no
    ``use_implicit_gemm`` (the algorithm choice replaces it) and no ``v0``/``max``.

    Args:
        in_channels, out_channels, stride, padding, groups, bias, padding_mode:
            as in ``nn.Conv2d``.
        kernel_count: elements per (output, input) channel pair.
        dilated_kernel_size: size of the window the elements move in
            (int or (height, width)).
        version: ``"gauss"`` (DCLS-Gauss) or ``"v1"`` (bilinear).
        algorithm: convolution algorithm, one of :data:`~dclsify.surgery.conv.ALGORITHMS`;
            ``"auto"`` measures once per shape and caches the fastest.

    Positions are not clamped in ``forward`` (as the reference); call
    :meth:`clamp_parameters` after each optimiser step to keep them in the window.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_count: int,
        stride=1,
        padding=0,
        dilated_kernel_size=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        version: str = "gauss",
        algorithm: str = "auto",
    ) -> None:
        super().__init__()
        kernel_size = _positive_pair("dilated_kernel_size", dilated_kernel_size)
        stride = _positive_pair("stride", stride)
        padding = _pair(padding)
        _check(
            "padding",
            len(padding) == 2 and all(isinstance(p, int) and p >= 0 for p in padding),
            "a non-negative int or pair",
            padding,
        )
        _check("groups", isinstance(groups, int) and groups >= 1, "a positive int", groups)
        for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
            _check(
                name,
                isinstance(channels, int) and channels >= 1 and channels % groups == 0,
                f"a positive multiple of groups={groups}",
                channels,
            )
        most = kernel_size[0] * kernel_size[1]
        _check(
            "kernel_count",
            isinstance(kernel_count, int) and 1 <= kernel_count <= most,
            f"an int from 1 to {most} (dilated_kernel_size {kernel_size[0]}x{kernel_size[1]})",
            kernel_count,
        )
        _check("version", version in VERSIONS, f"one of {VERSIONS}", version)
        _check("algorithm", algorithm in ALGORITHMS, f"one of {ALGORITHMS}", algorithm)
        _check("padding_mode", padding_mode in PADDING_MODES, f"one of {PADDING_MODES}", padding_mode)

        self.in_channels, self.out_channels, self.kernel_count = in_channels, out_channels, kernel_count
        self.stride, self.padding, self.dilated_kernel_size = stride, padding, kernel_size
        self.groups, self.padding_mode, self.version, self.algorithm = groups, padding_mode, version, algorithm
        pairs = (out_channels, in_channels // groups, kernel_count)
        self.weight = nn.Parameter(torch.empty(pairs))
        self.P = nn.Parameter(torch.empty(2, *pairs))
        self.SIG = nn.Parameter(torch.empty(2, *pairs)) if version == "gauss" else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: weight and bias as ``nn.Conv2d`` would for a
        ``kernel_count``-tap kernel, positions ~ N(0, 0.5) clamped to the window,
        SIG = 0.23."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1] * self.weight.shape[2])
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            for axis in self.P:  # one draw per axis, as the reference: same seed, same layer
                nn.init.normal_(axis, 0.0, POSITION_INIT_STD)
            self.clamp_parameters()
            if self.SIG is not None:
                self.SIG.fill_(SIGMA_INIT)

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Clamp positions to the window: ``P[0]`` to +-width//2, ``P[1]`` to +-height//2."""
        kh, kw = self.dilated_kernel_size
        self.P[0].clamp_(-(kw // 2), kw // 2)
        self.P[1].clamp_(-(kh // 2), kh // 2)

    def kernel(self) -> Tensor:
        """The dense kernel, (out_channels, in_channels/groups, kh, kw)."""
        return dcls_kernel(self.weight, self.P, self.SIG, self.dilated_kernel_size)

    def forward(self, input: Tensor) -> Tensor:
        return dcls_conv2d(
            input,
            self.weight,
            self.P,
            self.SIG,
            self.bias,
            self.dilated_kernel_size,
            self.stride,
            self.padding,
            self.groups,
            self.padding_mode,
            self.algorithm,
        )

    @torch.no_grad()
    def bake(self) -> LargeKernelConv2d:
        """A plain convolution holding the constructed kernel, for inference and export.

        The result is an ``nn.Conv2d`` (with the same ``weight``/``bias`` names) that
        keeps this layer's fast algorithm choice and gives identical outputs.
        """
        kh, kw = self.dilated_kernel_size
        conv = LargeKernelConv2d(
            self.in_channels,
            self.out_channels,
            (kh, kw),
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            algorithm=self.algorithm,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.kernel())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        kh, kw = self.dilated_kernel_size
        s = f"{self.in_channels}, {self.out_channels}, kernel_count={self.kernel_count}"
        s += f", dilated_kernel_size=({kh}, {kw}), stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", version={self.version}, algorithm={self.algorithm}"


class LargeKernelConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by :func:`large_kernel_conv2d` (what :meth:`Dcls2d.bake` returns).

    Its state dict is an ``nn.Conv2d``'s, so it loads into a plain ``nn.Conv2d``
    for export; ``algorithm="direct"`` makes it compute exactly as one.
    """

    def __init__(self, *args, algorithm: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check("algorithm", algorithm in ALGORITHMS, f"one of {ALGORITHMS}", algorithm)
        _check("dilation", self.dilation == (1, 1), "1", self.dilation)
        _check("padding", not isinstance(self.padding, str), "an int or pair", self.padding)
        self.algorithm = algorithm

    def forward(self, input: Tensor) -> Tensor:
        return large_kernel_conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.groups, self.padding_mode, self.algorithm
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algorithm={self.algorithm}"


def bake(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`Dcls2d` baked (:meth:`Dcls2d.bake`): the same
    outputs, without rebuilding kernels on every call, for inference and export."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Dcls2d):
            model.set_submodule(name, module.bake())
    return model
