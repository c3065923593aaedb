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
Nothing of size ``C x count x kernel^2`` is ever built. The profiles depend on P
and SIG only: layers that share them (a stage, after the rewrite) build them once
per forward pass, and each layer adds two operators forward and six backward.

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
import weakref

import torch
import torch.fx
from torch import Tensor, nn

from .conv import ALGORITHMS, PADDING_MODES, _pair, conv_plan, large_kernel_conv2d, planned_conv2d

VERSIONS = ("gauss", "v1")
SIGMA_FLOOR = 0.27  # DCLS-Gauss adds this to |SIG|: the narrowest Gaussian allowed
SIGMA_INIT = 0.23
POSITION_INIT_STD = 0.5
_NORM_EPS = 1e-7  # in the normaliser, as the reference: an element pushed off the window fades out


def exponent_floor(dtype: torch.dtype) -> float:
    """The lowest exponent whose exp() is a normal number of ``dtype`` (float32 and bfloat16: -87,
    float64: -708); float16, whose exp() underflows long before, takes float32's."""
    return float(math.ceil(math.log(torch.finfo(torch.float32 if dtype == torch.float16 else dtype).tiny)))


class _DclsProfiles(torch.autograd.Function):
    """Every element's two profiles from (P, SIG): ``(2, C_out, C_in/groups, count, size)``, ``[0]``
    along the columns and ``[1]`` along the rows, the row profile divided by the element's
    normaliser. Layers that share P and SIG share these (:class:`Dcls2d` builds them once
    per forward pass); only the weights are a layer's own (:class:`_DclsKernel`)."""

    @staticmethod
    def forward(ctx, P, SIG, kernel_size, backward_done=None):
        ctx.backward_done = backward_done
        kh, kw = kernel_size
        size = max(kh, kw)
        if kh == kw:  # the grid is centred on the window, as P is
            grid = torch.arange(-(kh // 2), size - kh // 2, device=P.device, dtype=P.dtype)
            offset = grid - P.unsqueeze(-1)
        else:  # [0]: columns, [1]: rows, each centred on its own axis
            grid = torch.arange(size, device=P.device, dtype=P.dtype)
            offset = grid - torch.stack((P[0] + kw // 2, P[1] + kh // 2)).unsqueeze(-1)
        if SIG is None:  # bilinear: the "hat" max(0, 1 - |d|)
            inverse_std = None
            profile = (1 - offset.abs()).relu_()
        else:
            inverse_std = (SIG.abs() + SIGMA_FLOOR).reciprocal_()
            offset.mul_(inverse_std.unsqueeze(-1))
            # exp() whose result is a denormal number takes a slow path on CPUs (25x here): the
            # profile is exactly 0 below the floor where the dtype's normal numbers end, and lowered
            # by the floor's exp (1.7e-38 in float32) above it. Above it, every value the reference
            # holds as a normal number is kept, so that an element pushed off the window keeps
            # the reference's tiny values and gradients, as an unclamped training needs.
            floor = exponent_floor(P.dtype)
            profile = offset.square().mul_(-0.5).clamp_(min=floor).exp_().sub_(math.exp(floor))
        if kh != kw:  # the shorter axis's profile ends with its window
            profile[int(kh < kw), ..., min(kh, kw) :] = 0
        # An element's 2-D profile rows x cols sums to rows.sum() * cols.sum() over the window.
        sums = profile.sum(-1)
        inverse_norm = (sums[0] * sums[1]).add_(_NORM_EPS).reciprocal_()
        # not profile[1].mul_(): torch.compile (2.11) loses that in-place update of a saved output
        profile = torch.stack((profile[0], profile[1] * inverse_norm.unsqueeze(-1)))
        ctx.save_for_backward(profile, offset, inverse_std, SIG, sums, inverse_norm)
        return profile

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.backward_done is not None:
            ctx.backward_done[0] = True
        with torch.autocast(grad.device.type, enabled=False):  # as the forward: in the parameters' dtype
            return _DclsProfiles._backward(ctx, grad) + (None,)

    @staticmethod
    def _backward(ctx, grad):
        # profile = (c, r * z) with z = 1 / (sum(c) sum(r) + eps): the gradient of the raw profiles
        # times the raw profiles is h * profile, where h = grad - t * (z sum(r), sum(c)) and
        # t = sum(grad[1] * profile[1]) (each tap reaches z through its axis's sum).
        profile, offset, inverse_std, SIG, sums, inverse_norm = ctx.saved_tensors
        t = (grad[1] * profile[1]).sum(-1, keepdim=True)
        through_sums = sums.flip(0).unsqueeze(-1)
        through_sums[0].mul_(inverse_norm.unsqueeze(-1))
        h = torch.addcmul(grad, through_sums, t, value=-1)
        if SIG is None:  # d/dcentre relu(1 - |grid - centre|) = sign(grid - centre) where positive
            h[1].mul_(inverse_norm.unsqueeze(-1))  # the gradient of the raw profile itself
            grad_centre = (h * offset.sign()).masked_fill_(profile == 0, 0).sum(-1)
            return grad_centre, None, None
        # d profile / d centre = offset * profile / std; d profile / d std = offset^2 * profile / std
        h.mul_(profile).mul_(offset)
        grad_centre = h.sum(-1).mul_(inverse_std)
        grad_sigma = h.mul_(offset).sum(-1).mul_(inverse_std).mul_(SIG.sign())
        return grad_centre, grad_sigma, None


class _DclsKernel(torch.autograd.Function):
    """The cropped dense kernel from a layer's weights and its (shared) profiles:
    ``kernel[h, w] = sum_n weight[n] rows[n, h] cols[n, w]`` for every channel pair, one
    batched matrix product. Two operators forward, five backward: on a GPU each is a
    kernel launch, and on a CPU each a pass over memory."""

    @staticmethod
    def forward(ctx, weight, profiles, rows, cols):
        cout, cin_per_group, count = weight.shape
        pairs = cout * cin_per_group
        row_crop, col_crop = profiles[1, ..., rows], profiles[0, ..., cols]
        scaled_rows = weight.unsqueeze(-1) * row_crop
        kernel = torch.bmm(scaled_rows.view(pairs, count, -1).transpose(1, 2), col_crop.reshape(pairs, count, -1))
        ctx.save_for_backward(weight, profiles, scaled_rows)
        ctx.crops = rows, cols
        return kernel.view(cout, cin_per_group, *kernel.shape[1:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _DclsKernel._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        weight, profiles, scaled_rows = ctx.saved_tensors
        rows, cols = ctx.crops
        cout, cin_per_group, count = weight.shape
        pairs = cout * cin_per_group
        row_crop, col_crop = profiles[1, ..., rows], profiles[0, ..., cols]
        grad = grad.reshape(pairs, *grad.shape[2:])
        # (pairs, count, taps): the gradients of scaled_rows and of col_crop
        grad_scaled_rows = torch.bmm(grad, col_crop.reshape(pairs, count, -1).transpose(1, 2)).transpose(1, 2)
        grad_weight = (grad_scaled_rows * row_crop.reshape(pairs, count, -1)).sum(-1)
        size = profiles.shape[-1]
        whole = rows == cols == slice(0, size)
        grad_profiles = torch.empty_like(profiles) if whole else torch.zeros_like(profiles)
        grad_rows, grad_cols = grad_profiles[1, ..., rows], grad_profiles[0, ..., cols]
        if whole:  # written in place: no copies
            torch.bmm(scaled_rows.view(pairs, count, -1), grad, out=grad_cols.view(pairs, count, -1))
            torch.mul(grad_scaled_rows, weight.view(pairs, count, 1), out=grad_rows.view(pairs, count, -1))
        else:
            grad_cols.copy_(torch.bmm(scaled_rows.view(pairs, count, -1), grad).view_as(grad_cols))
            grad_rows.copy_((grad_scaled_rows * weight.view(pairs, count, 1)).view_as(grad_rows))
        return grad_weight.view_as(weight), grad_profiles, None, None


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


def dcls_profiles(P: Tensor, SIG: Tensor | None, kernel_size: tuple[int, int]) -> Tensor:
    """The elements' interpolation profiles along both axes, ``(2, C_out, C_in/groups, count, size)``:
    what the layers sharing ``P`` and ``SIG`` have in common, to pass to :func:`dcls_kernel` or
    :func:`dcls_conv2d` as ``profiles`` (with autocast off, in the parameters' dtype)."""
    with torch.autocast(P.device.type, enabled=False):
        return _DclsProfiles.apply(P, SIG, tuple(kernel_size), None)


def dcls_kernel(
    weight: Tensor,
    P: Tensor,
    SIG: Tensor | None,
    kernel_size: tuple[int, int],
    rows: slice = slice(None),
    cols: slice = slice(None),
    profiles: Tensor | None = None,
) -> Tensor:
    """The dense kernel (C_out, C_in/groups, kh, kw) of a DCLS layer, or only its ``rows`` and ``cols``.

    ``SIG=None`` selects the bilinear (``v1``) profile. Computed in the
    parameters' dtype with autocast off: a kernel built in bf16 would lose its
    sub-pixel positions. ``profiles`` (:func:`dcls_profiles` of ``P`` and ``SIG``) are
    built here when not given.
    """
    kh, kw = kernel_size
    rows, cols = _span(rows, kh), _span(cols, kw)
    if profiles is None:
        profiles = dcls_profiles(P, SIG, (kh, kw))
    with torch.autocast(weight.device.type, enabled=False):
        return _DclsKernel.apply(weight, profiles, rows, cols)


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
    profiles: Tensor | None = None,
) -> Tensor:
    """A DCLS convolution: the kernel, built only where it can reach the input, then convolved."""
    input, plan = conv_plan(input, kernel_size, stride, padding, padding_mode)
    kernel = dcls_kernel(weight, P, SIG, kernel_size, plan.rows, plan.cols, profiles)
    return planned_conv2d(input, kernel, bias, plan, groups, algorithm)


class _SharedProfiles:
    """One P/SIG group's profiles, built by the first of its layers to run in a forward pass
    and reused by the others (the rewrite shares P and SIG among a stage's layers), so that
    their construction, forward and backward, runs once per group instead of once per layer.
    A layer that asks again starts a new pass. The layers that used it hold it: it lives as
    long as they do, and the registry below only finds it."""

    __slots__ = ("P", "SIG", "key", "profiles", "users", "backward_done", "__weakref__")

    def __init__(self, P: Tensor, SIG: Tensor | None, key: tuple, kernel_size: tuple[int, int]) -> None:
        self.P, self.SIG, self.key, self.users = P, SIG, key, set()
        self.backward_done = [False]  # set by the profiles' backward: their graph is used up
        with torch.autocast(P.device.type, enabled=False):
            self.profiles = _DclsProfiles.apply(P, SIG, kernel_size, self.backward_done)

    def usable_by(self, layer: Dcls2d, key: tuple) -> bool:
        return (
            self.P is layer.P
            and self.SIG is layer.SIG
            and self.key == key
            and not self.backward_done[0]
            and id(layer) not in self.users
        )


_shared_profiles: weakref.WeakValueDictionary[tuple[int, int], _SharedProfiles] = weakref.WeakValueDictionary()


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
        if kh == kw:  # one operator, not two
            self.P.clamp_(-(kw // 2), kw // 2)
        else:
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
            profiles=self._shared_profiles(input),
        )

    def _shared_profiles(self, input: Tensor) -> Tensor | None:
        """The profiles of this layer's P and SIG, shared with the other layers that have them in
        this forward pass (:class:`_SharedProfiles`), or None to build them in the call: while
        tracing or compiling, and under saved-tensor hooks (activation checkpointing recomputes a
        layer alone, and it must build what it built the first time)."""
        if (
            isinstance(input, torch.fx.Proxy)
            or torch.compiler.is_compiling()
            or torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
        ):
            return None
        P, SIG = self.P, self.SIG
        # versions see in-place updates (optimisers, clamps, load_state_dict); the storage sees
        # `P.data = ...`. An in-place write through `.data` bumps neither: the next pass rebuilds.
        key = (
            P._version,
            P.data_ptr(),
            None if SIG is None else (SIG._version, SIG.data_ptr()),
            self.dilated_kernel_size,
            torch.is_grad_enabled() and (P.requires_grad or (SIG is not None and SIG.requires_grad)),
            torch.is_inference_mode_enabled(),
        )
        shared = _shared_profiles.get((id(P), id(SIG)))
        if shared is None or not shared.usable_by(self, key):
            shared = _SharedProfiles(P, SIG, key, self.dilated_kernel_size)
            _shared_profiles[id(P), id(SIG)] = shared
        shared.users.add(id(self))
        self.__dict__["_profiles_in_use"] = shared  # keeps them alive for the group's other layers
        return shared.profiles

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_profiles_in_use", None)  # a cache of one forward pass, with its autograd graph
        return state

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


def plain_conv2d(layer: Dcls2d | LargeKernelConv2d, **factory) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` of the shape ``layer`` computes (a Dcls2d's window as its kernel),
    freshly initialised; ``factory``: ``device``, ``dtype``."""
    kernel_size = layer.dilated_kernel_size if isinstance(layer, Dcls2d) else layer.kernel_size
    return nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        **factory,
    )


def bake(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`Dcls2d` baked (:meth:`Dcls2d.bake`): the same
    outputs, without rebuilding kernels on every call, for inference and export."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Dcls2d):
            model.set_submodule(name, module.bake())
    return model
