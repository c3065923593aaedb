"""A generated, seeded, multi-label sound set: the data of ``dclsify demo``.

Fourteen classes of synthetic sound events whose log-mel pictures differ in shape, not
only in pitch (steady lines, sweeps, wiggles, stacks of partials, bands of noise, trains
of vertical lines, decays). Each clip mixes one to three events of different classes, at
random times and levels, over a quiet noise floor; its target marks the classes present.
:func:`make_sound_set` writes a train and an eval split as HDF5 files in the layout that
:func:`~dclsify.pipeline.pack.pack` writes, so every command reads them like packed data.

Everything is drawn from the seed: clip ``i`` of a split comes from its own generator,
seeded by ``(seed, split, i)``, so the same seed gives byte-identical files (on one
machine and NumPy version: NumPy's sine and exponential may round differently elsewhere).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..surgery.files import atomic_path
from .frontend import AudioConfig
from .pack import layout_attributes
from .sources import to_clip

# Sized for the demo, which trains two small models in under 10 minutes on a 2-core CPU:
# 2-second clips at 16 kHz (the front-end is AudioConfig(sample_rate=16000, seconds=2.0):
# f_max 8 kHz, 101 frames), 1500 clips to train on and 400 held out.
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
TRAIN_CLIPS = 1500
EVAL_CLIPS = 400

EVENTS_PER_CLIP = (1, 3)  # fewest, most
LEVEL_DB = (-20.0, 0.0)  # an event's level, relative to REFERENCE_RMS
REFERENCE_RMS = 0.1  # an event at 0 dB: -20 dBFS RMS, so that three loud events seldom clip
PEAK_LIMIT = 0.5  # and no event peaks above this at 0 dB (a sparse click train has a high peak for its RMS)
NOISE_FLOOR_DBFS = (-65.0, -50.0)  # RMS of the white noise under every clip
MIN_SAMPLE_RATE = 8000  # the highest sounds reach 3.6 kHz
SPLITS = ("train", "eval")
WRITE_ROWS = 256  # clips generated per write to the HDF5 file

Render = Callable[[np.random.Generator, np.ndarray, int], tuple[np.ndarray, dict]]


@dataclass(frozen=True)
class SoundClass:
    name: str
    description: str
    seconds: tuple[float, float]  # shortest and longest event
    render: Render  # (rng, time axis in s, sample rate) -> (signal, the parameters drawn)
    percussive: bool = False  # sharp onset: no fade-in


@dataclass(frozen=True)
class Event:
    """One sound placed in a clip: its class index, start and length (s), level (dB), and
    the parameters its generator drew (e.g. ``{"frequency": 440.0}`` for a tone)."""

    label: int
    start: float
    seconds: float
    level_db: float
    parameters: dict = field(default_factory=dict, compare=False)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _sweep_phase(t: np.ndarray, start_hz: float, end_hz: float) -> np.ndarray:
    """Phase of a tone gliding exponentially from ``start_hz`` to ``end_hz`` over ``t``."""
    length = t[-1] + (t[1] - t[0])  # events have two samples or more
    ratio = end_hz / start_hz
    if abs(ratio - 1) < 1e-9:
        return 2 * np.pi * start_hz * t
    return 2 * np.pi * start_hz * length / math.log(ratio) * (ratio ** (t / length) - 1)


def _partials(t: np.ndarray, frequencies: np.ndarray, amplitudes: np.ndarray, rng) -> np.ndarray:
    """Sum of sines, one row per partial, each with a random phase; amplitudes (K,) or (K, samples)."""
    phases = rng.uniform(0, 2 * np.pi, (len(frequencies), 1))
    return (amplitudes * np.sin(2 * np.pi * frequencies[:, None] * t + phases)).sum(axis=0)


def _band_noise(rng, samples: int, sample_rate: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """White noise shaped in the frequency domain by ``gain(frequencies in Hz)``."""
    from scipy.fft import irfft, next_fast_len, rfft, rfftfreq

    length = next_fast_len(samples, real=True)  # an event's length may be prime: FFTs of those are slow
    spectrum = rfft(rng.standard_normal(length))
    return irfft(spectrum * gain(rfftfreq(length, 1 / sample_rate)), length)[:samples]


def _tone(rng, t, sample_rate):
    frequency = _log_uniform(rng, 300, 3000)
    return np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi)), {"frequency": frequency}


def _rising_chirp(rng, t, sample_rate):
    start = _log_uniform(rng, 200, 700)
    end = min(start * rng.uniform(3, 8), 0.4 * sample_rate)
    return np.sin(_sweep_phase(t, start, end)), {"start_hz": start, "end_hz": end}


def _falling_chirp(rng, t, sample_rate):
    end = _log_uniform(rng, 200, 700)
    start = min(end * rng.uniform(3, 8), 0.4 * sample_rate)
    return np.sin(_sweep_phase(t, start, end)), {"start_hz": start, "end_hz": end}


def _harmonic_stack(rng, t, sample_rate):
    fundamental = _log_uniform(rng, 120, 400)
    numbers = np.arange(1, int(rng.integers(6, 13)) + 1)
    numbers = numbers[numbers * fundamental < 0.45 * sample_rate]
    return _partials(t, numbers * fundamental, 1 / numbers[:, None], rng), {"fundamental": fundamental}


def _noise_burst(rng, t, sample_rate):
    centre = _log_uniform(rng, 500, min(4000, 0.3 * sample_rate))
    low, high = centre / math.sqrt(2), centre * math.sqrt(2)  # one octave
    signal = _band_noise(rng, len(t), sample_rate, lambda f: ((f >= low) & (f <= high)).astype(float))
    return signal, {"low_hz": low, "high_hz": high}


def _click_train(rng, t, sample_rate):
    rate = rng.uniform(6, 25)
    impulses = np.zeros(len(t))
    impulses[np.round(np.arange(0, t[-1], 1 / rate) * sample_rate).astype(int)] = 1
    click_t = np.arange(round(0.003 * sample_rate)) / sample_rate
    click = rng.standard_normal(len(click_t)) * np.exp(-click_t / 0.0007)  # a 3 ms broadband tick
    return np.convolve(impulses, click)[: len(t)], {"rate_hz": rate}


def _pulsing_tone(rng, t, sample_rate):
    carrier, rate = _log_uniform(rng, 400, 3000), rng.uniform(4, 10)
    gate = (0.5 - 0.5 * np.cos(2 * np.pi * rate * t)) ** 2  # separate pulses, not a gentle tremolo
    return gate * np.sin(2 * np.pi * carrier * t), {"frequency": carrier, "rate_hz": rate}


def _vibrato_tone(rng, t, sample_rate):
    carrier, rate, depth = _log_uniform(rng, 400, 2500), rng.uniform(5, 8), rng.uniform(0.03, 0.07)
    phase = 2 * np.pi * carrier * t - depth * carrier / rate * np.cos(2 * np.pi * rate * t)
    return np.sin(phase), {"frequency": carrier, "rate_hz": rate, "depth": depth}


def _siren(rng, t, sample_rate):
    centre, rate, depth = _log_uniform(rng, 500, 1100), rng.uniform(0.5, 1.5), rng.uniform(0.25, 0.4)
    offset = rng.uniform(0, 2 * np.pi)
    # instantaneous frequency centre * (1 + depth * sin(2 pi rate t + offset)), three partials
    phase = 2 * np.pi * centre * t - depth * centre / rate * np.cos(2 * np.pi * rate * t + offset)
    return sum(np.sin(k * phase) / k for k in (1, 2, 3)), {"frequency": centre, "rate_hz": rate, "depth": depth}


def _plucked_string(rng, t, sample_rate):
    fundamental, decay = _log_uniform(rng, 150, 700), rng.uniform(0.15, 0.5)
    numbers = np.arange(1, 11)
    numbers = numbers[numbers * fundamental < 0.45 * sample_rate]
    amplitudes = np.exp(-t / (decay / numbers[:, None] ** 0.8)) / numbers[:, None]  # high partials die first
    return _partials(t, numbers * fundamental, amplitudes, rng), {"fundamental": fundamental, "decay_s": decay}


def _drum_hit(rng, t, sample_rate):
    start, end = rng.uniform(160, 260), rng.uniform(65, 100)
    glide, decay = rng.uniform(0.02, 0.05), rng.uniform(0.1, 0.25)
    phase = 2 * np.pi * (end * t + (start - end) * glide * (1 - np.exp(-t / glide)))  # pitch falls start -> end
    body = np.sin(phase) * np.exp(-t / decay)
    beater = 0.3 * rng.standard_normal(len(t)) * np.exp(-t / 0.004)
    return body + beater, {"start_hz": start, "end_hz": end, "decay_s": decay}


def _rumble(rng, t, sample_rate):
    cutoff = rng.uniform(150, 400)
    signal = _band_noise(
        rng, len(t), sample_rate, lambda f: np.where((f >= 25) & (f <= cutoff), 1 / np.maximum(f, 1), 0)
    )
    return signal, {"cutoff_hz": cutoff}


def _bird_trill(rng, t, sample_rate):
    rate = rng.uniform(6, 12)
    length = min(rng.uniform(0.03, 0.06), 0.7 / rate)
    start = _log_uniform(rng, 2000, 3500)
    end = min(start * rng.uniform(1.3, 1.8), 0.45 * sample_rate)
    local = np.mod(t, 1 / rate)  # time since this tweet began
    inside = local < length
    phase = 2 * np.pi * (start * local + (end - start) * local**2 / (2 * length))  # a linear up-sweep
    envelope = np.where(inside, np.sin(np.pi * np.minimum(local / length, 1)), 0)
    return envelope * np.sin(phase), {"start_hz": start, "end_hz": end, "rate_hz": rate}


def _bell(rng, t, sample_rate):
    fundamental, decay = _log_uniform(rng, 250, 800), rng.uniform(0.4, 1.0)
    ratios = np.array([1.0, 2.76, 5.40, 8.93])  # the modes of a free bar: inharmonic
    levels = np.array([1.0, 0.6, 0.4, 0.25])
    kept = ratios * fundamental < 0.45 * sample_rate
    ratios, levels = ratios[kept], levels[kept]
    amplitudes = levels[:, None] * np.exp(-t / (decay / np.sqrt(ratios)[:, None]))
    return _partials(t, ratios * fundamental, amplitudes, rng), {"fundamental": fundamental, "decay_s": decay}


SOUND_CLASSES: tuple[SoundClass, ...] = (
    SoundClass("tone", "a steady pure tone, 300-3000 Hz", (0.3, 1.2), _tone),
    SoundClass("rising chirp", "a pure tone gliding up 3 to 8 times in frequency", (0.2, 0.8), _rising_chirp),
    SoundClass("falling chirp", "a pure tone gliding down 3 to 8 times in frequency", (0.2, 0.8), _falling_chirp),
    SoundClass("harmonic stack", "a buzzy steady note: 6 to 12 harmonics of 120-400 Hz", (0.4, 1.2), _harmonic_stack),
    SoundClass("noise burst", "a short burst of white noise, one octave wide", (0.1, 0.4), _noise_burst),
    SoundClass("click train", "regular broadband ticks, 6 to 25 a second", (0.4, 1.2), _click_train, True),
    SoundClass("pulsing tone", "a tone switched on and off 4 to 10 times a second", (0.6, 1.5), _pulsing_tone),
    SoundClass("vibrato tone", "a tone wavering 3-7 % in pitch, 5 to 8 times a second", (0.5, 1.5), _vibrato_tone),
    SoundClass("siren", "a three-partial note swooping 25-40 % up and down, about once a second", (1.0, 1.8), _siren),
    SoundClass(
        "plucked string", "a struck harmonic note, its high partials dying first", (0.5, 1.2), _plucked_string, True
    ),
    SoundClass("drum hit", "a low thump whose pitch drops from about 200 to 80 Hz", (0.2, 0.5), _drum_hit, True),
    SoundClass("rumble", "brown-ish noise below 150-400 Hz", (0.6, 1.8), _rumble),
    SoundClass("bird trill", "quick rising tweets at 2-6 kHz, 6 to 12 a second", (0.3, 1.0), _bird_trill),
    SoundClass(
        "bell", "a struck note with inharmonic partials (1, 2.76, 5.4, 8.9), ringing on", (0.8, 1.8), _bell, True
    ),
)
CLASS_NAMES = [sound.name for sound in SOUND_CLASSES]


def class_descriptions() -> dict[str, str]:
    """Each class's name and a short description of how it sounds (for the README)."""
    return {sound.name: sound.description for sound in SOUND_CLASSES}


