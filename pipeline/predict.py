"""Tagging sounds with a trained checkpoint: ``Tagger(checkpoint)(path_or_waveform)``.

A file of any format, rate and length is decoded, mixed to mono and resampled to the
rate the model was trained at; it is cut into windows of the model's clip length (a hop
apart, the last one flush with the end; a shorter sound is one zero-padded window), each
window is scored (sigmoids, or a softmax for a single-label model) and the windows'
scores are pooled (max or mean) into the sound's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .frontend import AudioConfig, LogMel
from .sources import AUDIO_EXTENSIONS, numbered_classes, read_mono, resample, to_clip

POOLINGS = ("max", "mean")


@dataclass
class Prediction:
    """The scores of one sound: ``scores`` (one per class, pooled over ``windows`` windows)."""

    source: str
    seconds: float
    windows: int
    scores: np.ndarray
    class_names: list[str]

    def top(self, k: int = 5, threshold: float | None = None) -> list[tuple[str, float]]:
        """The ``k`` best (class name, score) pairs, those at least ``threshold`` if given."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [
            (self.class_names[i], float(self.scores[i]))
            for i in order
            if threshold is None or self.scores[i] >= threshold
        ]

    def as_dict(self, k: int = 5, threshold: float | None = None) -> dict:
        labels = [{"label": name, "score": score} for name, score in self.top(k, threshold)]
        return {"source": self.source, "seconds": self.seconds, "windows": self.windows, "labels": labels}


def audio_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and the sound files found in folders (recursively, sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        else:
            found.append(path)
    return found


class Tagger:
    """A checkpoint ready to tag sounds.

    ``Tagger("best.safetensors")("dog.wav").top(5)``, or with a waveform:
    ``tagger(tensor, sample_rate=44100)``. The clip length, sample rate, log-mel settings
    and class names come from the checkpoint; the model's Dcls2d kernels are baked once.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str | torch.device = "cpu",
        pooling: str = "max",
        hop_seconds: float | None = None,
        batch_size: int = 16,
        trust_code: bool = False,
    ) -> None:
        from dclsify.surgery.checkpoint import load
        from dclsify.surgery.dcls import bake

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.device = torch.device(device)
        model = load(checkpoint, device=self.device, trust_code=trust_code)
        self.audio: AudioConfig = model.audio or AudioConfig()
        self.multi_label = True if model.multi_label is None else model.multi_label
        self.class_names = model.class_names or numbered_classes(model.dclsify.config.num_classes or 0)
        self.model = bake(model).eval()
        self.frontend = LogMel(self.audio).to(self.device)
        self.pooling, self.batch_size = pooling, batch_size
        hop = self.audio.seconds / 2 if hop_seconds is None else hop_seconds
        if not 0 < hop <= self.audio.seconds:
            raise ValueError(f"the hop must be in (0, {self.audio.seconds:g}] s, got {hop:g}")
        self.hop = max(1, round(hop * self.audio.sample_rate))

    def windows(self, mono: np.ndarray) -> torch.Tensor:
        """(windows, samples) int16 clips covering ``mono`` (float, at the model's rate)."""
        length = self.audio.samples
        starts = list(range(0, max(len(mono) - length, 0) + 1, self.hop))
        if len(mono) > length and starts[-1] + length < len(mono):
            starts.append(len(mono) - length)  # the last window ends with the sound
        return torch.from_numpy(np.stack([to_clip(mono[start : start + length], length) for start in starts]))

    def __call__(self, sound, sample_rate: int | None = None) -> Prediction:
        """Scores of a sound: a file path, or a waveform (channels x samples, or samples) with its rate."""
        if isinstance(sound, (str, os.PathLike)):
            mono, source = read_mono(sound, self.audio.sample_rate), str(sound)
        else:
            if sample_rate is None:
                raise ValueError("a waveform needs its sample_rate")
            waveform = torch.as_tensor(sound, dtype=torch.float32)
            waveform = waveform.mean(0) if waveform.ndim == 2 else waveform
            mono, source = resample(waveform.numpy(), int(sample_rate), self.audio.sample_rate), "<waveform>"
        clips = self.windows(mono)
        scores = []
        with torch.no_grad():
            for start in range(0, len(clips), self.batch_size):
                logits = self.model(self.frontend(clips[start : start + self.batch_size].to(self.device))).float()
                scores.append(torch.sigmoid(logits) if self.multi_label else logits.softmax(-1))
        scores = torch.cat(scores)
        pooled = scores.amax(0) if self.pooling == "max" else scores.mean(0)
        return Prediction(
            source, len(mono) / self.audio.sample_rate, len(clips), pooled.cpu().numpy(), self.class_names
        )

    def predict_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[Prediction | tuple[str, str]]:
        """A :class:`Prediction` per file, or ``(path, reason)`` for a file that cannot be read."""
        from .sources import ClipError

        for path in paths:
            try:
                yield self(path)
            except ClipError as error:
                yield str(path), str(error)
