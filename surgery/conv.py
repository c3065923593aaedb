"""Large-kernel 2-D convolution with a measured choice of algorithm.

A 23x23 depthwise convolution is slow through a dense ``F.conv2d`` on most
devices, and which alternative wins depends on the shape, the dtype and the
device (NOTES.md section 4). :func:`large_kernel_conv2d` computes exactly what
``F.conv2d`` computes, through one of :data:`ALGORITHMS`:

``direct``
    ``F.conv2d``.
``channels_last``
    ``F.conv2d`` on channels-last tensors (a different kernel on CPU and CUDA).
``fft``
    Correlation through ``rfft2`` at a fast transform size, in float32.
``toeplitz``
    For small maps and one input channel per group: each output channel is a
    (Ho*Wo x H*W) matrix, gathered from the kernel, times the flattened input.
``triton``
    For one input channel per group: a direct depthwise kernel in Triton
    (:mod:`dclsify.surgery.triton_depthwise`), on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1``. Asked for by name only: ``auto`` does not pick it
    before it has been measured on a GPU.

Every algorithm first crops the kernel to the rows and columns that can overlap
the input (a 23x23 kernel on an 8x7 map only ever uses 15x13 of its taps), and
pads the input to match, which is exact and never slower.

``algorithm="auto"`` times the algorithms that apply, once per (shape, dtype,
device, grad mode), on the real inputs, and caches the fastest; under
``torch.compile`` it uses the cached choice or, without one, a cost estimate.
Under ``torch.use_deterministic_algorithms(True)`` it takes the cost estimate's
choice and times nothing: the algorithms agree only to rounding (about 1e-6 in
float32), and timings differ from process to process, so a timed choice would make
two runs of the same computation differ in their last bits.
Timing synchronises the device and runs extra work, which a CUDA graph cannot
capture: warm up each kind of step to capture (training, evaluation) once first.
After that a step reads only its cached choices, and nothing in it makes the host
wait for the device (tests/test_opcount.py).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton comes with torch's Linux wheels only
    from . import triton_depthwise
except ImportError as error:
    triton_depthwise, _TRITON_MISSING = None, f"Triton cannot be imported ({error})"

ALGORITHMS = ("auto", "direct", "channels_last", "fft", "toeplitz", "triton")
# Never chosen by ``auto``: the Triton kernel's speed has not yet been measured on a GPU
NOT_CHOSEN_BY_AUTO = ("triton",)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# Largest Toeplitz matrix (elements) worth building: beyond this the gathered
# matrices cost more memory than any speed they could buy.
TOEPLITZ_MAX_ELEMENTS = 2**26


class ChoiceKey(NamedTuple):
    """What an ``auto`` choice depends on (the kernel shape is after cropping)."""

    input_shape: torch.Size
    input_layout: str  # "contiguous", "channels_last" or "strided": each favours other algorithms
    kernel_shape: torch.Size
    pad: tuple[int, int, int, int]
    stride: tuple[int, int]
    groups: int
    input_dtype: torch.dtype
    kernel_dtype: torch.dtype
    device: str
    output_dtype: torch.dtype
    backward: bool
    deterministic: bool = False  # torch.use_deterministic_algorithms: chosen by estimate, not timed


_choices: dict[ChoiceKey, str] = {}


def chosen_algorithms() -> dict[ChoiceKey, str]:
    """The algorithm ``auto`` picked for each (shape, dtype, device, grad) key."""
    return dict(_choices)


def clear_chosen_algorithms() -> None:
    """Forget every measured choice, so that the next call measures again."""
    _choices.clear()


@dataclass(frozen=True)
class _Plan:
    """A valid correlation: pad the input by ``pad``, then slide the cropped kernel."""

    rows: slice  # kernel rows that can touch the input
    cols: slice
    pad: tuple[int, int, int, int]  # F.pad order: left, right, top, bottom
    out_size: tuple[int, int]
    stride: tuple[int, int]


def _crop(size: int, k: int, stride: int, pad: int) -> tuple[slice, int, int, int]:
    """Kernel taps along one axis that overlap the input, and the padding that keeps the output size."""
    if size + 2 * pad < k:
        raise ValueError(f"the padded input ({size + 2 * pad}) is smaller than the kernel ({k}), as in F.conv2d")
    out = (size + 2 * pad - k) // stride + 1
    first = max(0, pad - (out - 1) * stride)
    last = min(k - 1, pad + size - 1)
    if first > last:  # the kernel never meets the input: keep it whole
        first, last = 0, k - 1
    before = pad - first
    after = (out - 1) * stride + (last - first + 1) - size - before
    return slice(first, last + 1), before, after, out


def _plan(in_size, kernel_size, stride, padding) -> _Plan:
    rows, top, bottom, out_h = _crop(in_size[0], kernel_size[0], stride[0], padding[0])
    cols, left, right, out_w = _crop(in_size[1], kernel_size[1], stride[1], padding[1])
    return _Plan(rows, cols, (left, right, top, bottom), (out_h, out_w), tuple(stride))


def _fast_len(n: int) -> int:
    """Smallest even m >= n whose prime factors are all 2, 3, 5 or 7: sizes that FFT
    libraries transform fastest (odd sizes cost a real FFT up to 20% more)."""
    m = n + n % 2
    while True:
        rest = m
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 2


# --- the algorithms: each takes the input, the cropped kernel and the plan ---


def _direct(x: Tensor, w: Tensor, plan: _Plan, groups: int, bias: Tensor | None = None) -> Tensor:
    return F.conv2d(F.pad(x, plan.pad), w, bias, plan.stride, 0, 1, groups)


def _channels_last(x: Tensor, w: Tensor, plan: _Plan, groups: int, bias: Tensor | None = None) -> Tensor:
    x = F.pad(x, plan.pad).contiguous(memory_format=torch.channels_last)
    w = w.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, w, bias, plan.stride, 0, 1, groups)


def _product(x: Tensor, w: Tensor, groups: int) -> Tensor:
    """Y[b, o] = sum_i X[b, group(o), i] * W[o, i], over frequencies: (B, Cout, *F)."""
    batch, cout, cin_per_group = x.shape[0], w.shape[0], w.shape[1]
    if cin_per_group == 1:  # depthwise, possibly with a channel multiplier
        return (x.unsqueeze(2) * w.view(x.shape[1], cout // x.shape[1], *w.shape[2:])).flatten(1, 2)
    freq = x.shape[2:]
    x = x.reshape(batch, groups, cin_per_group, -1)
    w = w.reshape(groups, cout // groups, cin_per_group, -1)
    return torch.einsum("bgif,goif->bgof", x, w).reshape(batch, cout, *freq)


def _product_grad_input(grad: Tensor, w: Tensor, groups: int) -> Tensor:
    """Adjoint of :func:`_product` in its input: X[b, c] = sum_{o in group(c)} G[b, o] * W[o, i(c)]."""
    batch, cout, cin_per_group = grad.shape[0], w.shape[0], w.shape[1]
    freq = grad.shape[2:]
    if cin_per_group == 1:
        grad = grad * w[:, 0]
        return grad if cout == groups else grad.view(batch, groups, cout // groups, *freq).sum(2)
    grad = grad.reshape(batch, groups, cout // groups, -1)
    w = w.reshape(groups, cout // groups, cin_per_group, -1)
    return torch.einsum("bgof,goif->bgif", grad, w).reshape(batch, groups * cin_per_group, *freq)


def _product_grad_weight(grad: Tensor, x: Tensor, groups: int, cin_per_group: int) -> Tensor:
    """Adjoint of :func:`_product` in its weight: W[o, i] = sum_b G[b, o] * X[b, group(o), i]."""
    batch, cout = grad.shape[:2]
    freq = grad.shape[2:]
    if cin_per_group == 1:
        x = x.repeat_interleave(cout // x.shape[1], dim=1) if cout != x.shape[1] else x
        return (grad * x).sum(0).unsqueeze(1)
    grad = grad.reshape(batch, groups, cout // groups, -1)
    x = x.reshape(batch, groups, cin_per_group, -1)
    return torch.einsum("bgof,bgif->goif", grad, x).reshape(cout, cin_per_group, *freq)


def _fft_size(plan: _Plan, in_size, kernel_size) -> tuple[int, int]:
    """Transform size for :class:`_FFTCorrelation`: the input plus its larger padding.

    The input sits after its leading padding in a zero buffer, and output y reads it from
    y*s onwards, wrapping around: the input must fit (size >= before + in) and what the tail
    wraps onto must be the leading zeros (size >= in + after). Both paddings are never needed
    at once, which makes transforms a third smaller than padding on both sides.
    """
    left, right, top, bottom = plan.pad
    return tuple(
        _fast_len(max(size + max(before, after), k, (out - 1) * s + 1))
        for size, before, after, k, out, s in zip(
            in_size, (top, left), (bottom, right), kernel_size, plan.out_size, plan.stride, strict=True
        )
    )


class _FFTCorrelation(torch.autograd.Function):
    """Cross-correlation through rfft2, with a backward made of rfft2/irfft2 only
    (autograd's would run full complex transforms, at twice the cost).

    Correlation theorem: circular corr(x, w) = irfft(X * conj(W)). The input sits at its
    leading padding in a zero buffer of :func:`_fft_size` and the kernel at the origin, so
    that output (y, x) is the circular correlation at (y*s, x*s), wrapping onto zeros only.
    The gradients are the adjoints of the same circular maps (a convolution with w for the
    input, a correlation with the input for w). Every pad is one copy, done by the transform
    itself where it can: no rolls, no scatters.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, plan: _Plan, groups: int) -> Tensor:
        height, width = x.shape[-2:]
        size = _fft_size(plan, (height, width), w.shape[-2:])
        top, left = plan.pad[2], plan.pad[0]
        xf = torch.fft.rfft2(F.pad(x, (left, size[1] - width - left, top, size[0] - height - top)))
        wf = torch.fft.rfft2(w, s=size)
        circular = torch.fft.irfft2(_product(xf, wf.conj(), groups), s=size)
        valid = (
            ...,
            slice(0, plan.out_size[0] * plan.stride[0], plan.stride[0]),
            slice(0, plan.out_size[1] * plan.stride[1], plan.stride[1]),
        )
        ctx.save_for_backward(xf, wf)
        ctx.valid, ctx.size, ctx.groups, ctx.stride = valid, size, groups, plan.stride
        ctx.input_box = (..., slice(top, top + height), slice(left, left + width))
        ctx.kernel_shape = w.shape
        return circular[valid]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        xf, wf = ctx.saved_tensors
        if ctx.stride == (1, 1):  # the outputs are the buffer's first rows and columns
            gf = torch.fft.rfft2(grad, s=ctx.size)
        else:
            full = grad.new_zeros(*grad.shape[:2], *ctx.size)
            full[ctx.valid] = grad
            gf = torch.fft.rfft2(full)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfft2(_product_grad_input(gf, wf, ctx.groups), s=ctx.size)[ctx.input_box]
        if ctx.needs_input_grad[1]:
            cout, cin_per_group, kh, kw = ctx.kernel_shape
            product = _product_grad_weight(gf.conj(), xf, ctx.groups, cin_per_group)
            grad_w = torch.fft.irfft2(product, s=ctx.size)[..., :kh, :kw]
        return grad_x, grad_w, None, None


