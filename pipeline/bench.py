"""How fast data reaches the model: the loader (HDF5 -> int16 batches) and the device work
(front-end and augmentation), measured apart, as ``dclsify bench-data`` reports them."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass

import torch

from .augment import Augment
from .frontend import AudioConfig, LogMel
from .loader import make_loader
from .sources import open_source


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
