"""Batches for training and evaluation, on one process or many (DDP).

A training epoch is one global sequence of dataset indices, the same on every rank, dealt out
in turn (rank ``r`` takes items ``r, r + world, ...``), so the ranks' shares are disjoint and
equal; a sampler can start its share part-way, for exact resume. :class:`ShardSampler` gives
each clip once an epoch (seeded permutations) and, for evaluation, every clip exactly once
across the ranks (no padding, so nothing is counted twice); :class:`BalancedSampler` draws
clips with replacement, rare labels more often (:func:`balanced_weights`). :func:`make_loader`
puts one under a DataLoader that moves int16 waveforms and bool targets only; everything that
runs batched runs on the device.
"""

from __future__ import annotations

import logging
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .sources import ClipDataset, collate

log = logging.getLogger("dclsify.data")

SAMPLERS = ("uniform", "balanced")
WEIGHT_ROWS = 8192  # clips whose float64 targets are multiplied at once: 35 MB for AudioSet's 527 classes


class EpochSampler(Sampler[int]):
    """This rank's share of each epoch's global sequence (:meth:`order`, ``epoch_clips`` long):
    items ``rank, rank + world, ...`` of it, cut to a multiple of ``world`` first so that the shares
    are equal. ``set_epoch(epoch, start)`` skips the first ``start`` items of this rank's share."""

    def __init__(self, rank: int, world: int, seed: int, epoch_clips: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if epoch_clips < 0:
            raise ValueError(f"epoch_clips must be >= 0, got {epoch_clips}")
        self.rank, self.world, self.seed, self.epoch_clips = rank, world, seed, epoch_clips
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> np.ndarray | torch.Tensor:
        """The epoch's dataset indices, all ranks' together; a function of the seed and the epoch only."""
        raise NotImplementedError

    def shard(self) -> list[int]:
        order = self.order()
        return order[: len(order) - len(order) % self.world][self.rank :: self.world].tolist()

    def __iter__(self):
        return iter(self.shard()[self.start :])

    def __len__(self) -> int:
        return max(self.epoch_clips // self.world - self.start, 0)


class ShardSampler(EpochSampler):
    """Dataset indices for one rank of ``world``.

    ``shuffle=True`` (training): without replacement. The epochs cut one endless stream of
    permutations of the clips, the ``k``-th seeded by ``seed + k``, into pieces of ``epoch_clips``
    (0: ``size``, when epoch ``e`` is permutation ``e``): with fewer clips an epoch, the next epoch
    goes on with the permutation where the last stopped (every clip is met once in ``size``
    clips' worth of epochs); with more, an epoch goes on into the next permutation.
    ``shuffle=False`` (evaluation): rank ``r`` takes ``r, r + world, ...``: every clip once.
    """

    def __init__(
        self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0, epoch_clips: int = 0
    ) -> None:
        super().__init__(rank, world, seed, (epoch_clips or size) if size else 0)
        if epoch_clips and not shuffle:
            raise ValueError("an evaluation sampler gives every clip once: it takes no epoch_clips")
        self.size, self.shuffle = size, shuffle

    def order(self) -> torch.Tensor:
        if self.size == 0:
            return torch.zeros(0, dtype=torch.int64)
        first = self.epoch * self.epoch_clips  # this epoch's place in the stream
        permutations = range(first // self.size, (first + self.epoch_clips - 1) // self.size + 1)
        generators = (torch.Generator().manual_seed(self.seed + k) for k in permutations)
        stream = torch.cat([torch.randperm(self.size, generator=generator) for generator in generators])
        offset = first - permutations.start * self.size
        return stream[offset : offset + self.epoch_clips]

    def shard(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world))
        return super().shard()

    def __len__(self) -> int:
        if not self.shuffle:
            return max(len(range(self.rank, self.size, self.world)) - self.start, 0)
        return super().__len__()


def balanced_weights(targets: np.ndarray) -> np.ndarray:
    """Each clip's draw weight, float64: the sum over its labels of ``1000 / (100 + n)``, ``n`` that
    label's clip count in ``targets`` (clips x classes, bool). A clip with no label weighs as a clip
    of the commonest class alone does (the smallest weight a labelled clip can have)."""
    targets = np.asarray(targets, dtype=bool)
    per_class = 1000.0 / (100.0 + targets.sum(axis=0, dtype=np.int64))
    weights = np.empty(len(targets), dtype=np.float64)
    for first in range(0, len(targets), WEIGHT_ROWS):  # a float copy of AudioSet's whole matrix would take 8 GB
        weights[first : first + WEIGHT_ROWS] = targets[first : first + WEIGHT_ROWS].astype(np.float64) @ per_class
    unlabelled = ~targets.any(axis=1)
    weights[unlabelled] = per_class.min() if per_class.size else 1.0
    return weights


class BalancedSampler(EpochSampler):
    """Training indices drawn with replacement, clip ``i`` with probability ``weights[i] / sum(weights)``
    (see :func:`balanced_weights`), ``epoch_clips`` an epoch (0: as many as there are clips), from
    a generator seeded by (seed, epoch): every rank draws the same sequence and takes its share."""

    def __init__(self, weights, rank: int = 0, world: int = 1, seed: int = 0, epoch_clips: int = 0) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        super().__init__(rank, world, seed, (epoch_clips or len(weights)) if len(weights) else 0)
        if weights.ndim != 1 or not np.isfinite(weights).all() or (weights <= 0).any():
            raise ValueError("balanced sampling needs one finite positive weight per clip")
        self.cumulative = np.cumsum(weights)

    def order(self) -> np.ndarray:
        if not len(self.cumulative):
            return np.zeros(0, dtype=np.int64)
        uniform = np.random.default_rng([self.seed, self.epoch]).random(self.epoch_clips)
        # clip i owns [cumulative[i - 1], cumulative[i]) of [0, total)
        draws = np.searchsorted(self.cumulative, uniform * self.cumulative[-1], side="right")
        return np.minimum(draws, len(self.cumulative) - 1)  # a product that rounds up to the total


def make_loader(
    dataset: ClipDataset,
    batch_size: int,
    train: bool,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
    sampler: str = "uniform",
    epoch_clips: int = 0,
) -> DataLoader:
    """A DataLoader of :class:`~dclsify.pipeline.sources.Batch` es over this rank's shard.

    Training batches are all full (the last partial one is dropped: static shapes), drawn by
    ``sampler``: ``"uniform"`` (:class:`ShardSampler`) or ``"balanced"`` (:class:`BalancedSampler`,
    weighted by the dataset's :meth:`~dclsify.pipeline.sources.ClipDataset.target_matrix`),
    ``epoch_clips`` an epoch (0: the dataset's size). Evaluation keeps every clip, once.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if train and sampler == "balanced":
        chosen = BalancedSampler(balanced_weights(dataset.target_matrix()), rank, world, seed, epoch_clips)
    else:
        chosen = ShardSampler(
            len(dataset), rank, world, shuffle=train, seed=seed, epoch_clips=epoch_clips if train else 0
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=chosen,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # its seed draws must not move the global RNG: exact resume
        worker_init_fn=ignore_interrupts,
    )


def ignore_interrupts(worker_id: int) -> None:
    """A worker leaves Ctrl-C to the training process, which stops after the step under way
    and still needs its batches (a worker's default is to exit at once)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FailureLog:
    """The clips a run had to replace: each logged once, with its path and reason, and counted."""

    def __init__(self) -> None:
        self.failures: dict[str, str] = {}
        self.replacements = 0

    def record(self, failures: list[tuple[str, str]]) -> None:
        for path, reason in failures:
            self.replacements += 1
            if path not in self.failures:
                self.failures[path] = reason
                log.warning("clip replaced: %s (%s)", path, reason)
