"""The sounds a user brings, as Datasets of int16 clips and boolean targets.

Three sources, one interface (:class:`ClipDataset`):

- :class:`HDF5Clips`: the PANNs / DCLS-Audio layout (``audio_name``, ``waveform`` int16,
  ``target`` bool), one file or several read as one, lazily, each worker with its own handle;
- :class:`SegmentClips`: an AudioSet segment CSV and a folder of clips named by YouTube id;
- :class:`ManifestClips`: a CSV or JSONL manifest of the user's own files and labels.

:func:`open_file_source` picks the right one from a file's path; the commands, and any caller that may be
given a dataset folder or a ``#`` selector (``ESC-50#fold=5``), use
:func:`dclsify.pipeline.datasets.open_source`, which reads those and these. Unpacked sources decode on the fly:
any format libsndfile reads (wav, flac, ogg, mp3, ...), any rate and channel count, mixed
to mono, resampled to the run's rate and padded or cut to its clip length. A clip that
cannot be used is replaced by another, and the batch says which and why (see
:class:`Batch`), so a run never stops for one bad file. A black list (:func:`read_blacklist`)
leaves clips out of any source: :func:`skip_blacklisted` gives a :class:`ClipSubset` of the rest.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .frontend import INT16_SCALE, AudioConfig

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
MAX_REPLACEMENT_TRIES = 100


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file (and the line)."""


class ClipError(Exception):
    """One clip that cannot be used (missing, unreadable, empty, shorter than a frame)."""


@dataclass(frozen=True)
class AudioSetClass:
    index: int
    mid: str
    name: str


