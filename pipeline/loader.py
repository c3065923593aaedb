"""Batches for training and evaluation, on one process or many (DDP).

:class:`ShardSampler` gives each rank its share of an epoch: disjoint shards of one seeded
permutation for training, and for evaluation every clip exactly once across the ranks (no
padding, so nothing is counted twice). It can start an epoch part-way, for exact resume.
:func:`make_loader` puts it under a DataLoader that moves int16 waveforms and bool
targets only; everything that runs batched runs on the device.
"""

from __future__ import annotations

import logging
import signal

import torch
from torch.utils.data import DataLoader, Sampler

from .sources import ClipDataset, collate

log = logging.getLogger("dclsify.data")


class ShardSampler(Sampler[int]):
    """Dataset indices for one rank of ``world``.

    ``shuffle=True`` (training): epoch ``e`` is a permutation seeded by ``seed + e``, cut to
    a multiple of ``world`` and dealt out, so the ranks' shards are disjoint and equal.
    ``shuffle=False`` (evaluation): rank ``r`` takes ``r, r + world, ...``: every clip once.
    ``set_epoch(epoch, start)`` skips the first ``start`` indices of this rank's shard.
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.size, self.rank, self.world, self.shuffle, self.seed = size, rank, world, shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return order[: self.size - self.size % self.world][self.rank :: self.world].tolist()

    def __iter__(self):
        return iter(self.shard()[self.start :])

    def __len__(self) -> int:
        full = len(range(self.rank, self.size, self.world)) if not self.shuffle else self.size // self.world
        return max(full - self.start, 0)


def make_loader(
    dataset: ClipDataset,
    batch_size: int,
    train: bool,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`~dclsify.pipeline.sources.Batch` es over this rank's shard.

    Training batches are all full (the last partial one is dropped: static shapes);
    evaluation keeps every clip.
    """
    sampler = ShardSampler(len(dataset), rank, world, shuffle=train, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
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