def _envelope(samples: int, sample_rate: int, percussive: bool) -> np.ndarray:
    """Raised-cosine fades (10 ms in, 1 ms for a percussive onset; 20 ms out): no clicks at the edges."""
    envelope = np.ones(samples)
    for length, ramp in ((0.001 if percussive else 0.01, slice(None)), (0.02, slice(None, None, -1))):
        n = min(round(length * sample_rate), samples // 2)
        envelope[ramp][:n] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / max(n, 1))
    return envelope


def _render(rng, sound: SoundClass, length: int, sample_rate: int, level_db: float) -> tuple[np.ndarray, dict]:
    """An event of ``sound``, ``length`` samples, faded in and out, at ``level_db`` (see REFERENCE_RMS)."""
    signal, parameters = sound.render(rng, np.arange(length) / sample_rate, sample_rate)
    signal = signal * _envelope(length, sample_rate, sound.percussive)
    rms, peak = np.sqrt(np.mean(signal**2)), np.abs(signal).max()
    gain = 10 ** (level_db / 20) * min(REFERENCE_RMS / max(rms, 1e-12), PEAK_LIMIT / max(peak, 1e-12))
    return gain * signal, parameters


def make_clip(
    seed: int,
    split: str,
    index: int,
    seconds: float = CLIP_SECONDS,
    sample_rate: int = SAMPLE_RATE,
    events: tuple[int, int] = EVENTS_PER_CLIP,
) -> tuple[np.ndarray, list[Event]]:
    """Clip ``index`` of ``split`` (``"train"`` or ``"eval"``) for ``seed``: an int16 waveform
    and the events placed in it, exactly as :func:`make_sound_set` writes it.

    Its first event is of class ``index % len(SOUND_CLASSES)`` (so every class occurs in every
    split of at least that many clips, about equally often); the others are of distinct random
    classes, ``events`` = (fewest, most) events in all ((1, 1): single-label clips).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    samples = round(seconds * sample_rate)
    count = int(rng.integers(events[0], events[1] + 1))
    first = index % len(SOUND_CLASSES)
    others = [c for c in range(len(SOUND_CLASSES)) if c != first]
    labels = [first, *rng.choice(others, count - 1, replace=False).tolist()]
    floor_rms = 10 ** (rng.uniform(*NOISE_FLOOR_DBFS) / 20)
    mix = floor_rms * rng.standard_normal(samples)
    events = []
    for label in labels:
        sound = SOUND_CLASSES[label]
        length = max(min(round(rng.uniform(*sound.seconds) * sample_rate), samples), 2)
        start = int(rng.integers(0, samples - length + 1))
        level_db = float(rng.uniform(*LEVEL_DB))
        signal, parameters = _render(rng, sound, length, sample_rate, level_db)
        mix[start : start + length] += signal
        events.append(Event(label, start / sample_rate, length / sample_rate, level_db, parameters))
    peak = np.abs(mix).max()
    if peak > 0.99:  # loud events piled up: turn the whole clip down rather than clip it
        mix *= 0.99 / peak
    return to_clip(mix, samples), events


def _write_split(path: Path, split: str, clips: int, audio: AudioConfig, seed: int, step: Callable[[], None]) -> None:
    import h5py

    names = [f"synth-{split}-{i:05d}".encode() for i in range(clips)]
    with h5py.File(path, "w") as handle:
        handle.create_dataset("audio_name", data=np.array(names))
        waveform = handle.create_dataset(
            "waveform", (clips, audio.samples), dtype=np.int16, chunks=(1, audio.samples)
        )  # one chunk per clip, as pack writes: a loader reads clips one by one, in random order
        target = handle.create_dataset("target", (clips, len(SOUND_CLASSES)), dtype=bool)
        handle.attrs.update(**layout_attributes(audio, CLASS_NAMES, True), synth_seed=seed)
        for first in range(0, clips, WRITE_ROWS):
            rows = range(first, min(first + WRITE_ROWS, clips))
            block = np.zeros((len(rows), audio.samples), dtype=np.int16)
            labels = np.zeros((len(rows), len(SOUND_CLASSES)), dtype=bool)
            for row, index in enumerate(rows):
                block[row], events = make_clip(seed, split, index, audio.seconds, audio.sample_rate)
                labels[row, [event.label for event in events]] = True
                step()
            waveform[rows.start : rows.stop] = block
            target[rows.start : rows.stop] = labels


def make_sound_set(
    folder: str | os.PathLike,
    train_clips: int = TRAIN_CLIPS,
    eval_clips: int = EVAL_CLIPS,
    seconds: float = CLIP_SECONDS,
    sample_rate: int = SAMPLE_RATE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, Path]:
    """Generate the demo's sound set: ``folder/train.h5`` and ``folder/eval.h5``, returned in that order.

    Both are in the layout :func:`~dclsify.pipeline.pack.pack` writes (``audio_name``,
    ``waveform`` int16 clips x samples, ``target`` bool clips x 14, and the attributes
    ``sample_rate``, ``clip_seconds``, ``class_names``, ``multi_label`` True,
    ``dclsify_version``, plus ``synth_seed``) and open with
    :func:`~dclsify.pipeline.datasets.open_source`. The classes are :data:`CLASS_NAMES`
    (see :func:`class_descriptions`); chance mAP is about the mean share of clips holding
    a class, 2/14. ``progress(done, total)`` is called after each clip.

    The files appear only when both are complete: until then they are written under
    temporary names beside them, which an error or Ctrl-C removes. Existing files of the
    same names are replaced. Raises ValueError for fewer clips than classes in a split, a
    negative seed, a sample rate under 8 kHz or a clip too short for the front-end.
    """
    if min(train_clips, eval_clips) < len(SOUND_CLASSES):
        raise ValueError(
            f"each split needs at least {len(SOUND_CLASSES)} clips (one per class), got {train_clips} and {eval_clips}"
        )
    if seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed}")
    if sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"the sound set needs a sample rate of at least {MIN_SAMPLE_RATE} Hz, got {sample_rate}")
    audio = AudioConfig(sample_rate=sample_rate, seconds=seconds)
    folder = Path(folder)
    total, done = train_clips + eval_clips, 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    train_path, eval_path = folder / "train.h5", folder / "eval.h5"
    with atomic_path(train_path) as train_temporary, atomic_path(eval_path) as eval_temporary:
        _write_split(train_temporary, "train", train_clips, audio, seed, step)
        _write_split(eval_temporary, "eval", eval_clips, audio, seed, step)
    return train_path, eval_path


# ESC-50's meta/esc50.csv columns (github.com/karolpiczak/ESC-50, README "Repository content")
ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def make_esc50_layout(
    folder: str | os.PathLike,
    clips_per_class: int = 10,
    folds: int = 5,
    seconds: float = 5.0,
    sample_rate: int = 44100,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The demo's sounds as a single-label set in ESC-50's layout, for downstream work without
    downloading ESC-50: ``folder/meta/esc50.csv`` and ``folder/audio/{fold}-{src_file}-{take}-{target}.wav``
    (5-s 44.1-kHz mono WAV files, as ESC-50's are). Each clip holds one event of its class; class ``c``'s
    clips go round the folds, so every fold holds every class equally often; the first ten classes are
    marked ``esc10``. Returns ``folder``. Files already there are replaced.
    """
    import soundfile

    if clips_per_class < folds or folds < 2:
        raise ValueError(f"need at least 2 folds and a clip of each class per fold, got {clips_per_class} for {folds}")
    if sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"the sound set needs a sample rate of at least {MIN_SAMPLE_RATE} Hz, got {sample_rate}")
    folder = Path(folder)
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    (folder / "audio").mkdir(exist_ok=True)
    rows, total = [], clips_per_class * len(SOUND_CLASSES)
    for number in range(total):
        target, take = number % len(SOUND_CLASSES), number // len(SOUND_CLASSES)
        fold = take % folds + 1
        clip, _ = make_clip(seed, "train", number, seconds, sample_rate, events=(1, 1))
        name = f"{fold}-{100000 + number}-A-{target}.wav"
        soundfile.write(folder / "audio" / name, clip, sample_rate, subtype="PCM_16")
        rows.append((name, fold, target, CLASS_NAMES[target], target < 10, 100000 + number, "A"))
        if progress is not None:
            progress(number + 1, total)
    with atomic_path(folder / "meta" / "esc50.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ESC50_COLUMNS)
        writer.writerows(rows)
    return folder


def make_scene(
    path: str | os.PathLike, seconds: float = 120.0, seed: int = 0, sample_rate: int = SAMPLE_RATE
) -> list[tuple[float, float, str]]:
    """A long recording with events at known times, for sound event detection: the demo's sounds, one
    at a time (each class in turn, 1 to 3 s of silence between them, levels as in the demo's clips) on
    the demo's noise floor. Writes ``path`` (a WAV) and, beside it, its strong labels as DCASE's TSV
    (``filename onset offset event_label``, the file's name); returns (onset, offset, label) of each event."""
    path = Path(path)
    rng = np.random.default_rng([seed, 2])
    samples = round(seconds * sample_rate)
    mix = 10 ** (rng.uniform(*NOISE_FLOOR_DBFS) / 20) * rng.standard_normal(samples)
    truth, start, index = [], round(rng.uniform(0.5, 2.0) * sample_rate), 0
    while True:
        sound = SOUND_CLASSES[index % len(SOUND_CLASSES)]
        length = round(rng.uniform(*sound.seconds) * sample_rate)
        if start + length > samples:
            break
        signal, _ = _render(rng, sound, length, sample_rate, float(rng.uniform(*LEVEL_DB)))
        mix[start : start + length] += signal
        truth.append((start / sample_rate, (start + length) / sample_rate, sound.name))
        start += length + round(rng.uniform(1.0, 3.0) * sample_rate)
        index += 1
    import soundfile

    with atomic_path(path) as temporary:
        soundfile.write(temporary, to_clip(mix, samples), sample_rate, format="WAV")
    lines = ["filename\tonset\toffset\tevent_label"]
    lines += [f"{path.name}\t{onset:.3f}\t{offset:.3f}\t{label}" for onset, offset, label in truth]
    with atomic_path(path.with_suffix(".tsv")) as temporary:
        Path(temporary).write_text("\n".join(lines) + "\n")
    return truth