def _fft(x: Tensor, w: Tensor, plan: _Plan, groups: int, bias: Tensor | None = None) -> Tensor:
    out_dtype = _output_dtype(x, w)
    real = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        # contiguous: a channels-last input (timm blocks often produce one) would make
        # every transform stride across the channels, several times slower
        x = x.to(real, memory_format=torch.contiguous_format)
        y = _FFTCorrelation.apply(x, w.to(real), plan, groups)
        if bias is not None:  # before the cast to out_dtype: no cast of the bias, nor of its gradient
            y = y + bias.to(real).view(-1, 1, 1)
    return y.to(out_dtype)


@functools.lru_cache(maxsize=64)
def _toeplitz_index(out_size, stride, pad, in_size, kernel_size, device) -> Tensor:
    """For each (output, input) pixel pair, the flat kernel tap linking them, or the zero slot.
    Cached: it depends on shapes only, and building it is a dozen operators per call."""
    with torch.inference_mode(False):  # an inference tensor could not be saved for a later backward
        return _build_toeplitz_index(out_size, stride, pad, in_size, kernel_size, device)


def _build_toeplitz_index(out_size, stride, pad, in_size, kernel_size, device) -> Tensor:
    (out_h, out_w), (kh, kw) = out_size, kernel_size
    left, top = pad[0], pad[2]
    oy = torch.arange(out_h, device=device) * stride[0] - top
    ox = torch.arange(out_w, device=device) * stride[1] - left
    dy = torch.arange(in_size[0], device=device)[None, :] - oy[:, None]  # (Ho, H)
    dx = torch.arange(in_size[1], device=device)[None, :] - ox[:, None]  # (Wo, W)
    inside = ((dy >= 0) & (dy < kh))[:, None, :, None] & ((dx >= 0) & (dx < kw))[None, :, None, :]
    flat = dy[:, None, :, None] * kw + dx[None, :, None, :]
    return torch.where(inside, flat, kh * kw).reshape(out_h * out_w, -1)


