"""Table 2's training augmentations, on whole batches, on the training device.

In the order of the paper's code (NOTES.md section 6): random roll of the waveform,
speed perturbation, the power spectrogram, random erasing on it, the log-mel, label
smoothing and mixup. Every random tensor is drawn on the device, from one seeded
``torch.Generator``, and the few plain numbers (how many rows to perturb, mixup's lambda)
on the host from a seeded NumPy generator, so a batch is augmented without a single
host-device synchronisation; both generators' states travel with a checkpoint, and a
run resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frontend import LogMel, as_float

SPEED_MODES = ("filtered", "paper")


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
    # how speed perturbation resamples: "filtered" (change_speed: a band-limited change of speed) or
    # "paper" (stretch_nearest: the authors' nearest-neighbour stretch to rate x the length, unfiltered)
    speed_mode: str = "filtered"

    def __post_init__(self) -> None:
        if self.speed_mode not in SPEED_MODES:
            raise ValueError(f"augment.speed_mode must be one of {', '.join(SPEED_MODES)}, got {self.speed_mode!r}")
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


def low_pass(waveforms: Tensor, fractions: Tensor) -> Tensor:
    """Keep each row's frequencies below ``fractions[b]`` of the Nyquist frequency (one batched FFT)."""
    spectrum = torch.fft.rfft(waveforms)
    bins = torch.arange(spectrum.shape[-1], device=waveforms.device)
    return torch.fft.irfft(spectrum * (bins[None, :] < spectrum.shape[-1] * fractions[:, None]), n=waveforms.shape[-1])


