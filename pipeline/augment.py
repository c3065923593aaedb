"""Table 2's training augmentations, on whole batches, on the training device.

In the order of the paper's code (NOTES.md section 6): random roll of the waveform,
speed perturbation, the power spectrogram, random erasing on it, the log-mel, label
smoothing and mixup. Every random draw is a handful of numbers per clip, taken from one
seeded NumPy generator whose state travels with a checkpoint: a run resumes exactly.
The per-sample work (rolling, resampling, masking, mixing) is tensor code over the batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frontend import INT16_SCALE, LogMel


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and how strongly (defaults: the paper's). A probability of 0
    (or ``roll=False``, ``mixup_alpha=0``, ``label_smoothing=0``) switches one off."""

    roll: bool = True  # roll the waveform by a random shift (p 1)
    speed_p: float = 0.5  # resample by a random rate...
    speed_min: float = 0.5  # ...uniform in [speed_min, speed_max]
    speed_max: float = 1.5
    erase_p: float = 0.25  # one random box of the power spectrogram set to 0 (timm's RandomErasing, const)
    erase_min_area: float = 0.02
    erase_max_area: float = 1 / 3
    mixup_alpha: float = 0.8  # lambda ~ Beta(alpha, alpha), one per batch
    label_smoothing: float = 0.1  # y (1 - s) + s / classes, before mixup

    def __post_init__(self) -> None:
        for name in ("speed_p", "erase_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.speed_min <= self.speed_max:
            raise ValueError(
                f"augment.speed_min/max must satisfy 0 < min <= max, got {self.speed_min}, {self.speed_max}"
            )
        if not 0 < self.erase_min_area <= self.erase_max_area <= 1:
            raise ValueError("augment.erase_min_area/max_area must satisfy 0 < min <= max <= 1")
        if self.mixup_alpha < 0:
            raise ValueError(f"augment.mixup_alpha must be >= 0, got {self.mixup_alpha}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"augment.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation at all (what evaluation sees)."""
        return cls(roll=False, speed_p=0, erase_p=0, mixup_alpha=0, label_smoothing=0)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def roll(waveforms: Tensor, shifts: Tensor) -> Tensor:
    """``torch.roll`` of each row by its own shift: ``out[b, n] = x[b, (n - shifts[b]) % samples]``.

    Each row is one window of the row repeated twice, picked from an unfolded view, so
    nothing of the batch's size is built besides the output.
    """
    samples = waveforms.shape[-1]
    starts = (-shifts) % samples
    doubled = torch.cat([waveforms, waveforms], dim=-1)
    windows = doubled.unfold(-1, samples, 1)  # (batch, samples + 1, samples), a view
    return windows[torch.arange(len(waveforms), device=waveforms.device), starts]


def change_speed(waveforms: Tensor, rates: Tensor, offsets: Tensor) -> Tensor:
    """Play each row ``rates[b]`` times faster: ``out[b, n] = x[b](rates[b] * (n - offsets[b]))``,
    linearly interpolated, zero outside the row; the length is kept, so a sped-up row is
    padded (the sound starts at ``offsets[b] >= 0``) and a slowed one is cut (``offsets[b] <= 0``).

    A row sped up is first low-passed below its new Nyquist frequency (one batched FFT), so
    that no aliasing folds its top octave back into the spectrum.
    """
    batch, samples = waveforms.shape
    faster = rates > 1
    if bool(faster.any()):
        spectrum = torch.fft.rfft(waveforms[faster])
        bins = torch.arange(spectrum.shape[-1], device=waveforms.device)
        keep = bins[None, :] < (spectrum.shape[-1] / rates[faster])[:, None]
        filtered = torch.fft.irfft(spectrum * keep, n=samples)
        waveforms = waveforms.clone()
        waveforms[faster] = filtered
    n = torch.arange(samples, device=waveforms.device, dtype=torch.float32)
    positions = rates[:, None] * (n[None, :] - offsets[:, None])  # (batch, samples), in input samples
    grid = torch.stack([positions * (2 / (samples - 1)) - 1, torch.zeros_like(positions)], dim=-1)
    moved = F.grid_sample(
        waveforms[:, None, None, :], grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return moved[:, 0, 0]


def erase_boxes(spectrograms: Tensor, boxes: Tensor) -> Tensor:
    """Set one box per row of (batch, freq, time) to 0; ``boxes`` is (batch, 4): top, height,
    left, width (a height of 0 erases nothing)."""
    _, height, width = spectrograms.shape
    rows = torch.arange(height, device=spectrograms.device)[None, :, None]
    cols = torch.arange(width, device=spectrograms.device)[None, None, :]
    top, tall, left, wide = (boxes[:, i, None, None] for i in range(4))
    mask = (rows >= top) & (rows < top + tall) & (cols >= left) & (cols < left + wide)
    return spectrograms.masked_fill(mask, 0)


class Augment(nn.Module):
    """int16 waveforms and bool targets -> augmented normalised log-mels and soft targets.

    ``Augment(frontend, config, seed)(waveforms, targets)`` on a training batch, on the
    device of ``waveforms``. Give each distributed rank its own seed.
    """

    def __init__(self, frontend: LogMel, config: AugmentConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.frontend = frontend
        self.config = config or AugmentConfig()
        self.rng = np.random.default_rng(seed)

    def get_rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def _tensor(self, values, like: Tensor, dtype=torch.float32) -> Tensor:
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(like.device, non_blocking=True)

    def waveforms(self, waveforms: Tensor) -> Tensor:
        """Roll and speed perturbation: (batch, samples) int16 or float -> float in [-1, 1]."""
        x = waveforms.float() / INT16_SCALE if waveforms.dtype == torch.int16 else waveforms.float()
        batch, samples = x.shape
        c = self.config
        if c.roll:
            x = roll(x, self._tensor(self.rng.integers(-samples, samples, batch), x, torch.int64))
        chosen = self.rng.random(batch) < c.speed_p
        rates = np.where(chosen, self.rng.uniform(c.speed_min, c.speed_max, batch), 1.0)
        if chosen.any():
            span = samples - samples / rates  # > 0: room to place a shorter sound; < 0: how much to cut
            offsets = self.rng.uniform(np.minimum(span, 0), np.maximum(span, 0))
            index = np.flatnonzero(chosen)
            picked = self._tensor(index, x, torch.int64)
            x = x.clone()
            x[picked] = change_speed(x[picked], self._tensor(rates[index], x), self._tensor(offsets[index], x))
        return x

    def _boxes(self, batch: int, height: int, width: int) -> np.ndarray:
        """timm's RandomErasing boxes (one per erased clip, ten tries to fit), drawn for a whole batch."""
        c, tries = self.config, 10
        boxes = np.zeros((batch, 4), dtype=np.int64)
        chosen = self.rng.random(batch) < c.erase_p
        area = height * width * self.rng.uniform(c.erase_min_area, c.erase_max_area, (batch, tries))
        ratio = np.exp(self.rng.uniform(math.log(0.3), math.log(1 / 0.3), (batch, tries)))
        tall, wide = np.rint(np.sqrt(area * ratio)).astype(int), np.rint(np.sqrt(area / ratio)).astype(int)
        fits = (tall < height) & (wide < width)
        corner = self.rng.random((batch, 2))
        for b in np.flatnonzero(chosen & fits.any(axis=1)):
            t = int(np.argmax(fits[b]))  # the first try that fits
            top, left = int(corner[b, 0] * (height - tall[b, t] + 1)), int(corner[b, 1] * (width - wide[b, t] + 1))
            boxes[b] = top, tall[b, t], left, wide[b, t]
        return boxes

    def spectrograms(self, power: Tensor) -> Tensor:
        """Random erasing of the linear power spectrogram (batch, freq, time)."""
        if self.config.erase_p == 0:
            return power
        boxes = self._boxes(*power.shape)
        return erase_boxes(power, self._tensor(boxes, power, torch.int64)) if boxes[:, 1].any() else power

    def mixup(self, logmels: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Label smoothing, then one Beta(alpha, alpha) mix of the batch with a permutation of itself."""
        c = self.config
        soft = targets.float() * (1 - c.label_smoothing) + c.label_smoothing / targets.shape[-1]
        if c.mixup_alpha == 0:
            return logmels, soft
        lam = float(self.rng.beta(c.mixup_alpha, c.mixup_alpha))
        partner = self._tensor(self.rng.permutation(len(logmels)), logmels, torch.int64)
        return lam * logmels + (1 - lam) * logmels[partner], lam * soft + (1 - lam) * soft[partner]

    def forward(self, waveforms: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        power = self.spectrograms(self.frontend.power(self.waveforms(waveforms)))
        return self.mixup(self.frontend.from_power(power), targets)
