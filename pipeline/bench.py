"""Benchmarks of what the pipeline runs.

:func:`bench_data`: how fast data reaches the model, the loader (HDF5 -> int16 batches) and the
device work (front-end and augmentation) measured apart, as ``dclsify bench-data`` reports them.
:func:`bench_models`: the paper's Table 1, whole DCLS models against their DSC twins, each step
taken as the trainer takes it (``dclsify bench-model``).
"""

from __future__ import annotations

import copy
import gc
import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..surgery.bench import count_flops, environment
from ..surgery.checkpoint import create_source, timm_name
from ..surgery.conv import check_algorithm
from ..surgery.dcls import Dcls2d, bake
from ..surgery.diff import count_parameters
from ..surgery.rewrite import SurgeryError, rewrite
from . import train  # its functions looked up when called: the benchmark steps as the trainer steps
from .augment import Augment
from .datasets import open_source
from .evaluate import autocast
from .frontend import AudioConfig, LogMel
from .loader import make_loader
from .recipe import TrainRecipe


@dataclass
class DataBenchResult:
    path: str
    batch: int
    workers: int
    device: str
    loader_clips_per_second: float  # read + collate, in the main process's hands
    frontend_clips_per_second: float  # log-mel only, as evaluation runs
    augment_clips_per_second: float  # roll, speed, log-mel, erasing, mixup, as training runs
    clip_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(
    path: str | os.PathLike,
    batch: int = 32,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    batches: int = 20,
    audio: AudioConfig | None = None,
) -> DataBenchResult:
    """Clips per second of (a) the training loader over ``path`` (``batches`` batches after a
    warm-up; the file is read again as often as needed) and (b) front-end + augmentation on
    ``device``, over one batch of the same shape."""
    device = torch.device(device)
    dataset = open_source(path, audio)
    audio = dataset.audio
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    batch = min(batch, len(dataset))

    def epochs(loader):
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    stream = epochs(make_loader(dataset, batch, train=True, workers=workers))
    first = next(stream)  # starts the workers
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    loader_rate = batches * batch / (time.perf_counter() - started)
    del stream  # stops the workers

    waveforms, targets = first.waveforms.to(device), first.targets.to(device)
    frontend = LogMel(audio).to(device)
    augment = Augment(frontend, seed=0)
    rates = []
    for work in (lambda: frontend(waveforms), lambda: augment(waveforms, targets)):
        with torch.no_grad():
            work()  # warm-up: FFT plans, kernels
            _sync(device)
            repeats = 3 if device.type == "cpu" else 20
            started = time.perf_counter()
            for _ in range(repeats):
                work()
            _sync(device)
        rates.append(repeats * batch / (time.perf_counter() - started))
    return DataBenchResult(str(path), batch, workers, str(device), loader_rate, *rates, audio.seconds)


# -- whole models: the paper's Table 1 ------------------------------------------------------------

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


def _inference_step(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(x.device, dtype):
            model(x)

    return step


def _training_step(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], None]:
    """One step as the trainer (:func:`dclsify.pipeline.train.train`) takes it with the default
    recipe: forward under autocast, BCE, backward (through a gradient scaler in fp16), AdamW on
    the trainer's parameter groups, then each shared DCLS position tensor clamped once to its
    window (the trainer's own functions)."""
    optimizer = train.make_optimizer(TrainRecipe(), model, lr=1e-4)
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
        train.clamp_positions(model)

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
    algorithm: str = "auto",
) -> ModelResult:
    """Parameters, GFLOPs per clip and throughput of a timm model's DCLS audio rewrite and its DSC
    twin (``dcls=False``: the same stem and head, its own depthwise convs), 527 classes, on
    (batch, 1, *input_size) inputs under ``dtype`` autocast.

    Throughputs (:func:`_throughputs`): a training step (forward, BCE, backward, AdamW, clamp),
    inference with baked kernels (:func:`dclsify.bake`) and, for DCLS, inference building the
    kernels every call, as evaluation during training does. The DCLS layers, baked or not, convolve
    by ``algorithm`` (:data:`~dclsify.surgery.conv.ALGORITHMS`).
    """
    progress = progress or (lambda what: None)
    device_ = torch.device(device)
    if device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_)
    progress("building")
    torch.manual_seed(0)
    original = create_source(timm_name(name))
    dsc, dcls = rewrite(original, num_classes=527, dcls=False), rewrite(original, num_classes=527)
    del original
    for layer in dcls.modules():
        if isinstance(layer, Dcls2d):
            layer.algorithm = algorithm  # baking keeps it
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
    algorithm: str = "auto",
) -> ModelBench:
    """The paper's Table 1 benchmark: :func:`bench_model` for each timm model (``timm:NAME`` or
    ``NAME``; default the paper's three), with the device and library versions. ``batch``,
    ``warmup``, ``repeats`` and ``steps_per_repeat`` left None take the device type's
    :data:`MODEL_BENCH_DEFAULTS`; ``dtype`` is an autocast precision of :data:`DTYPES`
    (fp16 on CUDA only); ``algorithm`` is the DCLS layers' (:data:`~dclsify.surgery.conv.ALGORITHMS`).
    Unknown model names are an error before anything is measured."""
    device_ = torch.device(device)
    check_algorithm(algorithm, device_)
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
        "algorithm": algorithm,
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
                bench_model(
                    name, batch, warmup, repeats, steps_per_repeat, device, dtype, input_size, report, algorithm
                )
            )
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not _out_of_memory(error):
                raise
            failed[name] = f"{name}: out of memory on {device} at batch {batch} ({dtype}); try a smaller --batch"
        _free_memory(device_)  # outside the except clause: its traceback no longer holds the tensors
    return ModelBench(setup, results, failed)
