"""A depthwise large-kernel correlation in Triton: forward, input gradient and weight gradient.

Written for the late stages of a network, where a 23x23 depthwise convolution meets maps of a few
dozen pixels: ``F.conv2d`` launches a kernel made for other shapes and the FFT pays for transforms
larger than the map. Here each program computes a block of (sample, channel) rows x output pixels
(the pixels flattened, so that an 8x7 map fills a block as well as a 64x62 one), one tap at a time,
with masked loads in place of padding. The weight gradient reduces over the batch and the pixels in one
program per (channel, block of taps): no atomics, the same bits on every run.

Accumulates in float32 (float64 for float64 tensors) whatever the inputs' dtype, and stores in the
dtype asked for. Runs on CUDA tensors; on CPU tensors only when ``TRITON_INTERPRET=1`` was set
before this module was imported (Triton's interpreter, which is how the tests check it without a
GPU). :mod:`dclsify.surgery.conv` imports it where Triton can be imported.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# Set at import: Triton reads TRITON_INTERPRET when a kernel is decorated, not when it runs.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Elements per program's block, and pixels per block of the weight gradient. The interpreter runs
# programs one after another, each operation a numpy call: fewer, larger blocks are many times
# faster there. On a GPU a block is one program's registers. (Untuned: no GPU has run this yet.)
_BLOCK = 2**16 if INTERPRETED else 512
_WEIGHT_BLOCK, _WEIGHT_PIXELS = (2**20, 2048) if INTERPRETED else (512, 64)


@triton.jit
def _correlate(
    x_ptr,
    w_ptr,
    y_ptr,
    rows,  # batch x output channels
    channels_out,
    in_h,
    in_w,
    out_h,
    out_w,
    top,
    left,
    MULTIPLIER: tl.constexpr,  # output channels per input channel
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """y[b, o, oy, ox] = sum_ij x[b, o // MULTIPLIER, oy*sh + i - top, ox*sw + j - left] * w[o, i, j].

    A program computes a block of rows (b, o) x a block of output pixels, one tap at a time."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # axis 0: up to 2**31 - 1 programs (axis 1: 65535)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    r_ok, p_ok = r < rows, p < out_h * out_w
    b, o = (r // channels_out).to(tl.int64), r % channels_out
    x_maps = x_ptr + (b * (channels_out // MULTIPLIER) + o // MULTIPLIER) * in_h * in_w
    w_taps = w_ptr + o * KH * KW
    first_row = (p // out_w) * STRIDE_H - top
    first_col = (p % out_w) * STRIDE_W - left
    acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=ACC)
    for i in range(KH):
        row = first_row + i
        row_mask = r_ok[:, None] & (p_ok & (row >= 0) & (row < in_h))[None, :]
        row_start = x_maps[:, None] + (row * in_w + first_col)[None, :]
        for j in range(KW):
            col = first_col + j
            mask = row_mask & ((col >= 0) & (col < in_w))[None, :]
            x = tl.load(row_start + j, mask=mask, other=0.0)
            w = tl.load(w_taps + (i * KW + j), mask=r_ok, other=0.0)
            acc += x.to(ACC) * w.to(ACC)[:, None]
    y = y_ptr + (r.to(tl.int64) * out_h * out_w)[:, None] + p[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & p_ok[None, :])


@triton.jit
def _correlate_grad_input(
    g_ptr,
    w_ptr,
    gx_ptr,
    rows,  # batch x input channels
    channels_out,
    in_h,
    in_w,
    out_h,
    out_w,
    top,
    left,
    MULTIPLIER: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """gx[b, c, y, x] = sum over the outputs o of c and the taps ij that read (y, x) of g[b, o, oy, ox] * w[o, i, j],
    where oy*sh = y + top - i and ox*sw = x + left - j."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # axis 0: up to 2**31 - 1 programs (axis 1: 65535)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels_in = channels_out // MULTIPLIER
    r_ok, p_ok = r < rows, p < in_h * in_w
    b, c = (r // channels_in).to(tl.int64), r % channels_in
    last_row = p // in_w + top  # the output row times the stride that tap row 0 would write
    last_col = p % in_w + left
    acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=ACC)
    for m in range(MULTIPLIER):
        o = c * MULTIPLIER + m
        g_maps = g_ptr + (b * channels_out + o) * out_h * out_w
        w_taps = w_ptr + o * KH * KW
        for i in range(KH):
            if STRIDE_H == 1:
                oy = last_row - i
                row_ok = p_ok & (oy >= 0) & (oy < out_h)
            else:
                ny = last_row - i
                oy = ny // STRIDE_H
                row_ok = p_ok & (ny >= 0) & (oy < out_h) & (ny % STRIDE_H == 0)
            row_mask = r_ok[:, None] & row_ok[None, :]
            row_start = g_maps[:, None] + (oy * out_w)[None, :]
            for j in range(KW):
                if STRIDE_W == 1:
                    ox = last_col - j
                    col_ok = (ox >= 0) & (ox < out_w)
                else:
                    nx = last_col - j
                    ox = nx // STRIDE_W
                    col_ok = (nx >= 0) & (ox < out_w) & (nx % STRIDE_W == 0)
                g = tl.load(row_start + ox[None, :], mask=row_mask & col_ok[None, :], other=0.0)
                w = tl.load(w_taps + (i * KW + j), mask=r_ok, other=0.0)
                acc += g.to(ACC) * w.to(ACC)[:, None]
    gx = gx_ptr + (r.to(tl.int64) * in_h * in_w)[:, None] + p[None, :]
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=r_ok[:, None] & p_ok[None, :])


@triton.jit
def _correlate_grad_weight(
    g_ptr,
    x_ptr,
    gw_ptr,
    batch,
    channels_out,
    in_h,
    in_w,
    out_h,
    out_w,
    top,
    left,
    MULTIPLIER: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """gw[o, i, j] = sum over b, oy, ox of g[b, o, oy, ox] * x[b, o // MULTIPLIER, oy*sh + i - top, ox*sw + j - left].

    A program reduces a block of one channel's taps over the whole batch and map, in a fixed order."""
    o = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < KH * KW
    tap_row = (t // KW - top)[:, None]
    tap_col = (t % KW - left)[:, None]
    channels_in = channels_out // MULTIPLIER
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=ACC)
    for start in range(0, out_h * out_w, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        p_ok = p < out_h * out_w
        row = tap_row + ((p // out_w) * STRIDE_H)[None, :]
        col = tap_col + ((p % out_w) * STRIDE_W)[None, :]
        mask = t_ok[:, None] & p_ok[None, :] & (row >= 0) & (row < in_h) & (col >= 0) & (col < in_w)
        offsets = row * in_w + col
        for b in range(batch):
            g = tl.load(g_ptr + (b * channels_out + o) * out_h * out_w + p, mask=p_ok, other=0.0)
            x = tl.load(x_ptr + (b * channels_in + o // MULTIPLIER) * in_h * in_w + offsets, mask=mask, other=0.0)
            acc += x.to(ACC) * g.to(ACC)[None, :]
    tl.store(gw_ptr + o * KH * KW + t, tl.sum(acc, axis=1).to(gw_ptr.dtype.element_ty), mask=t_ok)


def _blocks(rows: int, pixels: int) -> tuple[int, int]:
    """(rows, pixels) per program: as many pixels as the map has, up to the block, then rows."""
    block_p = min(triton.next_power_of_2(pixels), _BLOCK, 4096)
    return min(triton.next_power_of_2(max(rows, 1)), max(1, _BLOCK // block_p)), block_p


def _weight_blocks(taps: int, pixels: int) -> tuple[int, int]:
    """(taps, pixels) per program of the weight gradient: a row of pixels for a few taps at a time."""
    block_p = min(triton.next_power_of_2(pixels), _WEIGHT_PIXELS)
    return min(triton.next_power_of_2(taps), _WEIGHT_BLOCK // block_p), block_p


def _on(x: Tensor):
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _accumulator(*tensors: Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


class _DepthwiseCorrelation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, top, left, stride, out_size, out_dtype):
        x, w = x.contiguous(), w.contiguous()
        batch, channels_in, in_h, in_w = x.shape
        channels_out, _, kh, kw = w.shape
        multiplier = channels_out // channels_in
        y = x.new_empty(batch, channels_out, *out_size, dtype=out_dtype)
        block_r, block_p = _blocks(batch * channels_out, out_size[0] * out_size[1])
        grid = (triton.cdiv(batch * channels_out, block_r), triton.cdiv(out_size[0] * out_size[1], block_p))
        geometry = (channels_out, in_h, in_w, *out_size, top, left, multiplier, kh, kw, *stride)
        if y.numel():
            with _on(x):
                _correlate[grid](x, w, y, batch * channels_out, *geometry, _accumulator(x, w), block_r, block_p)
        ctx.save_for_backward(x, w)
        ctx.geometry = geometry
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        batch, channels_in, in_h, in_w = x.shape
        channels_out, _, kh, kw = w.shape
        accumulator = _accumulator(x, w, grad)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            block_r, block_p = _blocks(batch * channels_in, in_h * in_w)
            grid = (triton.cdiv(batch * channels_in, block_r), triton.cdiv(in_h * in_w, block_p))
            rows = batch * channels_in
            if grad_x.numel() and grad.numel():
                with _on(x):
                    _correlate_grad_input[grid](grad, w, grad_x, rows, *ctx.geometry, accumulator, block_r, block_p)
            else:
                grad_x.zero_()
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            block_t, block_p = _weight_blocks(kh * kw, grad.shape[-2] * grad.shape[-1])
            grid = (triton.cdiv(kh * kw, block_t), channels_out)
            with _on(x):
                _correlate_grad_weight[grid](grad, x, grad_w, batch, *ctx.geometry, accumulator, block_t, block_p)
        return grad_x, grad_w, None, None, None, None, None


def depthwise_correlation(
    x: Tensor,
    w: Tensor,
    top: int,
    left: int,
    stride: tuple[int, int],
    out_size: tuple[int, int],
    out_dtype: torch.dtype,
) -> Tensor:
    """Valid correlation of ``x`` (B, C, H, W), zero-padded by ``top`` rows and ``left`` columns before its
    first ones, with ``w`` (C * m, 1, kh, kw), output channel o reading input channel o // m; the output is
    (B, C * m, *out_size) in ``out_dtype``. Differentiable in ``x`` and ``w``."""
    return _DepthwiseCorrelation.apply(x, w, top, left, tuple(stride), tuple(out_size), out_dtype)
