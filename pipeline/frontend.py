"""Waveform to normalised log-mel spectrogram, batched, on the training device (Table 2 of the paper).

The chain is torchaudio's ``Spectrogram -> MelScale -> AmplitudeToDB``, then a fixed
normalisation, with the settings of an :class:`~dclsify.surgery.audio.AudioConfig`. It is split
in two halves, :meth:`LogMel.power` and :meth:`LogMel.from_power`, because the paper's random
erasing acts on the linear power spectrogram between them.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

from ..surgery.audio import AudioConfig

INT16_SCALE = 32768.0


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