def change_speed(waveforms: Tensor, rates: Tensor, offsets: Tensor) -> Tensor:
    """Play each row ``rates[b]`` times faster: ``out[b, n] = x[b](rates[b] * (n - offsets[b]))``,
    linearly interpolated, zero outside the row; the length is kept, so a sped-up row is
    padded (the sound starts at ``offsets[b] >= 0``) and a slowed one is cut (``offsets[b] <= 0``).

    Band-limited as a resampler should be: a row sped up is low-passed below its new Nyquist
    frequency first (else its top folds back as aliases), a row slowed down is low-passed
    to its new bandwidth after (else linear interpolation leaves images of its spectrum above
    it). Both are batched FFTs over every row, no-ops where they do not apply.
    """
    samples = waveforms.shape[-1]
    waveforms = low_pass(waveforms, 1 / rates.clamp(min=1))
    n = torch.arange(samples, device=waveforms.device, dtype=torch.float32)
    positions = rates[:, None] * (n[None, :] - offsets[:, None])  # (batch, samples), in input samples
    grid = torch.stack([positions * (2 / (samples - 1)) - 1, torch.zeros_like(positions)], dim=-1)
    moved = F.grid_sample(
        waveforms[:, None, None, :], grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return low_pass(moved[:, 0, 0], rates.clamp(max=1))


def stretch_nearest(waveforms: Tensor, rates: Tensor, offsets: Tensor) -> Tensor:
    """DCLS-Audio's speed perturbation (their ``augmentations.SpeedPerturbation``), batched: each
    row of length ``n`` stretched to ``m = ceil(n * rates[b])`` samples by nearest neighbour,
    without a filter, then placed at ``offsets[b]`` in a row of length ``n``::

        stretched[i] = x[min(round(i / r), n - 1)]   for 0 <= i < m   (round half to even)
        out[j] = stretched[j - offset] if 0 <= j - offset < m else 0

    ``offsets[b] >= 0`` (integers): that many zeros before a shorter row (``rates[b] < 1``), their
    random left pad, which they draw uniformly in ``0 .. n - m``; ``offsets[b] <= 0``: a longer
    row (``rates[b] > 1``) cropped from its sample ``-offsets[b]``, their random crop start, which
    they draw in ``0 .. m - n - 1`` (never ``m - n``: the stretched row's last sample never
    survives). Positions are computed in float64; theirs come from a float32 ``torch.arange``,
    whose rounding (1/32 of a sample at 10 s) moves a few taps to the neighbouring sample.
    """
    samples = waveforms.shape[-1]
    rates = rates.double()
    lengths = torch.ceil(samples * rates).long()
    taps = torch.arange(samples, device=waveforms.device)[None, :] - offsets.long()[:, None]
    sources = (taps / rates[:, None]).round().long().clamp(0, samples - 1)
    inside = (taps >= 0) & (taps < lengths[:, None])
    return torch.where(inside, waveforms.gather(-1, sources), 0)


def erase_boxes(spectrograms: Tensor, boxes: Tensor) -> Tensor:
    """Set one box per row of (batch, freq, time) to 0; ``boxes`` is (batch, 4): top, height,
    left, width (a height of 0 erases nothing)."""
    _, height, width = spectrograms.shape
    rows = torch.arange(height, device=spectrograms.device)[None, :]
    cols = torch.arange(width, device=spectrograms.device)[None, :]
    top, tall, left, wide = (boxes[:, i, None] for i in range(4))
    in_rows, in_cols = (rows >= top) & (rows < top + tall), (cols >= left) & (cols < left + wide)
    return spectrograms.masked_fill(in_rows[:, :, None] & in_cols[:, None, :], 0)


class Augment(nn.Module):
    """int16 waveforms and bool targets -> augmented normalised log-mels and soft targets.

    ``Augment(frontend, config, seed)(waveforms, targets)`` on a training batch, on the
    device of ``waveforms``. Give each distributed rank its own seed.
    """

    def __init__(self, frontend: LogMel, config: AugmentConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.frontend = frontend
        self.config = config or AugmentConfig()
        self.seed = seed
        self.generator: torch.Generator | None = None  # made on the device of the first batch
        self.host_rng = np.random.default_rng(seed)  # for plain numbers: row counts and mixup's lambda

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device.type != device.type:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def get_rng_state(self) -> dict:
        """Both generators' states (plain tensors and numbers: checkpoints load them with weights_only)."""
        generator = self.generator
        return {
            "device": None if generator is None else generator.device.type,
            "torch": None if generator is None else generator.get_state(),
            "host": self.host_rng.bit_generator.state,
        }

    def set_rng_state(self, state: dict) -> None:
        self.host_rng.bit_generator.state = state["host"]
        self.generator = None
        if state["torch"] is not None:
            self.generator = torch.Generator(device=state["device"])
            self.generator.set_state(state["torch"])

    def _uniform(self, low, high, shape, like: Tensor) -> Tensor:
        drawn = torch.rand(shape, generator=self._generator_on(like.device), device=like.device)
        return low + (high - low) * drawn

    def waveforms(self, waveforms: Tensor) -> Tensor:
        """Roll and speed perturbation: (batch, samples) int16 or float -> float in [-1, 1]."""
        x = as_float(waveforms)
        batch, samples = x.shape
        c = self.config
        generator = self._generator_on(x.device)
        if c.roll:
            x = roll(x, torch.randint(-samples, samples, (batch,), generator=generator, device=x.device))
        chosen = self._chosen(batch, c.speed_p, x)
        if len(chosen) and c.speed_mode == "paper":
            rates, offsets = self._paper_speed(len(chosen), samples, x)
            x = x.index_copy(0, chosen, stretch_nearest(x[chosen], rates, offsets))
        elif len(chosen):
            rates = self._uniform(c.speed_min, c.speed_max, len(chosen), x)
            span = samples - samples / rates  # > 0: room to place a shorter sound; < 0: how much to cut
            offsets = self._uniform(span.clamp(max=0), span.clamp(min=0), len(chosen), x)
            x = x.index_copy(0, chosen, change_speed(x[chosen], rates, offsets))
        return x

    def _paper_speed(self, count: int, samples: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Rates and offsets for :func:`stretch_nearest`, drawn as DCLS-Audio draws them: r uniform in
        [speed_min, speed_max); a shorter row's left pad uniform in 0 .. n - m, a longer row's crop
        start uniform in 0 .. m - n - 1 (``torch.randint``'s exclusive high)."""
        c = self.config
        rates = self._uniform(c.speed_min, c.speed_max, count, like)
        lengths = torch.ceil(samples * rates.double())  # stretch_nearest's m, computed as it does
        choices = torch.where(lengths <= samples, samples - lengths + 1, lengths - samples)  # >= 1 either way
        drawn = (self._uniform(0, 1, count, like).double() * choices).floor().clamp(max=choices - 1)
        return rates, torch.where(lengths <= samples, drawn, -drawn).long()

    def _chosen(self, batch: int, p: float, like: Tensor) -> Tensor:
        """Which rows an augmentation of probability ``p`` takes: a random subset whose size the
        host draws (``p * batch``, rounded up or down at random so that each row's chance is
        ``p``), so that the work is done on those rows only and no host waits for the device."""
        if p == 0:
            return torch.zeros(0, dtype=torch.int64, device=like.device)
        count = int(p * batch + self.host_rng.random())
        return torch.randperm(batch, generator=self._generator_on(like.device), device=like.device)[:count]

    def _boxes(self, batch: int, height: int, width: int, like: Tensor) -> Tensor:
        """timm's RandomErasing boxes (top, height, left, width; one per erased clip, the first of
        ten tries that fits), drawn for a whole batch; a height of 0 erases nothing."""
        c, tries = self.config, 10
        chosen = self._uniform(0, 1, batch, like) < c.erase_p
        area = height * width * self._uniform(c.erase_min_area, c.erase_max_area, (batch, tries), like)
        ratio = torch.exp(self._uniform(math.log(0.3), math.log(1 / 0.3), (batch, tries), like))
        tall, wide = torch.sqrt(area * ratio).round().long(), torch.sqrt(area / ratio).round().long()
        fits = (tall < height) & (wide < width)
        first = fits.int().argmax(dim=1, keepdim=True)
        tall, wide = tall.gather(1, first)[:, 0], wide.gather(1, first)[:, 0]
        corner = self._uniform(0, 1, (batch, 2), like)
        top, left = (corner[:, 0] * (height - tall + 1)).long(), (corner[:, 1] * (width - wide + 1)).long()
        tall = torch.where(chosen & fits.any(dim=1), tall, 0)
        return torch.stack([top, tall, left, wide], dim=1)

    def spectrograms(self, power: Tensor) -> Tensor:
        """Random erasing of the linear power spectrogram (batch, freq, time)."""
        if self.config.erase_p == 0:
            return power
        return erase_boxes(power, self._boxes(*power.shape, power))

    def mixup(self, logmels: Tensor, targets: Tensor, *extra: Tensor) -> tuple[Tensor, ...]:
        """Label smoothing, then one Beta(alpha, alpha) mix of the batch with a permutation of itself.

        ``extra`` soft targets (a teacher's, for distillation) are mixed with the same lambda and
        permutation, unsmoothed, and returned after the labels; they draw nothing, so a batch
        augments alike with or without them."""
        c = self.config
        soft = targets.float() * (1 - c.label_smoothing) + c.label_smoothing / targets.shape[-1]
        if c.mixup_alpha == 0:
            return logmels, soft, *extra
        lam = float(self.host_rng.beta(c.mixup_alpha, c.mixup_alpha))  # a number for the kernels, not a tensor
        partner = torch.randperm(len(logmels), generator=self._generator_on(logmels.device), device=logmels.device)
        mixed = (lam * other + (1 - lam) * other[partner] for other in extra)
        return lam * logmels + (1 - lam) * logmels[partner], lam * soft + (1 - lam) * soft[partner], *mixed

    def forward(self, waveforms: Tensor, targets: Tensor, *extra: Tensor) -> tuple[Tensor, ...]:
        """(log-mels, soft targets) of a batch, and its ``extra`` soft targets mixed alike (see :meth:`mixup`)."""
        power = self.spectrograms(self.frontend.power(self.waveforms(waveforms)))
        return self.mixup(self.frontend.from_power(power), targets, *extra)