@cache
def audioset_classes() -> tuple[AudioSetClass, ...]:
    """AudioSet's 527 classes (``class_labels_indices.csv``, shipped with dclsify)."""
    text = resources.files("dclsify.pipeline").joinpath("class_labels_indices.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    return tuple(AudioSetClass(int(r["index"]), r["mid"], r["display_name"]) for r in rows)


class Batch(NamedTuple):
    """What a loader yields: int16 waveforms (B, samples), bool targets (B, classes), the
    dataset index of each clip, whether that clip could not be read and another stands in
    for it (B,), and the clips that could not be read: (path, reason) pairs."""

    waveforms: Tensor
    targets: Tensor
    indices: Tensor
    replaced: Tensor
    failures: list[tuple[str, str]]


def collate(items: Sequence[tuple[Tensor, Tensor, int, list]]) -> Batch:
    waveforms, targets, indices, failures = zip(*items, strict=True)
    return Batch(
        torch.stack(waveforms),
        torch.stack(targets),
        torch.tensor(indices, dtype=torch.int64),
        torch.tensor([bool(clip) for clip in failures]),
        [failure for clip in failures for failure in clip],
    )


def to_clip(mono: np.ndarray, samples: int) -> np.ndarray:
    """float mono in [-1, 1] -> int16, zero-padded at the end or cut to ``samples``."""
    clip = np.zeros(samples, dtype=np.int16)
    kept = mono[:samples]
    clip[: len(kept)] = np.clip(np.rint(kept * INT16_SCALE), -32768, 32767)
    return clip


def fit_length(clip: np.ndarray, samples: int) -> np.ndarray:
    """Pad (with zeros, at the end) or cut an int16 clip to ``samples``."""
    if len(clip) == samples:
        return clip
    fitted = np.zeros(samples, dtype=clip.dtype)
    fitted[: min(samples, len(clip))] = clip[:samples]
    return fitted


@cache
def _resampler(rate: int, sample_rate: int) -> torch.nn.Module:
    import torchaudio

    return torchaudio.transforms.Resample(rate, sample_rate)  # builds its sinc kernel once: 10x faster per clip


def resample(mono: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's sinc interpolation) of a float mono signal."""
    if rate == sample_rate:
        return mono
    with torch.no_grad():
        return _resampler(rate, sample_rate)(torch.from_numpy(np.ascontiguousarray(mono))).numpy()


def read_mono(path: str | os.PathLike, sample_rate: int, seconds: float | None = None) -> np.ndarray:
    """A sound file as float32 mono in [-1, 1] at ``sample_rate``: its first ``seconds`` (None:
    all of it; only what is needed is decoded). Raises :class:`ClipError` with the reason
    (missing, unreadable, empty)."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise ClipError("missing")
    with _reading(), soundfile.SoundFile(path) as reader:
        rate = reader.samplerate
        frames = -1 if seconds is None else math.ceil(seconds * rate) + 64
        data = reader.read(frames, dtype="float32", always_2d=True)
    if data.size == 0:
        raise ClipError("empty")
    return resample(_mix(data), rate, sample_rate)


@contextmanager
def _reading() -> Iterator[None]:
    """soundfile's errors, as the :class:`ClipError` ``unreadable: <why>``."""
    import soundfile

    try:
        yield
    except (soundfile.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        detail = getattr(error, "error_string", None) or " ".join(str(error).split())
        raise ClipError(f"unreadable: {detail}") from None


def _mix(data: np.ndarray) -> np.ndarray:
    """(frames, channels) -> mono: the mean of the channels (as a product, 10x faster)."""
    return data @ np.full(data.shape[1], 1 / data.shape[1], dtype=np.float32)


class StreamResampler:
    """:func:`resample` for a sound handed over in pieces: :meth:`push` each piece, :meth:`close` at the
    end; the outputs, end to end, are :func:`resample` of the whole (the same length; the same numbers
    within float rounding, 1e-6: the same sums, added in another order), and the input kept is a few
    periods, whatever the sound's length.

    With the rates reduced by their gcd (``orig`` -> ``new``), torchaudio's sinc resampler makes output
    samples ``[c * new, (c + 1) * new)`` from input ``[c * orig - width, (c + 1) * orig + width)`` alone.
    So the output of whole periods of ``orig`` input frames is given once ``width`` frames (rounded up to
    a period) after them are in, each resampled with as many before them; at the sound's ends both
    resample the same zeros."""

    def __init__(self, rate: int, sample_rate: int) -> None:
        self.rate, self.sample_rate = rate, sample_rate
        gcd = math.gcd(rate, sample_rate)
        self._orig, self._new = rate // gcd, sample_rate // gcd
        width = _resampler(rate, sample_rate).width if rate != sample_rate else 0
        self._margin = -(-width // self._orig) * self._orig
        self._kept, self._kept_from = np.zeros(0, dtype=np.float32), 0  # input still needed, from frame _kept_from
        self._received = self._done = 0  # input frames given; input frames whose output was given

    def _output_end(self, frame: int) -> int:
        """Where the output of the input up to ``frame`` ends (torchaudio's length: ceil(frame * new / orig))."""
        return -(-frame * self._new // self._orig)

    def push(self, mono: np.ndarray) -> np.ndarray:
        """More of the sound (float32 mono at ``rate``); the output this makes final."""
        if self.rate == self.sample_rate:
            return mono
        self._kept = np.concatenate([self._kept, mono])
        self._received += len(mono)
        return self._output((self._received - self._margin) // self._orig * self._orig)

    def close(self) -> np.ndarray:
        """The end of the sound: the rest of the output."""
        return mono_empty() if self.rate == self.sample_rate else self._output(self._received)

    def _output(self, end: int) -> np.ndarray:
        if end <= self._done:
            return mono_empty()
        resampled = resample(self._kept, self.rate, self.sample_rate)
        offset = self._output_end(self._kept_from)  # _kept_from is a multiple of orig: its output starts there
        output = resampled[self._output_end(self._done) - offset : self._output_end(end) - offset]
        dropped = max(end - self._margin, 0) - self._kept_from  # the left margin of what comes next stays
        self._kept, self._kept_from, self._done = self._kept[dropped:], self._kept_from + dropped, end
        return output


def mono_empty() -> np.ndarray:
    return np.zeros(0, dtype=np.float32)


class MonoBlocks:
    """A sound file as float32 mono in [-1, 1] at ``sample_rate``, read in blocks of about ``block_seconds``.

    For multi-hour recordings: :func:`read_mono` holds a whole sound (decoded, and again resampled),
    this decodes one block at a time and resamples it with a :class:`StreamResampler`, so memory does
    not grow with the file's length. The blocks, end to end, are :func:`read_mono`'s sound: the same
    numbers when no resampling is needed; else the same length, equal within float rounding.

    The file is opened and checked at once: :class:`ClipError` (missing, unreadable, empty) as
    :func:`read_mono` raises it. ``seconds`` is the sound's duration, ``samples`` how many samples the
    blocks give in all. Use it in a ``with`` block, or :meth:`close` it.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, block_seconds: float = 60.0) -> None:
        import soundfile

        if block_seconds <= 0:
            raise ValueError(f"block_seconds must be positive, not {block_seconds}")
        path = Path(path)
        if not path.is_file():
            raise ClipError("missing")
        with _reading():
            self._reader = soundfile.SoundFile(path)
        self.rate, self.sample_rate, self.frames = self._reader.samplerate, sample_rate, self._reader.frames
        if self.frames == 0:
            self.close()
            raise ClipError("empty")
        self.seconds = self.frames / self.rate
        self.samples = -(-self.frames * sample_rate // self.rate)  # torchaudio's length: ceil(frames * new / orig)
        self._block = max(1, round(block_seconds * self.rate))

    def __iter__(self) -> Iterator[np.ndarray]:
        """The blocks, from the start of the file (each iteration reads it again); none empty."""
        self._reader.seek(0)
        resampler = StreamResampler(self.rate, self.sample_rate)
        for start in range(0, self.frames, self._block):
            with _reading():
                data = self._reader.read(min(self._block, self.frames - start), dtype="float32", always_2d=True)
            block = resampler.push(_mix(data))
            if start + self._block >= self.frames:
                block = np.concatenate([block, resampler.close()])
            if len(block):
                yield block

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> MonoBlocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def decode(path: str | os.PathLike, audio: AudioConfig) -> np.ndarray:
    """One sound file -> an int16 clip of ``audio.samples`` at ``audio.sample_rate``.

    Only the part that fits in a clip is decoded. Raises :class:`ClipError` with the
    reason (missing, unreadable, empty, shorter than a frame).
    """
    mono = read_mono(path, audio.sample_rate, audio.seconds)
    if len(mono) < audio.n_fft:
        raise ClipError(f"shorter than a frame ({len(mono)} samples < n_fft {audio.n_fft})")
    return to_clip(mono, audio.samples)


class ClipDataset(torch.utils.data.Dataset):
    """Clips as ``(int16 waveform, bool target, index, failures)``; subclasses define :meth:`load`.

    Attributes: ``class_names`` (one per target column), ``multi_label`` (False: one label
    per clip, trained with softmax cross-entropy and scored by accuracy), ``audio``.
    """

    class_names: list[str]
    multi_label: bool
    audio: AudioConfig
    blacklisted: BlacklistReport | None = None  # what a black list left out (see :func:`skip_blacklisted`)

    def __len__(self) -> int:
        raise NotImplementedError

    def target_matrix(self) -> np.ndarray:
        """Every clip's target, (clips, classes) bool, read without decoding any audio."""
        raise NotImplementedError(f"{type(self).__name__} cannot give its targets without decoding its clips")

    def clip_name(self, index: int) -> str:
        raise NotImplementedError

    def clip_path(self, index: int) -> str:
        """Where clip ``index`` comes from, as a user would look for it."""
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip ``index`` as an int16 array of ``audio.samples`` and a bool target; may raise :class:`ClipError`."""
        raise NotImplementedError

    def labels(self, index: int) -> list[str]:
        """The class names of clip ``index``."""
        _, target = self.load(index)
        return [self.class_names[i] for i in np.flatnonzero(target)]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int, list[tuple[str, str]]]:
        failures = []
        for attempt in range(min(len(self), MAX_REPLACEMENT_TRIES)):
            candidate = (index + attempt) % len(self)
            try:
                waveform, target = self.load(candidate)
            except ClipError as error:
                failures.append((self.clip_path(candidate), str(error)))
                continue
            return torch.from_numpy(waveform), torch.from_numpy(target), index, failures
        raise DataError(
            f"{len(failures)} clips in a row could not be read, from {failures[0][0]} ({failures[0][1]}) on: "
            "check the data"
        )


def numbered_classes(count: int) -> list[str]:
    return [f"class {i}" for i in range(count)]


# An AudioSet clip's name: its YouTube id (11 characters), maybe with PANNs' "Y" before it and the
# segment's start (and end) after it: Y-0Hz6AG9uV8, -0Hz6AG9uV8_30, Y0sYcEVTfF2E_0.000_10.000, oPRC3zComfA_000117.
AUDIOSET_NAME = re.compile(r"Y?([A-Za-z0-9_-]{11})(?:_\d+(?:\.\d+)?){0,2}")


def clip_stem(name: str) -> str:
    """A clip name without its folders and its sound file extension: ``audio/Y-0Hz6AG9uV8.wav`` -> ``Y-0Hz6AG9uV8``
    (only an audio extension goes: ``Y0sYcEVTfF2E_0.000_10.000`` keeps its dots)."""
    base = name.strip().replace("\\", "/").rpartition("/")[2]
    root, extension = os.path.splitext(base)
    return root if extension.lower() in AUDIO_EXTENSIONS else base


def youtube_id(name: str) -> str | None:
    """The YouTube id in an AudioSet clip's name, however it is spelled (``Y-0Hz6AG9uV8.wav``,
    ``-0Hz6AG9uV8_30.000``, ``Y-0Hz6AG9uV8_30.000_40.000``, ``-0Hz6AG9uV8``), else None."""
    match = AUDIOSET_NAME.fullmatch(clip_stem(name))
    return match.group(1) if match else None


def open_hdf5(path: str | os.PathLike, error: type[DataError] = DataError):
    """``path`` opened for reading (an ``h5py.File``); a file HDF5 cannot read is one ``error`` naming it."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as problem:
        raise error(f"{path}: not a readable HDF5 file ({problem})") from None


class HDF5Clips(ClipDataset):
    """Clips from one or several PANNs-layout HDF5 files, read as one, row by row.

    Each process (DataLoader worker) opens its own handles on first use: HDF5 handles do
    not survive a fork. Files written by :func:`dclsify.pipeline.pack.pack` also carry their
    sample rate and class names; others are taken as 32 kHz with AudioSet's 527 classes (or
    numbered ones). Without ``audio``, clips keep the first file's rate and length.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], audio: AudioConfig | None = None) -> None:

        self.paths = [Path(p) for p in paths]
        widths, names, rates, lengths, class_lists, multi = [], [], [], [], [], []
        for path in self.paths:
            if not path.is_file():
                raise DataError(f"no such file: {path}")
            handle = open_hdf5(path)
            with handle:
                missing = [key for key in ("audio_name", "waveform", "target") if key not in handle]
                if missing:
                    raise DataError(
                        f"{path}: no {', '.join(repr(m) for m in missing)} dataset; an audio HDF5 file holds "
                        "audio_name (bytes), waveform (int16, clips x samples) and target (bool, clips x classes)"
                    )
                waveform, target, audio_name = handle["waveform"], handle["target"], handle["audio_name"]
                rows = audio_name.shape[0]
                if waveform.ndim != 2 or waveform.shape[0] != rows or waveform.dtype != np.int16:
                    raise DataError(
                        f"{path}: waveform is {waveform.dtype} {waveform.shape}; expected int16 ({rows}, samples)"
                    )
                if target.ndim != 2 or target.shape[0] != rows:
                    raise DataError(f"{path}: target has shape {target.shape}; expected ({rows}, classes)")
                names.append([n.decode() if isinstance(n, bytes) else str(n) for n in audio_name[:]])
                rates.append(int(handle.attrs.get("sample_rate", 32000)))
                lengths.append(waveform.shape[1])
                stored = handle.attrs.get("class_names")
                try:
                    class_lists.append(json.loads(stored) if stored is not None else None)
                except (json.JSONDecodeError, TypeError):
                    raise DataError(f"{path}: its class_names attribute is not a JSON list of names") from None
                if rates[-1] < 1:
                    raise DataError(f"{path}: its sample_rate attribute is {rates[-1]}")
                multi.append(bool(handle.attrs.get("multi_label", True)))
                widths.append(target.shape[1])
        if len(set(widths)) > 1:
            counts = ", ".join(f"{p}: {w}" for p, w in zip(self.paths, widths, strict=True))
            raise DataError(f"the files have different class counts ({counts})")
        width = widths[0]
        class_names = class_lists[0]
        if any(c != class_names for c in class_lists):
            raise DataError("the files were packed with different class lists")
        if class_names is None:
            class_names = [c.name for c in audioset_classes()] if width == 527 else numbered_classes(width)
        if len(class_names) != width:
            raise DataError(f"{self.paths[0]}: {len(class_names)} class names for {width} target columns")
        self.class_names, self.multi_label, self.rates = class_names, all(multi), rates
        # by default a run hears the clips as they were stored
        try:
            self.audio = audio or AudioConfig(sample_rate=rates[0], seconds=lengths[0] / rates[0])
        except ValueError as error:
            raise DataError(f"{self.paths[0]}: clips of {lengths[0]} samples at {rates[0]} Hz: {error}") from None
        self.names = [name for file_names in names for name in file_names]
        self.file_index = np.concatenate([np.full(len(n), i, dtype=np.int32) for i, n in enumerate(names)])
        self.row_index = np.concatenate([np.arange(len(n), dtype=np.int64) for n in names])
        self._handles: list | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": None, "_pid": None}

    def _files(self) -> list:
        if self._handles is None or self._pid != os.getpid():
            import h5py

            self._handles = [h5py.File(path, "r") for path in self.paths]
            self._pid = os.getpid()
        return self._handles

    def clip_name(self, index: int) -> str:
        return self.names[index]

    def clip_path(self, index: int) -> str:
        return f"{self.paths[self.file_index[index]]}:{self.names[index]}"

    def target_matrix(self) -> np.ndarray:
        import h5py

        parts = []
        for path in self.paths:
            with h5py.File(path, "r") as handle:
                parts.append(handle["target"][:].astype(bool, copy=False))
        return np.concatenate(parts)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        i, row = self.file_index[index], self.row_index[index]
        handle = self._files()[i]
        waveform = handle["waveform"][row]
        target = handle["target"][row].astype(bool)
        if self.rates[i] != self.audio.sample_rate:
            mono = resample(waveform.astype(np.float32) / INT16_SCALE, self.rates[i], self.audio.sample_rate)
            return to_clip(mono, self.audio.samples), target
        return fit_length(waveform, self.audio.samples), target


class LabelledFiles(ClipDataset):
    """Sound files with label lists, decoded on the fly; the base of the two unpacked sources."""

    def __init__(
        self, paths: list[Path | None], labels: list[list[int]], class_names: list[str], multi_label: bool, audio
    ) -> None:
        self.paths, self.class_names, self.multi_label = paths, class_names, multi_label
        self.audio = audio or AudioConfig()
        self.targets = np.zeros((len(paths), len(class_names)), dtype=bool)
        for row, indices in enumerate(labels):
            self.targets[row, indices] = True

    def __len__(self) -> int:
        return len(self.paths)

    def clip_path(self, index: int) -> str:
        return str(self.paths[index])

    def clip_name(self, index: int) -> str:
        return self.paths[index].stem

    def labels(self, index: int) -> list[str]:
        return [self.class_names[i] for i in np.flatnonzero(self.targets[index])]

    def target_matrix(self) -> np.ndarray:
        return self.targets

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return decode(self.paths[index], self.audio), self.targets[index]


def _audio_files(folder: Path) -> dict[str, Path]:
    """Sound files in ``folder`` (and below) by stem, preferring the first extension in AUDIO_EXTENSIONS."""
    found: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(AUDIO_EXTENSIONS)}
    for root, _, names in os.walk(folder):
        for name in names:
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in rank and (stem not in found or rank[ext] < rank[found[stem].suffix.lower()]):
                found[stem] = Path(root, name)
    return found


class SegmentClips(LabelledFiles):
    """An AudioSet segment CSV (``balanced_train_segments.csv``: three ``#`` lines, then
    ``YTID, start, end, "mid1,mid2"``) and a folder of clips ``Y<YTID>.<ext>`` or ``<YTID>.<ext>``.

    Labels are AudioSet's 527 classes, by ``mid``. Clips with no file in the folder stay in
    the dataset and are reported (and replaced) as missing when read, as a run would meet them.
    """

    def __init__(self, csv_path: str | os.PathLike, audio_dir: str | os.PathLike, audio: AudioConfig | None = None):
        csv_path, audio_dir = Path(csv_path), Path(audio_dir)
        if not audio_dir.is_dir():
            raise DataError(f"no such folder of clips: {audio_dir}")
        by_mid = {c.mid: c.index for c in audioset_classes()}
        files = _audio_files(audio_dir)
        paths, labels, self.ytids = [], [], []
        with open(csv_path, newline="") as handle:
            for line, row in enumerate(csv.reader(handle, skipinitialspace=True), start=1):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) != 4:
                    raise DataError(f'{csv_path}, line {line}: expected YTID, start, end, "mid1,mid2"; got {row}')
                ytid, _, _, mids = row
                indices = []
                for mid in mids.split(","):
                    if mid.strip() not in by_mid:
                        raise DataError(f"{csv_path}, line {line}: unknown AudioSet label mid {mid.strip()!r}")
                    indices.append(by_mid[mid.strip()])
                self.ytids.append(ytid)
                paths.append(files.get(f"Y{ytid}") or files.get(ytid) or audio_dir / f"Y{ytid}.wav")
                labels.append(indices)
        if not paths:
            raise DataError(f"{csv_path}: no segments in this CSV")
        super().__init__(paths, labels, [c.name for c in audioset_classes()], True, audio)

    def clip_name(self, index: int) -> str:
        return f"Y{self.ytids[index]}"


def read_class_list(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(name, mid) per class from a ``class_labels_indices.csv``-like file (``index,mid,display_name``)
    or a text file with one class name per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such class list: {path}")
    lines = path.read_text().splitlines()
    header = next(csv.reader(lines[:1]), [])
    if "display_name" in header:
        rows = list(csv.DictReader(lines))
        if "index" in header:
            rows.sort(key=lambda r: int(r["index"]))
        return [(r["display_name"], r.get("mid")) for r in rows]
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (one per line, or a CSV with a display_name column)")
    return [(name, None) for name in names]


def _manifest_rows(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, path, labels) of each entry of a CSV or JSONL manifest."""
    rows = []
    if path.suffix.lower() == ".jsonl":
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {line}: not JSON ({error.msg})") from None
            if not isinstance(entry, dict) or not entry.get("path"):
                raise DataError(f"{path}, line {line}: no 'path'")
            labels = entry.get("labels", [])
            labels = labels if isinstance(labels, list) else [labels]
            rows.append((line, str(entry["path"]), [str(label).strip() for label in labels]))
        return rows
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise DataError(f"{path}, line 1: no 'path' column (a manifest has the columns path and labels)")
        for line, entry in enumerate(reader, start=2):
            if not (entry.get("path") or "").strip():
                raise DataError(f"{path}, line {line}: no 'path'")
            labels = [label.strip() for label in (entry.get("labels") or "").split(";") if label.strip()]
            rows.append((line, entry["path"].strip(), labels))
    return rows


class ManifestClips(LabelledFiles):
    """A user's own sounds: a CSV (columns ``path`` and ``labels``, several labels separated by
    ``;``) or JSONL (``{"path": ..., "labels": [...]}``) manifest, paths relative to it.

    Labels may be class names, AudioSet mids or class indices. The class list comes from
    ``classes`` (see :func:`read_class_list`; AudioSet's when it is ``"audioset"``) or, by
    default, from the manifest: its labels, sorted. The set is single-label when no clip
    has more than one label.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        classes: str | os.PathLike | Sequence[str] | None = None,
        audio: AudioConfig | None = None,
    ) -> None:
        manifest = Path(manifest)
        rows = _manifest_rows(manifest)
        if not rows:
            raise DataError(f"{manifest}: no entries")
        if classes is None:
            found = {label for _, _, labels in rows for label in labels}
            numeric = all(label.isdigit() for label in found)
            names = sorted(found, key=int if numeric else str)
            mids: list[str | None] = [None] * len(names)
        elif isinstance(classes, str | os.PathLike) and str(classes) == "audioset":
            names, mids = [c.name for c in audioset_classes()], [c.mid for c in audioset_classes()]
        elif isinstance(classes, str | os.PathLike):
            names, mids = (list(v) for v in zip(*read_class_list(classes), strict=True))
        else:
            names, mids = list(classes), [None] * len(classes)
        lookup = {str(i): i for i in range(len(names))}
        lookup |= {mid: i for i, mid in enumerate(mids) if mid}
        lookup |= {name: i for i, name in enumerate(names)}
        paths, labels = [], []
        for line, relative, clip_labels in rows:
            if not clip_labels:
                raise DataError(f"{manifest}, line {line}: no labels (a clip needs at least one)")
            indices = []
            for label in clip_labels:
                if label not in lookup:
                    raise DataError(f"{manifest}, line {line}: unknown class {label!r}")
                indices.append(lookup[label])
            paths.append((manifest.parent / relative) if not Path(relative).is_absolute() else Path(relative))
            labels.append(indices)
        super().__init__(paths, labels, names, max(len(set(i)) for i in labels) > 1, audio)


def _expand(path: str | os.PathLike | Sequence) -> list[Path]:
    if isinstance(path, (list, tuple)):
        return [p for item in path for p in _expand(item)]
    text = str(path)
    if "," in text:
        return _expand(text.split(","))
    if glob.has_magic(text):
        matches = sorted(glob.glob(text))
        if not matches:
            raise DataError(f"no file matches {text}")
        return [Path(m) for m in matches]
    return [Path(text)]


def open_file_source(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    audio: AudioConfig | None = None,
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
) -> ClipDataset:
    """The dataset a file's path names, whatever its kind (dataset folders, ``#`` selectors and black
    lists are :func:`dclsify.pipeline.datasets.open_source`'s, which reads these files too):

    - ``.h5``/``.hdf5`` files (several: a list, ``a.h5,b.h5`` or a glob such as
      ``unbalanced_train_part*.h5``): :class:`HDF5Clips`;
    - a CSV whose first line starts with ``#``: an AudioSet segment CSV, with its clips in
      ``audio_dir`` (default: the CSV's folder): :class:`SegmentClips`;
    - a CSV with a ``path`` column or a ``.jsonl`` file: a manifest, with the class list
      ``classes`` (a file, or ``"audioset"``; default: from the manifest): :class:`ManifestClips`.
    """
    paths = _expand(path)
    for p in paths:
        if not p.exists():
            raise DataError(f"no such file: {p}")
    suffixes = {p.suffix.lower() for p in paths}
    if suffixes <= {".h5", ".hdf5"}:
        return HDF5Clips(paths, audio)
    if len(paths) > 1:
        raise DataError(f"several files are read together only when all are HDF5: {', '.join(map(str, paths))}")
    source = paths[0]
    if source.is_dir():
        raise DataError(f"{source} is a folder: dclsify.pipeline.datasets.open_source reads dataset folders")
    if source.suffix.lower() == ".jsonl":
        return ManifestClips(source, classes, audio)
    if source.suffix.lower() == ".csv":
        first = next((line for line in source.read_text(errors="replace").splitlines() if line.strip()), "")
        if first.startswith("#"):
            return SegmentClips(source, audio_dir or source.parent, audio)
        return ManifestClips(source, classes, audio)
    raise DataError(
        f"{source}: unknown kind of data ({source.suffix or 'no extension'}); give an HDF5 file (.h5), an AudioSet "
        "segment CSV with --audio-dir, or a manifest (.csv with path and labels columns, or .jsonl)"
    )


# -- black lists ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blacklist:
    """The clip ids of a black list file (distinct, in the file's order) and the file's sha256."""

    path: str
    ids: tuple[str, ...]
    digest: str


@dataclass(frozen=True)
class BlacklistReport:
    """What a black list did to a source: ``skipped`` clips left out, and how many of its ``ids`` named none."""

    path: str
    ids: int
    skipped: int
    unmatched: int

    def __str__(self) -> str:
        unmatched = f"; {self.unmatched} of its {self.ids} ids name no clip here" if self.unmatched else ""
        return f"black list {self.path}: {self.skipped} clips skipped{unmatched}"


def read_blacklist(path: str | os.PathLike) -> Blacklist:
    """A black list file: one clip id a line, as AudioSet's black lists come (PANNs'
    ``metadata/black_list/*.csv``: bare YouTube ids, no header). Blank lines, and everything from a
    ``#`` to the end of a line, are ignored; of a line with tabs or commas (a TSV or CSV, such as
    DCASE's label files or an AudioSet segment CSV), the first field is the id. An id is a YouTube id
    or a clip name, spelled any way :func:`skip_blacklisted` matches."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such black list: {path}")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except OSError as error:
        raise DataError(f"cannot read the black list {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a black list (a text file of clip ids, one a line)") from None
    ids: dict[str, None] = {}  # an ordered set
    for line in text.splitlines():
        line = line.partition("#")[0].partition("\t")[0]
        first = next(csv.reader([line], skipinitialspace=True), [""])[0] if "," in line else line
        if first.strip():
            ids[first.strip()] = None
    if not ids:
        raise DataError(f"{path}: no clip ids in this black list (one a line: a YouTube id or a clip name)")
    return Blacklist(str(path), tuple(ids), hashlib.sha256(data).hexdigest())


class ClipSubset(ClipDataset):
    """Some clips of another dataset, in its order: clip ``i`` is ``dataset``'s clip ``indices[i]``."""

    def __init__(
        self, dataset: ClipDataset, indices: Sequence[int], blacklisted: BlacklistReport | None = None
    ) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.class_names, self.multi_label, self.audio = dataset.class_names, dataset.multi_label, dataset.audio
        self.blacklisted = blacklisted

    def __len__(self) -> int:
        return len(self.indices)

    def clip_name(self, index: int) -> str:
        return self.dataset.clip_name(int(self.indices[index]))

    def clip_path(self, index: int) -> str:
        return self.dataset.clip_path(int(self.indices[index]))

    def labels(self, index: int) -> list[str]:
        return self.dataset.labels(int(self.indices[index]))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.load(int(self.indices[index]))

    def target_matrix(self) -> np.ndarray:
        return self.dataset.target_matrix()[self.indices]


def skip_blacklisted(dataset: ClipDataset, blacklist: Blacklist) -> ClipSubset:
    """``dataset`` without the clips ``blacklist`` names; its ``blacklisted`` counts them.

    An id names a clip when, with folders and a sound file extension taken off both, they are
    equal, equal but for a ``Y`` before the clip's name (PANNs stores AudioSet clip ``<id>`` as
    ``Y<id>.wav``), or both are AudioSet names of the same YouTube video (:func:`youtube_id`):
    ``-0Hz6AG9uV8`` in a list names the clips ``Y-0Hz6AG9uV8.wav``, ``Y-0Hz6AG9uV8`` and
    ``-0Hz6AG9uV8_30.000_40.000``, and so do ``Y-0Hz6AG9uV8.wav`` and ``Y-0Hz6AG9uV8_30_40``.
    """
    entries_of: dict[str, list[int]] = {}
    for number, entry in enumerate(blacklist.ids):
        for key in {clip_stem(entry), youtube_id(entry)}:
            if key:
                entries_of.setdefault(key, []).append(number)
    named = np.zeros(len(blacklist.ids), dtype=bool)
    kept = []
    for index in range(len(dataset)):
        stem = clip_stem(dataset.clip_name(index))
        unprefixed = stem[1:] if stem.startswith("Y") else None
        # a YouTube id opens the name, after an optional Y: look it up only where one of those may be listed
        maybe_id = stem[:11] in entries_of or stem[1:12] in entries_of
        keys = {stem, unprefixed, youtube_id(stem) if maybe_id else None}
        found = [number for key in keys if key in entries_of for number in entries_of[key]]
        if found:
            named[found] = True
        else:
            kept.append(index)
    if not kept:
        raise DataError(f"the black list {blacklist.path} names every clip of the data ({len(dataset)}): none is left")
    skipped = len(dataset) - len(kept)
    report = BlacklistReport(blacklist.path, len(blacklist.ids), skipped, int((~named).sum()))
    return ClipSubset(dataset, kept, report)
