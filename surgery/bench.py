"""Benchmarks of the operator: our Dcls2d against the reference ``DCLS`` package and a dense 7x7 conv
(:func:`bench_op`), with the measuring tools the model benchmark (:mod:`dclsify.pipeline.bench`,
the paper's Table 1) shares: timings, peak memory, FLOPs and the machine's description."""

from __future__ import annotations

import copy
import logging
import platform
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .._version import __version__
from .conv import check_algorithm, chosen_algorithms
from .dcls import Dcls2d, LargeKernelConv2d, plain_conv2d
from .opcount import count_ops

# The four stage shapes of ConvNeXt-T on a (1, 128, 1001) log-mel input with the 2x16 stem.
PAPER_SHAPES = ((96, 64, 62), (192, 32, 31), (384, 16, 15), (768, 8, 7))


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once while the mode is active, counting
    every storage an op creates (forward, backward and saved tensors) until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self._live and storage.nbytes():
                    self._live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak tensor memory allocated while ``fn`` runs (see :class:`PeakMemory`)."""
    with PeakMemory() as meter:
        fn()
    return meter.peak


def _timings(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall times (s) of ``repeats`` calls, after one warm-up call, waiting for the device."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def time_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls, in ms, after one warm-up call."""
    return min(_timings(fn, repeats, device)) * 1e3


@dataclass
class OpResult:
    channels: int
    height: int
    width: int
    algorithm: str
    ours_ms: float
    reference_ms: float | None
    dense7_ms: float
    ours_kernel_bytes: int
    reference_kernel_bytes: int | None
    ours_ops: int  # operators that do work (kernel launches on a GPU), forward+backward
    dense7_ops: int

    @property
    def speedup(self) -> float | None:
        return None if self.reference_ms is None else self.reference_ms / self.ours_ms

    @property
    def vs_dense7(self) -> float:
        return self.ours_ms / self.dense7_ms

    @property
    def memory_ratio(self) -> float | None:
        return None if self.reference_kernel_bytes is None else self.ours_kernel_bytes / self.reference_kernel_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"speedup": self.speedup, "vs_dense7": self.vs_dense7, "memory_ratio": self.memory_ratio}


def _reference_layer(layer: Dcls2d):
    """The same layer in ``DCLS==0.1.1``, or None when it is not installed."""
    try:
        from DCLS.construct.modules import Dcls2d as ReferenceDcls2d
    except ImportError:
        return None
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # it warns about its CUDA kernel on every construction
    try:
        reference = ReferenceDcls2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_count,
            stride=layer.stride,
            padding=layer.padding,
            dilated_kernel_size=layer.dilated_kernel_size,
            groups=layer.groups,
            bias=layer.bias is not None,
            version=layer.version,
        )
    finally:
        logging.disable(previous)
    reference.load_state_dict(layer.state_dict())
    return reference.to(layer.weight.device)


def _construct_and_backward(construct: Callable[[], torch.Tensor]) -> None:
    construct().sum().backward()


def _forward_backward(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    # a dense output gradient, as a layer inside a network gets: sum()'s is a broadcast
    # view, which sends some backward kernels down slow paths. Drawn at the first (warm-up)
    # call, whose output gives its shape.
    grads = []

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)
        if not grads:
            grads.append(torch.randn_like(y))
        y.backward(grads[0])

    return step


def _kernel_count(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Operators that do work (each a kernel launch on a GPU) in a warm forward+backward."""
    step = _forward_backward(module, x)
    step()
    return count_ops(step).kernels


def bench_op(
    shapes=PAPER_SHAPES,
    batch: int = 8,
    kernel: int = 23,
    count: int = 26,
    version: str = "gauss",
    repeats: int = 3,
    reference: bool = True,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    algorithm: str = "auto",
) -> list[OpResult]:
    """Forward+backward time of Dcls2d (ours, the reference, a dense 7x7 depthwise conv)
    and kernel-construction peak memory, for depthwise layers of the given (C, H, W) shapes;
    ours convolves by ``algorithm`` (:data:`~dclsify.surgery.conv.ALGORITHMS`)."""
    device = torch.device(device)
    check_algorithm(algorithm, device)
    results = []
    for channels, height, width in shapes:
        if progress:
            progress(f"{channels}ch {height}x{width}")
        torch.manual_seed(0)
        ours = Dcls2d(
            channels,
            channels,
            count,
            padding=kernel // 2,
            dilated_kernel_size=kernel,
            groups=channels,
            version=version,
            algorithm=algorithm,
        ).to(device)
        x = torch.randn(batch, channels, height, width, device=device, requires_grad=True)
        dense7 = torch.nn.Conv2d(channels, channels, 7, padding=3, groups=channels).to(device)
        ours_ms = time_ms(_forward_backward(ours, x), repeats, device)
        if algorithm == "auto":  # what auto chose for this shape
            chosen = next(
                (name for key, name in chosen_algorithms().items() if key.input_shape == x.shape and key.backward),
                algorithm,
            )
        else:
            chosen = algorithm
        dense7_ms = time_ms(_forward_backward(dense7, x), repeats, device)
        ours_bytes = peak_bytes(partial(_construct_and_backward, ours.kernel))
        ref = _reference_layer(ours) if reference else None
        ref_ms = ref_bytes = None
        if ref is not None:
            ref_ms = time_ms(_forward_backward(ref, x), repeats, device)
            ref_bytes = peak_bytes(partial(_construct_and_backward, partial(ref.DCK, ref.weight, ref.P, ref.SIG)))
        ops = (_kernel_count(ours, x), _kernel_count(dense7, x))
        results.append(
            OpResult(channels, height, width, chosen, ours_ms, ref_ms, dense7_ms, ours_bytes, ref_bytes, *ops)
        )
    return results


def count_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of ``model`` in eval mode on an input of ``input_shape``, as
    ``torch.utils.flop_counter`` counts them: 2 x the multiply-accumulates of convolutions and
    matrix products (norms, activations and element-wise ops are not counted).

    A :class:`Dcls2d` (or a baked one) counts as the dense convolution it bakes to, computed
    directly: every tap of its window at every output, taps over the zero padding included, as
    torch counts any convolution. Nothing is computed: the model runs on the meta device.
    """
    model = copy.deepcopy(model).to("meta").eval()
    if isinstance(model, (Dcls2d, LargeKernelConv2d)):
        model = plain_conv2d(model, device="meta")
    for name, module in list(model.named_modules()):
        if isinstance(module, (Dcls2d, LargeKernelConv2d)):
            model.set_submodule(name, plain_conv2d(module, device="meta"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(input_shape, device="meta"))
    return counter.get_total_flops()


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """The machine and libraries a benchmark ran on: device name, CPU threads, versions."""
    device_ = torch.device(device)
    gpu = device_.type == "cuda"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device_) if gpu else _processor_name(),
        "device_memory": torch.cuda.get_device_properties(device_).total_memory if gpu else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if gpu else None,  # left as the trainer leaves it
        "timm": timm.__version__,
        "dclsify": __version__,
        "python": platform.python_version(),
    }
