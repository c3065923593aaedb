"""Tagging sounds with a trained checkpoint: ``Tagger(checkpoint)(path_or_waveform)``.

A file of any format, rate and length is decoded, mixed to mono and resampled to the
rate the model was trained at; it is cut into windows of the model's clip length (a hop
apart, the last one flush with the end; a shorter sound is one zero-padded window), each
window is scored (sigmoids, or a softmax for a single-label model) and the windows'
scores are pooled (max or mean) into the sound's. Windows are scored in batches, across
files too (a folder of clips each one window long still fills the batches), on the GPU
where torch sees one.

:meth:`Tagger.frames` gives scores per time step instead (the head at each time position of the
model's last feature map, :mod:`~dclsify.pipeline.frames`), :meth:`Tagger.embed` what the head's
last linear layer sees, per sound or per time step.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..surgery.audio import AudioConfig
from ..surgery.checkpoint import load
from ..surgery.dcls import bake
from .frames import FrameOutputs, frame_outputs, head_parts
from .frontend import LogMel
from .sources import AUDIO_EXTENSIONS, ClipError, numbered_classes, read_mono, resample, to_clip

POOLINGS = ("max", "mean")


@dataclass
class Prediction:
    """The scores of one sound: ``scores`` (one per class), pooled over its ``windows`` windows,
    which start at ``window_starts`` (seconds) and score ``window_scores`` (windows x classes)."""

    source: str
    seconds: float
    windows: int
    scores: np.ndarray
    class_names: list[str]
    window_starts: np.ndarray
    window_scores: np.ndarray

    def top(self, k: int = 5, threshold: float | None = None) -> list[tuple[str, float]]:
        """The ``k`` best (class name, score) pairs, those at least ``threshold`` if given."""
        if k < 0:
            raise ValueError(f"k must be at least 0, got {k}")
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [
            (self.class_names[i], float(self.scores[i]))
            for i in order
            if threshold is None or self.scores[i] >= threshold
        ]

    def as_dict(self, k: int = 5, threshold: float | None = None) -> dict:
        labels = [{"label": name, "score": score} for name, score in self.top(k, threshold)]
        return {"source": self.source, "seconds": self.seconds, "windows": self.windows, "labels": labels}


@dataclass
class Frames:
    """The frame scores of one sound: ``scores`` (classes x frames) at ``times`` (seconds, where each
    frame starts, ``step`` apart), the head applied at each time position of the model's last feature map."""

    source: str
    seconds: float
    step: float
    times: np.ndarray
    scores: np.ndarray
    class_names: list[str]


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
    ``device="auto"`` (the default) is the first CUDA device where torch sees one, else the CPU.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str | torch.device = "auto",
        pooling: str = "max",
        hop_seconds: float | None = None,
        batch_size: int = 16,
        trust_code: bool = False,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
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

    def _cut(self, mono: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """``mono`` as int16 (a short sound zero-padded to one clip) and the start of each window in it."""
        length = self.audio.samples
        sound = torch.from_numpy(to_clip(mono, max(len(mono), length)))
        starts = list(range(0, len(sound) - length + 1, self.hop))
        if starts[-1] + length < len(sound):
            starts.append(len(sound) - length)  # the last window ends with the sound
        return sound, starts

    def windows(self, mono: np.ndarray) -> torch.Tensor:
        """(windows, samples) int16 clips covering ``mono`` (float, at the model's rate)."""
        sound, starts = self._cut(mono)
        return torch.stack([sound[start : start + self.audio.samples] for start in starts])

    def mono(self, sound, sample_rate: int | None = None) -> tuple[np.ndarray, str]:
        """A path or a waveform as float mono at the model's rate, and where it came from.

        A waveform is (samples,), or (channels, samples) or (samples, channels): the shorter
        axis is taken for the channels. Floats are taken as in [-1, 1], integers as PCM
        (int16 / 32768, int32 / 2**31)."""
        if isinstance(sound, (str, os.PathLike)):
            return read_mono(sound, self.audio.sample_rate), str(sound)
        if sample_rate is None:
            raise ValueError("a waveform needs its sample_rate")
        waveform = torch.as_tensor(sound).detach().cpu()
        if waveform.dtype in (torch.int16, torch.int32):
            waveform = waveform.float() / (torch.iinfo(waveform.dtype).max + 1)
        elif not waveform.is_floating_point():
            raise ValueError(f"a waveform must be float in [-1, 1], int16 or int32, got {waveform.dtype}")
        if waveform.ndim == 2:
            waveform = waveform.mean(int(waveform.shape[0] > waveform.shape[1]))  # average the shorter axis
        if waveform.ndim != 1 or waveform.numel() == 0:
            raise ValueError(
                f"a waveform must be (samples,) or (channels, samples), not empty; got {tuple(waveform.shape)}"
            )
        return resample(waveform.float().numpy(), int(sample_rate), self.audio.sample_rate), "<waveform>"

    @torch.inference_mode()
    def score(self, clips: Iterable[torch.Tensor]) -> torch.Tensor:
        """int16 clips of the model's length -> (clips, classes) float32 scores on the CPU, ``batch_size`` at a time.

        Only one batch of clips is gathered at a time (the windows of a long sound are views of it)."""
        clips, scores = iter(clips), []
        while batch := list(itertools.islice(clips, self.batch_size)):
            logits = self.model(self.frontend(torch.stack(batch).to(self.device))).float()
            scores.append(torch.sigmoid(logits) if self.multi_label else logits.softmax(-1))
        return torch.cat(scores).cpu() if scores else torch.zeros(0, len(self.class_names))  # one wait, at the end

    @torch.inference_mode()
    def outputs(self, clips: Iterable[torch.Tensor]) -> FrameOutputs:
        """int16 clips of the model's length -> their clip and frame logits and embeddings (see
        :func:`~dclsify.pipeline.frames.frame_outputs`), float32 on the CPU, ``batch_size`` at a time."""
        clips, parts = iter(clips), head_parts(self.model)
        batches = []
        while batch := list(itertools.islice(clips, self.batch_size)):
            outputs = frame_outputs(self.model, self.frontend(torch.stack(batch).to(self.device)), parts)
            batches.append([tensor.float() for tensor in vars(outputs).values()])
        return FrameOutputs(*(torch.cat(tensors).cpu() for tensors in zip(*batches, strict=True)))

    def _positions(self, mono: np.ndarray) -> tuple[np.ndarray, FrameOutputs]:
        """The outputs of the windows of ``mono`` one clip apart (the last flush with the end), and the
        time (seconds) where each of their positions starts; each position covers an equal share of its window.

        The frame outputs are joined: (positions, ...) over the whole sound, where the last window's positions
        that end before the previous window ends are left out (the first one kept may start inside it: the
        times it covers past the previous window are its)."""
        length = self.audio.samples
        sound = torch.from_numpy(to_clip(mono, max(len(mono), length)))
        starts = list(range(0, len(sound) - length + 1, length))
        if starts[-1] + length < len(sound):
            starts.append(len(sound) - length)
        outputs = self.outputs(sound[start : start + length] for start in starts)
        positions = outputs.frame_logits.shape[1]
        share = self.audio.seconds / positions
        times, keep = [], []
        for index, start in enumerate(np.array(starts) / self.audio.sample_rate):
            window_times = start + share * np.arange(positions)
            after = times[-1][-1] + share if times else 0.0  # where the previous window's positions end
            mask = window_times + share > after + 1e-9
            times.append(window_times[mask])
            keep.append((index, torch.from_numpy(mask)))
        joined = FrameOutputs(
            torch.cat([outputs.frame_logits[i][mask] for i, mask in keep]),
            outputs.clip_logits,
            torch.cat([outputs.frame_embeddings[i][mask] for i, mask in keep]),
            outputs.clip_embeddings,
        )
        return np.concatenate(times), joined

    def _step(self, step: float | None) -> float:
        """Seconds between frames: ``step``, by default the front-end's hop."""
        step = self.audio.hop_length / self.audio.sample_rate if step is None else step
        if step <= 0:
            raise ValueError(f"the step must be positive, got {step:g}")
        return step

    @staticmethod
    def _grid(position_times: np.ndarray, seconds: float, step: float) -> tuple[np.ndarray, np.ndarray]:
        """Frame times ``step`` apart over ``seconds``, and the position each falls in."""
        times = np.arange(max(1, int(np.ceil(seconds / step - 1e-9)))) * step
        index = np.clip(np.searchsorted(position_times, times + 1e-9, side="right") - 1, 0, len(position_times) - 1)
        return times, index

    def frames(self, sound, sample_rate: int | None = None, step: float | None = None) -> Frames:
        """Frame scores of a sound (a path, or a waveform with its rate): the head at each time position of
        the last feature map (pooled over frequency), held over the position's share of the window and read
        every ``step`` seconds (default: the front-end's hop), as PANNs' frame-wise output.

        Sigmoids (a softmax over classes for a single-label model) of the frame logits of
        :func:`~dclsify.pipeline.frames.frame_outputs`. A long sound is cut into windows one clip apart
        (the last flush with its end, its positions that overlap the one before it left out)."""
        step, (mono, source) = self._step(step), self.mono(sound, sample_rate)
        seconds = len(mono) / self.audio.sample_rate
        position_times, outputs = self._positions(mono)
        times, index = self._grid(position_times, seconds, step)
        logits = outputs.frame_logits[torch.from_numpy(index)]
        scores = torch.sigmoid(logits) if self.multi_label else logits.softmax(-1)
        return Frames(source, seconds, step, times, scores.T.numpy(), self.class_names)

    def embed(
        self, sound, sample_rate: int | None = None, frames: bool = False, step: float | None = None
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The embedding of a sound (a path, or a waveform with its rate): what the last linear layer of the
        head sees (see :mod:`~dclsify.pipeline.frames`), float32.

        ``frames=False``: the clip embedding (embedding_size,), the mean over the sound's windows (one clip
        apart). ``frames=True``: ``(times, embeddings)``, the frame embeddings (frames, embedding_size)
        read every ``step`` seconds (default: the front-end's hop) at ``times`` (seconds), as :meth:`frames`."""
        step, (mono, _) = self._step(step), self.mono(sound, sample_rate)
        position_times, outputs = self._positions(mono)
        if not frames:
            return outputs.clip_embeddings.mean(0).numpy()
        times, index = self._grid(position_times, len(mono) / self.audio.sample_rate, step)
        return times, outputs.frame_embeddings[torch.from_numpy(index)].numpy()

    @property
    def embedding_size(self) -> int:
        return head_parts(self.model).embedding_size

    def _prediction(self, source: str, seconds: float, starts: list[int], scores: torch.Tensor) -> Prediction:
        pooled = scores.amax(0) if self.pooling == "max" else scores.mean(0)
        starts = np.array(starts) / self.audio.sample_rate
        return Prediction(source, seconds, len(scores), pooled.numpy(), self.class_names, starts, scores.numpy())

    def __call__(self, sound, sample_rate: int | None = None) -> Prediction:
        """Scores of a sound: a file path, or a waveform (see :meth:`mono`) with its rate."""
        mono, source = self.mono(sound, sample_rate)
        sound, starts = self._cut(mono)
        scores = self.score(sound[start : start + self.audio.samples] for start in starts)
        return self._prediction(source, len(mono) / self.audio.sample_rate, starts, scores)

    def predict_files(
        self, paths: Iterable[str | os.PathLike], workers: int | None = None
    ) -> Iterator[Prediction | tuple[str, str]]:
        """A :class:`Prediction` per file, in order, or ``(path, reason)`` for a file that cannot be read.

        ``workers`` processes decode the files ahead (None: none on the CPU, up to 8 on a GPU, where
        decoding a file takes far longer than scoring it). The windows of consecutive files fill the
        same batches: a folder of short clips is scored ``batch_size`` windows at a time."""
        paths = [str(path) for path in paths]
        if workers is None:
            workers = min(8, _usable_cores()) if self.device.type == "cuda" else 0
        workers = max(0, min(workers, len(paths) - 1))  # no process to start for one file
        decoded = torch.utils.data.DataLoader(
            _Decoded(paths, self.audio.sample_rate),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            prefetch_factor=1 if workers else None,  # a file each in flight: long recordings are large
            # fork, as pack does: no re-import of torch per worker (they touch no CUDA, only soundfile)
            multiprocessing_context="fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None,
        )
        length = self.audio.samples
        waiting: deque[_Pending] = deque()  # the files not yet answered, in order
        windows: deque[tuple[_Pending, int]] = deque()  # their windows not yet scored

        def score(count: int) -> None:
            taken = [windows.popleft() for _ in range(count)]
            rows = self.score(pending.sound[start : start + length] for pending, start in taken)
            for (pending, _), row in zip(taken, rows, strict=True):
                pending.rows.append(row)

        def answered() -> Iterator[Prediction | tuple[str, str]]:
            while waiting and len(waiting[0].rows) == len(waiting[0].starts):
                done = waiting.popleft()
                if done.sound is None:
                    yield done.source, done.reason
                else:
                    yield self._prediction(done.source, done.seconds, done.starts, torch.stack(done.rows))

        for source, mono in decoded:
            if isinstance(mono, str):
                waiting.append(_Pending(source, reason=mono))
            else:
                mono = mono.numpy()
                pending = _Pending(source, len(mono) / self.audio.sample_rate, None, *self._cut(mono))
                waiting.append(pending)
                windows.extend((pending, start) for start in pending.starts)
            while len(windows) >= self.batch_size:
                score(self.batch_size)
            yield from answered()
        score(len(windows))
        yield from answered()


@dataclass
class _Pending:
    """A file on its way through :meth:`Tagger.predict_files`: its cut sound (None: unreadable,
    for ``reason``) and the scores of the windows done so far."""

    source: str
    seconds: float = 0.0
    reason: str | None = None
    sound: torch.Tensor | None = None
    starts: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)


class _Decoded(torch.utils.data.Dataset):
    """Each file as float mono at ``sample_rate``, or the reason it cannot be read (a string)."""

    def __init__(self, paths: list[str], sample_rate: int) -> None:
        self.paths, self.sample_rate = paths, sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | str]:
        try:  # a tensor: from a worker it travels through shared memory, not pickled through a pipe
            return self.paths[index], torch.from_numpy(read_mono(self.paths[index], self.sample_rate))
        except ClipError as error:
            return self.paths[index], str(error)


def _usable_cores() -> int:
    """The cores this process may run on (a job's share of a node), as torch's DataLoader counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _as_is(item):  # the DataLoader's collate: the decoded sound as it is, not a tensor
    return item
