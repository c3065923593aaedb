"""Benchmarks: our Dcls2d operator against the reference ``DCLS`` package and a dense 7x7 conv
(:func:`bench_op`), and whole DCLS models against their DSC twins (:func:`bench_models`, the
paper's Table 1)."""

from __future__ import annotations

import copy
import gc
import logging
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .conv import chosen_algorithms
from .dcls import Dcls2d, LargeKernelConv2d, plain_conv2d
from .diff import count_parameters
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
) -> list[OpResult]:
    """Forward+backward time of Dcls2d (ours, the reference, a dense 7x7 depthwise conv)
    and kernel-construction peak memory, for depthwise layers of the given (C, H, W) shapes."""
    device = torch.device(device)
    results = []
    for channels, height, width in shapes:
        if progress:
            progress(f"{channels}ch {height}x{width}")
        torch.manual_seed(0)
        ours = Dcls2d(
            channels, channels, count, padding=kernel // 2, dilated_kernel_size=kernel, groups=channels, version=version
        ).to(device)
        x = torch.randn(batch, channels, height, width, device=device, requires_grad=True)
        dense7 = torch.nn.Conv2d(channels, channels, 7, padding=3, groups=channels).to(device)
        ours_ms = time_ms(_forward_backward(ours, x), repeats, device)
        algorithm = next(
            (name for key, name in chosen_algorithms().items() if key.input_shape == x.shape and key.backward),
            ours.algorithm,
        )
        dense7_ms = time_ms(_forward_backward(dense7, x), repeats, device)
        ours_bytes = peak_bytes(partial(_construct_and_backward, ours.kernel))
        ref = _reference_layer(ours) if reference else None
        ref_ms = ref_bytes = None
        if ref is not None:
            ref_ms = time_ms(_forward_backward(ref, x), repeats, device)
            ref_bytes = peak_bytes(partial(_construct_and_backward, partial(ref.DCK, ref.weight, ref.P, ref.SIG)))
        ops = (_kernel_count(ours, x), _kernel_count(dense7, x))
        results.append(
            OpResult(channels, height, width, algorithm, ours_ms, ref_ms, dense7_ms, ours_bytes, ref_bytes, *ops)
        )
    return results


# -- whole models: the paper's Table 1 ---------------------------------------------------------

TABLE1_MODELS = ("convnext_tiny", "convformer_s18", "fastvit_sa24")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes
# per device type: clips per batch, warm-up calls and timed repetitions of each step, steps per repetition
# (on a GPU several, so that a repetition's synchronisation does not stall the queue after every step)
MODEL_BENCH_DEFAULTS = {
    "cpu": dict(batch=4, warmup=1, repeats=5, steps_per_repeat=1),
    "cuda": dict(batch=64, warmup=5, repeats=10, steps_per_repeat=5),
}


@dataclass
class Throughput:
    """Samples/s of one kind of step, one figure per timed repetition."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Half the min-max range, as a fraction of the median."""
        return (max(self.samples) - min(self.samples)) / 2 / self.median

    def as_dict(self) -> dict:
        return {"median": self.median, "min": min(self.samples), "max": max(self.samples), "samples": self.samples}


@dataclass
class Variant:
    """One model of a pair: parameters, GFLOPs per clip (:func:`count_flops`) and throughputs:
    ``training``, ``inference`` (baked kernels) and, for DCLS, ``inference_unbaked`` (kernels built every call)."""

    params: int
    gflops: float
    throughput: dict[str, Throughput]

    def as_dict(self) -> dict:
        return {"params": self.params, "gflops": self.gflops} | {k: t.as_dict() for k, t in self.throughput.items()}


