"""What a model hears: the clip format and the log-mel front-end's settings, as plain numbers.

They live here, below the pipeline, because a checkpoint records them (:func:`~dclsify.save`,
:func:`~dclsify.load`): the front-end that computes with them is
:class:`~dclsify.pipeline.frontend.LogMel`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class AudioConfig:
    """What a model hears: the clip format and the log-mel front-end. Stored with every
    checkpoint, so that evaluation and inference feed the model exactly what it was trained on."""

    sample_rate: int = 32000
    seconds: float = 10.0
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 128
    f_min: float = 50.0
    f_max: float | None = None  # None: 14000 Hz, or the Nyquist frequency if lower
    mean: float = -18.2696
    std: float = 30.5735

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"audio.{name} must be a positive integer, got {value!r}")
        if not self.seconds > 0:
            raise ValueError(f"audio.seconds must be positive, got {self.seconds!r}")
        if not 0 <= self.f_min < self.top_frequency <= self.sample_rate / 2:
            raise ValueError(
                f"audio.f_min and f_max must satisfy 0 <= f_min < f_max <= sample_rate/2 = {self.sample_rate / 2:g}, "
                f"got {self.f_min:g} and {self.top_frequency:g}"
            )
        if not self.std > 0:
            raise ValueError(f"audio.std must be positive, got {self.std!r}")
        if self.samples < self.n_fft:
            raise ValueError(f"a clip of {self.seconds:g} s is shorter than one n_fft frame ({self.n_fft} samples)")

    @property
    def top_frequency(self) -> float:
        """The mel filters' upper edge: f_max, or by default 14 kHz (the Nyquist frequency if lower)."""
        return self.f_max if self.f_max is not None else min(14000.0, self.sample_rate / 2)

    @property
    def samples(self) -> int:
        """Samples in one clip."""
        return round(self.sample_rate * self.seconds)

    @property
    def frames(self) -> int:
        """Spectrogram frames of one clip (centred STFT): 1001 for 10 s at hop 320."""
        return self.samples // self.hop_length + 1

    @property
    def input_size(self) -> tuple[int, int]:
        """(mels, frames): the model's input size."""
        return self.n_mels, self.frames

    def as_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_dict(cls, data: dict) -> AudioConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown audio settings {unknown}; known: {sorted(known)}")
        return cls(**data)