def _toeplitz(x: Tensor, w: Tensor, plan: _Plan, groups: int, bias: Tensor | None = None) -> Tensor:
    batch, cin, height, width = x.shape
    cout, kh, kw = w.shape[0], w.shape[-2], w.shape[-1]
    index = _toeplitz_index(plan.out_size, plan.stride, plan.pad, (height, width), (kh, kw), x.device)
    taps = F.pad(w.reshape(cout, kh * kw), (0, 1))  # the zero slot
    # gather, not indexing: its backward is a scatter-add, many times faster than index_put
    matrices = taps.gather(1, index.view(1, -1).expand(cout, -1))  # (Cout, Ho*Wo * H*W)
    # y[b, o] = matrices[o] @ x[b, c] for every output channel o of input channel c, the
    # batch as the matrices' columns: the outputs of one input are stacked rows of one product
    columns = x.reshape(batch, cin, height * width).permute(1, 2, 0)  # (Cin, H*W, B)
    y = torch.bmm(matrices.view(cin, -1, height * width), columns)  # (Cin, Cout/Cin * Ho*Wo, B)
    y = y.view(cout, -1, batch).permute(2, 0, 1).reshape(batch, cout, *plan.out_size)
    return y if bias is None else y + bias.to(y.dtype).view(-1, 1, 1)