@dataclass
class ModelResult:
    """A timm model's DSC twin (its own depthwise convs) and its DCLS rewrite, measured in one process."""

    model: str
    dsc: Variant
    dcls: Variant
    peak_memory: int | None = None  # bytes of CUDA memory allocated at most while measuring the pair; None on the CPU

    @property
    def ratios(self) -> dict[str, float]:
        """DCLS / DSC of each figure (of the medians); un-baked inference against the DSC's inference,
        as the DSC model has no kernels to build."""
        dsc, dcls = self.dsc.throughput, self.dcls.throughput
        return {
            "params": self.dcls.params / self.dsc.params,
            "gflops": self.dcls.gflops / self.dsc.gflops,
            "training": dcls["training"].median / dsc["training"].median,
            "inference": dcls["inference"].median / dsc["inference"].median,
            "inference_unbaked": dcls["inference_unbaked"].median / dsc["inference"].median,
        }

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "dsc": self.dsc.as_dict(),
            "dcls": self.dcls.as_dict(),
            "ratio": self.ratios,
            "peak_memory": self.peak_memory,
        }


@dataclass
class ModelBench:
    """What :func:`bench_models` measured, and on what (``setup``: device, versions, batch, dtype...);
    ``failed``: the models that ran out of memory, each with its message (the others were measured)."""

    setup: dict
    models: list[ModelResult]
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"setup": self.setup, "models": [m.as_dict() for m in self.models], "failed": self.failed}


