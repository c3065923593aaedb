"""Waveform to normalised log-mel spectrogram, batched, on the training device (Table 2 of the paper).

The chain is torchaudio's ``Spectrogram -> MelScale -> AmplitudeToDB``, then a fixed
normalisation. It is split in two halves, :meth:`LogMel.power` and :meth:`LogMel.from_power`,
because the paper's random erasing acts on the linear power spectrogram between them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch
import torchaudio
from torch import Tensor, nn

INT16_SCALE = 32768.0


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


def as_float(waveforms: Tensor) -> Tensor:
    """Waveforms as float32 in [-1, 1]: int16 scaled by 1/32768, float taken as it is."""
    return waveforms.float() / INT16_SCALE if waveforms.dtype == torch.int16 else waveforms.float()


class LogMel(nn.Module):
    """(batch, samples) int16 or float waveforms -> (batch, 1, n_mels, frames) normalised log-mels.

    int16 input is scaled by 1/32768 (float input is taken as already in [-1, 1]). The STFT,
    the mel projection and the logarithm run in float32 even under autocast: a bf16 power
    spectrogram would lose the quiet bins that the dB scale makes visible.
    """

    def __init__(self, config: AudioConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AudioConfig()
        self.spectrogram = torchaudio.transforms.Spectrogram(n_fft=config.n_fft, hop_length=config.hop_length, power=2)
        self.mel = torchaudio.transforms.MelScale(
            n_mels=config.n_mels,
            sample_rate=config.sample_rate,
            f_min=config.f_min,
            f_max=config.top_frequency,
            n_stft=config.n_fft // 2 + 1,
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power")

    def power(self, waveforms: Tensor) -> Tensor:
        """(batch, samples) -> (batch, n_fft // 2 + 1, frames) linear power spectrogram, float32."""
        with torch.autocast(waveforms.device.type, enabled=False):
            return self.spectrogram(as_float(waveforms))

    def from_power(self, power: Tensor) -> Tensor:
        """Linear power spectrogram -> (batch, 1, n_mels, frames) normalised log-mel, float32."""
        with torch.autocast(power.device.type, enabled=False):
            db = self.to_db(self.mel(power.float()))
            return ((db - self.config.mean) / self.config.std).unsqueeze(1)

    def forward(self, waveforms: Tensor) -> Tensor:
        return self.from_power(self.power(waveforms))