def triton_refusal(device: torch.device | str) -> str | None:
    """Why ``algorithm="triton"`` cannot run on ``device``, or None when it can."""
    device = torch.device(device)
    if triton_depthwise is None:
        return _TRITON_MISSING
    if device.type == "cuda" or (device.type == "cpu" and triton_depthwise.INTERPRETED):
        return None
    return (
        "it runs on CUDA tensors, or on the CPU when TRITON_INTERPRET=1 is set before dclsify is imported;"
        f" not on {device.type}"
    )


def check_algorithm(algorithm: str, device: torch.device | str) -> None:
    """Raise ValueError for an unknown algorithm, or for ``triton`` where it cannot run."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if algorithm == "triton" and (refusal := triton_refusal(device)) is not None:
        raise ValueError(f"algorithm 'triton' cannot run here: {refusal}")


def _triton(x: Tensor, w: Tensor, plan: _Plan, groups: int, bias: Tensor | None = None) -> Tensor:
    top, left = plan.pad[2], plan.pad[0]
    y = triton_depthwise.depthwise_correlation(x, w, top, left, plan.stride, plan.out_size, _output_dtype(x, w))
    return y if bias is None else y + bias.to(y.dtype).view(-1, 1, 1)


_KERNELS = {"direct": _direct, "channels_last": _channels_last, "fft": _fft, "toeplitz": _toeplitz, "triton": _triton}


def _output_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    """What F.conv2d would return: autocast's dtype, except that autocast leaves float64 alone."""
    promoted = torch.promote_types(x.dtype, w.dtype)
    if torch.is_autocast_enabled(x.device.type) and promoted != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return promoted


def _refusal(name: str, x: Tensor, w: Tensor, plan: _Plan) -> str | None:
    """Why algorithm ``name`` cannot compute this convolution, or None."""
    cout, cin_per_group = w.shape[:2]
    if name in ("toeplitz", "triton") and cin_per_group != 1:
        return "it needs one input channel per group"
    matrix_elements = cout * plan.out_size[0] * plan.out_size[1] * x.shape[-2] * x.shape[-1]
    if name == "toeplitz" and matrix_elements > TOEPLITZ_MAX_ELEMENTS:
        return f"its matrices would hold more than {TOEPLITZ_MAX_ELEMENTS} elements"
    if name == "triton":
        return triton_refusal(x.device)
    return None


def _applicable(x: Tensor, w: Tensor, plan: _Plan) -> list[str]:
    return [name for name in _KERNELS if _refusal(name, x, w, plan) is None]