def _out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _free_memory(device: torch.device) -> None:
    """Return the memory of a finished model: FX graph modules hold reference cycles, which only the
    collector frees, and the CUDA caching allocator keeps freed blocks until emptied."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


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


def _inference_step(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], None]:
    from dclsify.pipeline.evaluate import autocast

    def step() -> None:
        with torch.inference_mode(), autocast(x.device, dtype):
            model(x)

    return step


def _training_step(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], None]:
    """One step as the trainer (:func:`dclsify.pipeline.train.train`) takes it with the default
    recipe: forward under autocast, BCE, backward (through a gradient scaler in fp16), AdamW on
    the trainer's parameter groups, then each shared DCLS position tensor clamped once to its
    window (the trainer's own functions)."""
    from dclsify.pipeline.evaluate import autocast
    from dclsify.pipeline.recipe import TrainRecipe
    from dclsify.pipeline.train import clamp_positions, make_optimizer

    optimizer = make_optimizer(TrainRecipe(), model, lr=1e-4)
    scaler = torch.amp.GradScaler(x.device.type) if dtype == "fp16" else None
    targets = None

    def step() -> None:
        nonlocal targets
        with autocast(x.device, dtype):
            logits = model(x).float()
        if targets is None:
            targets = (torch.rand_like(logits) < 0.01).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        clamp_positions(model)

    return step


def _throughputs(
    steps: dict[str, Callable[[], None]],
    batch: int,
    warmup: int,
    repeats: int,
    calls: int,
    device: torch.device,
    progress: Callable[[str], None],
) -> dict[str, Throughput]:
    """Samples/s of each step: ``warmup`` calls each, then ``repeats`` rounds that time ``calls``
    back-to-back calls of every step in turn (interleaved, so that a change of machine load
    touches all alike), waiting for the device before and after."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for name, step in steps.items():
        progress(f"warm-up, {name}")
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps}
    for round_ in range(repeats):
        for name, step in steps.items():
            progress(f"repetition {round_ + 1}/{repeats}, {name}")
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                step()
            sync()
            samples[name].append(batch * calls / (time.perf_counter() - start))
    return {name: Throughput(values) for name, values in samples.items()}


def bench_model(
    name: str,
    batch: int,
    warmup: int,
    repeats: int,
    steps_per_repeat: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
    input_size: tuple[int, int] = (128, 1001),
    progress: Callable[[str], None] | None = None,
) -> ModelResult:
    """Parameters, GFLOPs per clip and throughput of a timm model's DCLS audio rewrite and its DSC
    twin (``dcls=False``: the same stem and head, its own depthwise convs), 527 classes, on
    (batch, 1, *input_size) inputs under ``dtype`` autocast.

    Throughputs (:func:`_throughputs`): a training step (forward, BCE, backward, AdamW, clamp),
    inference with baked kernels (:func:`dclsify.bake`) and, for DCLS, inference building the
    kernels every call, as evaluation during training does.
    """
    from .checkpoint import create_source, timm_name
    from .dcls import bake
    from .rewrite import rewrite

    progress = progress or (lambda what: None)
    device_ = torch.device(device)
    if device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_)
    progress("building")
    torch.manual_seed(0)
    original = create_source(timm_name(name))
    dsc, dcls = rewrite(original, num_classes=527, dcls=False), rewrite(original, num_classes=527)
    del original
    progress("counting FLOPs")
    shape = (1, 1, *input_size)
    counts = {k: (count_parameters(m), count_flops(m, shape) / 1e9) for k, m in (("dsc", dsc), ("dcls", dcls))}
    dsc, dcls = dsc.to(device_), dcls.to(device_)
    x = torch.randn(batch, 1, *input_size, device=device_)
    timed = {
        "DSC training": _training_step(dsc.train(), x, dtype),
        "DCLS training": _training_step(dcls.train(), x, dtype),
        "DSC inference": _inference_step(bake(dsc).eval(), x, dtype),
        "DCLS inference": _inference_step(bake(dcls).eval(), x, dtype),
        "DCLS un-baked inference": _inference_step(copy.deepcopy(dcls).eval(), x, dtype),
    }
    measured = _throughputs(timed, batch, warmup, repeats, steps_per_repeat, device_, progress)
    dsc_result = Variant(*counts["dsc"], {"training": measured["DSC training"], "inference": measured["DSC inference"]})
    dcls_result = Variant(
        *counts["dcls"],
        {
            "training": measured["DCLS training"],
            "inference": measured["DCLS inference"],
            "inference_unbaked": measured["DCLS un-baked inference"],
        },
    )
    peak = torch.cuda.max_memory_allocated(device_) if device_.type == "cuda" else None
    return ModelResult(name, dsc_result, dcls_result, peak)


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
    import timm

    from dclsify import __version__

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


def bench_models(
    models: Sequence[str] = TABLE1_MODELS,
    batch: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    steps_per_repeat: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    input_size: tuple[int, int] = (128, 1001),
    progress: Callable[[str], None] | None = None,
) -> ModelBench:
    """The paper's Table 1 benchmark: :func:`bench_model` for each timm model (``timm:NAME`` or
    ``NAME``; default the paper's three), with the device and library versions. ``batch``,
    ``warmup``, ``repeats`` and ``steps_per_repeat`` left None take the device type's
    :data:`MODEL_BENCH_DEFAULTS`; ``dtype`` is an autocast precision of :data:`DTYPES`
    (fp16 on CUDA only). Unknown model names are an error before anything is measured."""
    from .checkpoint import timm_name
    from .rewrite import SurgeryError

    device_ = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "fp16" and device_.type != "cuda":
        raise ValueError("fp16 autocast is for CUDA devices: use bf16 or fp32 on the CPU")
    for source in models:
        if source.startswith("file:"):
            raise SurgeryError(f"{source!r} is not a timm model: the benchmark takes timm:NAME or NAME")
    names = list(dict.fromkeys(timm_name(m) for m in models))  # all checked before any is built; a repeated name once
    defaults = MODEL_BENCH_DEFAULTS[device_.type]
    batch, warmup, repeats, steps_per_repeat = (
        defaults[key] if value is None else value
        for key, value in (
            ("batch", batch),
            ("warmup", warmup),
            ("repeats", repeats),
            ("steps_per_repeat", steps_per_repeat),
        )
    )
    setup = environment(device) | {
        "batch": batch,
        "input_shape": [1, *input_size],
        "dtype": dtype,
        "warmup": warmup,
        "repeats": repeats,
        "steps_per_repeat": steps_per_repeat,
    }
    results, failed = [], {}
    for index, name in enumerate(names):
        label = f"{name} ({index + 1}/{len(names)})"
        report = None if progress is None else (lambda what, label=label: progress(f"{label}: {what}"))
        try:
            results.append(
                bench_model(name, batch, warmup, repeats, steps_per_repeat, device, dtype, input_size, report)
            )
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not _out_of_memory(error):
                raise
            failed[name] = f"{name}: out of memory on {device} at batch {batch} ({dtype}); try a smaller --batch"
        _free_memory(device_)  # outside the except clause: its traceback no longer holds the tensors
    return ModelBench(setup, results, failed)