def _estimated_cost(name: str, x: Tensor, w: Tensor, plan: _Plan) -> float:
    """Rough relative cost, used to order and prune measurements and under torch.compile."""
    batch, cin, height, width = x.shape
    cout, cin_per_group, kh, kw = w.shape
    out_pixels = plan.out_size[0] * plan.out_size[1]
    if name in ("direct", "channels_last", "triton"):
        return batch * cout * cin_per_group * out_pixels * kh * kw
    if name == "fft":
        size = _fft_size(plan, (height, width), (kh, kw))
        n = size[0] * size[1]
        transforms = (2 * batch * (cin + cout) + cout * cin_per_group) * n * math.log2(n)
        return 4 * transforms + 8 * batch * cout * cin_per_group * n
    return 2 * cout * out_pixels * height * width * (batch + 1)  # toeplitz


def _measure(name: str, x: Tensor, w: Tensor, plan: _Plan, groups: int, backward: bool) -> float:
    x = x.detach().requires_grad_(backward)
    w = w.detach().requires_grad_(backward)
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    try:
        y = _KERNELS[name](x, w, plan, groups)
        if backward:
            y.backward(torch.ones_like(y))
    except torch.OutOfMemoryError:  # this algorithm does not fit here: never choose it
        return math.inf
    sync()
    return time.perf_counter() - start


def _layout(x: Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def _choose(x: Tensor, w: Tensor, plan: _Plan, groups: int) -> str:
    backward = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    key = ChoiceKey(
        x.shape,
        _layout(x),
        w.shape,
        plan.pad,
        plan.stride,
        groups,
        x.dtype,
        w.dtype,
        str(x.device),
        _output_dtype(x, w),
        backward,
        torch.are_deterministic_algorithms_enabled(),
    )
    choice = _choices.get(key)
    if choice is not None:
        return choice
    applicable = [name for name in _applicable(x, w, plan) if name not in NOT_CHOSEN_BY_AUTO]
    candidates = sorted(applicable, key=lambda n: _estimated_cost(n, x, w, plan))
    if torch.compiler.is_compiling():
        return candidates[0]
    if key.deterministic:  # the same choice in every process, from the shapes alone
        _choices[key] = candidates[0]
        return candidates[0]
    cheapest = _estimated_cost(candidates[0], x, w, plan)
    best, best_time = candidates[0], math.inf
    for name in candidates:
        if _estimated_cost(name, x, w, plan) > 30 * cheapest:
            continue
        first = _measure(name, x, w, plan, groups, backward)  # includes warm-up costs
        if first == math.inf or first > 3 * best_time:
            continue
        seconds = min(first, _measure(name, x, w, plan, groups, backward))
        if seconds < best_time:
            best, best_time = name, seconds
    _choices[key] = best
    return best


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_plan(input: Tensor, kernel_size, stride, padding, padding_mode: str = "zeros") -> tuple[Tensor, _Plan]:
    """The input to convolve (padded here unless ``padding_mode`` is zeros) and the plan:
    which kernel taps can reach it and how to pad it for them."""
    if isinstance(padding, str) or not all(isinstance(p, int) and p >= 0 for p in _pair(padding)):
        raise ValueError(f"padding must be a non-negative int or pair (no 'same'/'valid'), got {padding!r}")
    padding = _pair(padding)
    if padding_mode != "zeros":
        pad = (padding[1], padding[1], padding[0], padding[0])
        input, padding = F.pad(input, pad, mode=padding_mode), (0, 0)
    return input, _plan(input.shape[-2:], tuple(kernel_size), _pair(stride), padding)


def planned_conv2d(
    input: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, groups: int, algorithm: str
) -> Tensor:
    """Convolve by a ``plan`` from :func:`conv_plan`, ``weight`` being already cropped to its taps."""
    if input.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
        return planned_conv2d(input.unsqueeze(0), weight, bias, plan, groups, algorithm).squeeze(0)
    if algorithm == "auto":
        algorithm = _choose(input, weight, plan, groups)
    elif (refusal := _refusal(algorithm, input, weight, plan)) is not None:
        raise ValueError(f"algorithm {algorithm!r} does not apply here: {refusal}")
    return _KERNELS[algorithm](input, weight, plan, groups, bias)


def large_kernel_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    groups: int = 1,
    padding_mode: str = "zeros",
    algorithm: str = "auto",
) -> Tensor:
    """``F.conv2d(input, weight, bias, stride, padding, groups=groups)``, computed fast.

    ``padding_mode`` is as in ``nn.Conv2d``; ``algorithm`` is one of
    :data:`ALGORITHMS`. Dilation is not supported (DCLS has none).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    input, plan = conv_plan(input, weight.shape[-2:], stride, padding, padding_mode)
    return planned_conv2d(input, weight[..., plan.rows, plan.cols], bias, plan, groups, algorithm)
