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
from .events import Event, EventRules, EventTracker, EventUpdate
from .frames import FrameOutputs, frame_outputs, head_parts
from .frontend import LogMel
from .sources import (
    AUDIO_EXTENSIONS,
    ClipError,
    MonoBlocks,
    StreamResampler,
    fit_length,
    numbered_classes,
    read_mono,
    resample,
    to_clip,
)

POOLINGS = ("max", "mean")
LONG_SECONDS = 600.0  # predict_files decodes a longer file in blocks, as it scores it
BLOCK_SECONDS = 10.0  # the blocks a long file is decoded in (resampling one takes ~15x its size)


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


@dataclass
class StreamUpdate:
    """What a live stream made final: frame scores (classes x frames) starting at ``times`` (seconds
    from the stream's start), and the events that started or ended (see :meth:`Tagger.stream`)."""

    times: np.ndarray
    scores: np.ndarray
    events: list[EventUpdate]


def _chunk_mono(chunk) -> np.ndarray:
    """A chunk of a stream ((samples,) or (samples, channels); float, int16 or int32) as float32 mono."""
    chunk = np.asarray(chunk)
    if chunk.dtype in (np.int16, np.int32):
        chunk = chunk.astype(np.float32) / (np.iinfo(chunk.dtype).max + 1)
    elif not np.issubdtype(chunk.dtype, np.floating):
        raise ValueError(f"a chunk must be float in [-1, 1], int16 or int32, got {chunk.dtype}")
    if chunk.ndim == 2:
        chunk = chunk.mean(1)
    if chunk.ndim != 1:
        raise ValueError(f"a chunk must be (samples,) or (samples, channels), got {chunk.shape}")
    return chunk.astype(np.float32, copy=False)


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

    def _step(self, step: float | None) -> float:
        """Seconds between frames: ``step``, by default the front-end's hop."""
        step = self.audio.hop_length / self.audio.sample_rate if step is None else step
        if step <= 0:
            raise ValueError(f"the step must be positive, got {step:g}")
        return step

    def frame_scorer(self, step: float | None = None, embeddings: bool = False) -> FrameScorer:
        """A :class:`FrameScorer` for a sound handed over in pieces (float mono at the model's rate)."""
        return FrameScorer(self, self._step(step), embeddings)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else logits.softmax(-1)

    def frames(self, sound, sample_rate: int | None = None, step: float | None = None) -> Frames:
        """Frame scores of a sound (a path, or a waveform with its rate): the head at each time position of
        the last feature map (pooled over frequency), held over the position's share of the window and read
        every ``step`` seconds (default: the front-end's hop), as PANNs' frame-wise output.

        Sigmoids (a softmax over classes for a single-label model) of the frame logits of
        :func:`~dclsify.pipeline.frames.frame_outputs`. A long sound is cut into windows one clip apart
        (the last flush with its end, its positions that overlap the one before it left out): see
        :class:`FrameScorer`."""
        mono, source = self.mono(sound, sample_rate)
        scorer = self.frame_scorer(step)
        pieces = [scorer.push(mono), scorer.close()]
        times = np.concatenate([piece.times for piece in pieces])
        scores = self._scores(torch.cat([piece.logits for piece in pieces]))
        return Frames(source, scorer.seconds, scorer.step, times, scores.T.numpy(), self.class_names)

    def embed(
        self, sound, sample_rate: int | None = None, frames: bool = False, step: float | None = None
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The embedding of a sound (a path, or a waveform with its rate): what the last linear layer of the
        head sees (see :mod:`~dclsify.pipeline.frames`), float32.

        ``frames=False``: the clip embedding (embedding_size,), the mean over the sound's windows (one clip
        apart). ``frames=True``: ``(times, embeddings)``, the frame embeddings (frames, embedding_size)
        read every ``step`` seconds (default: the front-end's hop) at ``times`` (seconds), as :meth:`frames`."""
        mono, _ = self.mono(sound, sample_rate)
        scorer = self.frame_scorer(step, embeddings=frames)
        pieces = [scorer.push(mono), scorer.close()]
        if not frames:
            return scorer.clip_embedding()
        return np.concatenate([p.times for p in pieces]), torch.cat([p.embeddings for p in pieces]).numpy()

    def events(
        self, sound, sample_rate: int | None = None, rules: EventRules | None = None, step: float | None = None
    ) -> list[Event]:
        """The sound events of a sound (a path, decoded in blocks, or a waveform with its rate): its frame
        scores (:meth:`frames`) through :class:`~dclsify.pipeline.events.EventTracker` with ``rules``
        (default :class:`~dclsify.pipeline.events.EventRules`), ordered by onset."""
        rules, scorer = rules or EventRules(), self.frame_scorer(step)
        if isinstance(sound, (str, os.PathLike)):
            source = str(sound)
            with MonoBlocks(sound, self.audio.sample_rate) as blocks:
                return self._track(source, scorer, _then_close(scorer, map(scorer.push, blocks)), rules)
        mono, source = self.mono(sound, sample_rate)
        return self._track(source, scorer, [scorer.push(mono), scorer.close()], rules)

    def _track(self, source: str, scorer: FrameScorer, pieces: Iterable[FramePiece], rules: EventRules) -> list[Event]:
        tracker = EventTracker(self.class_names, rules, scorer.step, source)
        for piece in pieces:
            tracker.push(piece.times, self._scores(piece.logits).T.numpy())
        tracker.close(scorer.seconds)
        return sorted(tracker.events, key=lambda event: (event.onset, event.label))

    def stream(
        self,
        chunks: Iterable,
        sample_rate: int,
        rules: EventRules | None = None,
        step: float | None = None,
    ) -> Iterator[StreamUpdate]:
        """Tag live audio: ``chunks``, arrays of any size at ``sample_rate`` ((samples,) or (samples,
        channels); float in [-1, 1], or int16 / int32 PCM), as they come.

        Yields a :class:`StreamUpdate` each time frames or events become final: the frame scores of
        :meth:`frames` and the start and end lines of :class:`~dclsify.pipeline.events.EventTracker`
        (one continuous sound is one event: reported once when it starts, once when it ends). A ring
        buffer keeps at most two clips of audio. The events are those of :meth:`events` on the same
        audio in a file (the same windows, the same rules), to float rounding. A frame is final once the
        window holding it is full, and a frame in the window's last time position once the next window is
        (the sound's last window may take it over), so lines come up to a clip and a position (plus the
        median filter's half, and ``min_duration`` for a start, ``min_gap`` for an end) after the sound."""
        rules, scorer = rules or EventRules(), self.frame_scorer(step)
        tracker = EventTracker(self.class_names, rules, scorer.step, "<stream>")
        resampler = StreamResampler(int(sample_rate), self.audio.sample_rate)

        def update(piece: FramePiece, end: bool = False) -> StreamUpdate:
            scores = self._scores(piece.logits).T.numpy()
            lines = tracker.push(piece.times, scores)
            return StreamUpdate(piece.times, scores, lines + tracker.close(scorer.seconds) if end else lines)

        for chunk in chunks:
            found = update(scorer.push(resampler.push(_chunk_mono(chunk))))
            if len(found.times) or found.events:
                yield found
        found = update(scorer.push(resampler.close()))
        last = update(scorer.close(), end=True)
        yield StreamUpdate(
            np.concatenate([found.times, last.times]),
            np.concatenate([found.scores, last.scores], 1),
            found.events + last.events,
        )

    @property
    def embedding_size(self) -> int:
        return head_parts(self.model).embedding_size

    def _prediction(self, source: str, seconds: float, starts: list[int], scores: torch.Tensor) -> Prediction:
        pooled = scores.amax(0) if self.pooling == "max" else scores.mean(0)
        starts = np.array(starts) / self.audio.sample_rate
        return Prediction(source, seconds, len(scores), pooled.numpy(), self.class_names, starts, scores.numpy())

    def __call__(self, sound, sample_rate: int | None = None) -> Prediction:
        """Scores of a sound: a file path (decoded in blocks: a long recording is never whole in memory),
        or a waveform (see :meth:`mono`) with its rate. A file that cannot be read raises :class:`ClipError`."""
        if isinstance(sound, (str, os.PathLike)):
            starts: list[int] = []

            def windows(blocks: MonoBlocks) -> Iterator[torch.Tensor]:
                for start, window in self._windows_of(blocks):
                    starts.append(start)
                    yield window

            with MonoBlocks(sound, self.audio.sample_rate, BLOCK_SECONDS) as blocks:
                scores = self.score(windows(blocks))
            return self._prediction(str(sound), blocks.samples / self.audio.sample_rate, starts, scores)
        mono, source = self.mono(sound, sample_rate)
        sound, starts = self._cut(mono)
        scores = self.score(sound[start : start + self.audio.samples] for start in starts)
        return self._prediction(source, len(mono) / self.audio.sample_rate, starts, scores)

    def _windows_of(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, int16 window) of a sound given in blocks (float mono at the model's rate): the windows
        :meth:`windows` cuts from the whole, holding no more than a block and a clip of it."""
        length, kept, kept_from, total, start = self.audio.samples, np.zeros(0, np.int16), 0, 0, 0
        for block in blocks:
            kept, total = np.concatenate([kept, to_clip(block, len(block))]), total + len(block)
            while start + length <= total:
                yield start, torch.from_numpy(kept[start - kept_from : start - kept_from + length].copy())
                start += self.hop
            dropped = max(0, min(start, total - length) - kept_from)  # the sound's last clip stays
            kept, kept_from = kept[dropped:], kept_from + dropped
        if total < length:  # shorter than a clip: one zero-padded window
            yield 0, torch.from_numpy(fit_length(kept, length))
        elif start - self.hop + length < total:  # the last window ends with the sound
            yield total - length, torch.from_numpy(kept[total - length - kept_from :].copy())

    def predict_files(
        self, paths: Iterable[str | os.PathLike], workers: int | None = None
    ) -> Iterator[Prediction | tuple[str, str]]:
        """A :class:`Prediction` per file, in order, or ``(path, reason)`` for a file that cannot be read.

        ``workers`` processes decode the files ahead (None: none on the CPU, up to 8 on a GPU, where
        decoding a file takes far longer than scoring it). A file longer than ``LONG_SECONDS`` is
        decoded in blocks as it is scored instead, so memory does not grow with a recording's length.
        The windows of consecutive files fill the same batches: a folder of short clips is scored
        ``batch_size`` windows at a time."""
        paths = [str(path) for path in paths]
        if workers is None:
            workers = min(8, _usable_cores()) if self.device.type == "cuda" else 0
        workers = max(0, min(workers, len(paths) - 1))  # no process to start for one file
        decoded = torch.utils.data.DataLoader(
            _Decoded(paths, self.audio.sample_rate),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            prefetch_factor=1 if workers else None,  # a file each in flight
            # fork, as pack does: no re-import of torch per worker (they touch no CUDA, only soundfile)
            multiprocessing_context="fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None,
        )
        waiting: deque[_Pending] = deque()  # the files not yet answered, in order
        filling: deque[_Pending] = deque()  # those whose windows are not all taken yet
        batch: list[tuple[_Pending, torch.Tensor]] = []

        def take_windows() -> None:
            """Fill the batch from the files in order; score it whenever it is full."""
            while filling:
                pending = filling[0]
                for start, window in pending.windows:
                    pending.starts.append(start)
                    batch.append((pending, window))
                    if len(batch) == self.batch_size:
                        score()
                pending.cut = True
                filling.popleft()

        def score() -> None:
            rows = self.score(window for _, window in batch)
            for (pending, _), row in zip(batch, rows, strict=True):
                pending.rows.append(row)
            batch.clear()

        def answered() -> Iterator[Prediction | tuple[str, str]]:
            while waiting and waiting[0].cut and len(waiting[0].rows) == len(waiting[0].starts):
                done = waiting.popleft()
                if done.reason is not None:
                    yield done.source, done.reason
                else:
                    yield self._prediction(done.source, done.seconds, done.starts, torch.stack(done.rows))

        for source, mono in decoded:
            pending = _Pending(source)
            try:
                if mono is None:  # long: decoded here, a block at a time, as its windows are taken
                    blocks = MonoBlocks(source, self.audio.sample_rate, BLOCK_SECONDS)
                    pending.seconds = blocks.samples / self.audio.sample_rate
                    pending.windows = _closing(blocks, self._windows_of(blocks))
                elif isinstance(mono, str):
                    raise ClipError(mono)
                else:
                    pending.seconds = len(mono) / self.audio.sample_rate
                    sound, starts = self._cut(mono.numpy())
                    pending.windows = ((start, sound[start : start + self.audio.samples]) for start in starts)
            except ClipError as error:
                pending.reason, pending.cut = str(error), True
            waiting.append(pending)
            if pending.reason is None:
                filling.append(pending)
            take_windows()
            yield from answered()
        if batch:
            score()
        yield from answered()


def _then_close(scorer: FrameScorer, pieces: Iterator[FramePiece]) -> Iterator[FramePiece]:
    """``pieces``, then the scorer's last (once they are all in)."""
    yield from pieces
    yield scorer.close()


def _closing(blocks: MonoBlocks, windows: Iterator) -> Iterator:
    """``windows`` (cut from ``blocks``), closing its file when they end."""
    with blocks:
        yield from windows


@dataclass
class FramePiece:
    """The frames one call of a :class:`FrameScorer` made final: where they start (seconds), their
    logits (frames, classes) and, where asked for, their embeddings (frames, embedding_size)."""

    times: np.ndarray
    logits: torch.Tensor
    embeddings: torch.Tensor | None = None


class FrameScorer:
    """The frame logits of a sound handed over in pieces (float mono at the model's rate): what
    :meth:`Tagger.frames` gives for the whole, with memory that does not grow with the sound's length.

    The sound is cut into windows one clip apart, each scored once it is full; at :meth:`close`, the
    last window is the clip that ends with the sound (its positions that the window before it covers
    are left out), and a sound shorter than a clip is one zero-padded window. Each position of a
    window covers an equal share of it; a frame (``step`` seconds apart) takes the output of the
    position it falls in. :meth:`push` returns the frames that no window to come can cover: all but
    those in the last position of the last window, which the sound's last window may take over."""

    def __init__(self, tagger: Tagger, step: float, embeddings: bool = False) -> None:
        self.tagger, self.step, self.embeddings = tagger, step, embeddings
        self.length, self.rate = tagger.audio.samples, tagger.audio.sample_rate
        self.buffer, self.offset = np.zeros(0, np.float32), 0  # the sound from sample ``offset`` on
        self.received = self.scored = 0  # samples given; full windows scored
        self.next_frame = 0
        self.clip_embeddings: list[torch.Tensor] = []
        self._positions, self._share = 0, 0.0  # positions per window and the seconds each covers, once scored
        # the positions that frames to come may fall in: start times (seconds) and outputs
        self.table_times = np.zeros(0)
        self.table_logits = self.table_embeddings = None
        self.closed = False

    @property
    def seconds(self) -> float:
        """How long the sound given so far lasts."""
        return self.received / self.rate

    def push(self, mono: np.ndarray) -> FramePiece:
        """More of the sound; the frames this makes final."""
        if self.closed:
            raise ValueError("this sound was closed")
        mono = np.asarray(mono, dtype=np.float32)
        self.buffer, self.received = np.concatenate([self.buffer, mono]), self.received + len(mono)
        pieces = []
        while (self.scored + 1) * self.length <= self.received:  # full windows, a batch at a time
            ready = self.received // self.length - self.scored
            starts = [(self.scored + i) * self.length for i in range(min(ready, self.tagger.batch_size))]
            self._add_windows(starts, [None] * len(starts))
            self.scored += len(starts)
            pieces.append(self._frames(limit=self.table_times[-1]))
        keep = max(0, (self.scored - 1) * self.length)  # the last full window: the sound's last may overlap it
        self.buffer, self.offset = self.buffer[keep - self.offset :], keep
        return self._join(pieces)

    def close(self) -> FramePiece:
        """The end of the sound: its last window, and every frame left (up to the sound's end)."""
        if self.closed:
            raise ValueError("this sound was closed")
        if self.received == 0:
            raise ValueError("no sound was given")
        self.closed = True
        if self.scored == 0:  # shorter than a clip: one zero-padded window, from the start
            self._add_windows([0], [None])
        elif self.received > self.scored * self.length:
            after = self.table_times[-1] + self._share  # where the last full window's positions end
            start = self.received - self.length
            times = start / self.rate + self._share * np.arange(self._positions)
            self._add_windows([start], [times + self._share > after + 1e-9])
        frames = max(1, int(np.ceil(self.seconds / self.step - 1e-9)))
        return self._frames(limit=np.inf, count=frames)

    def clip_embedding(self) -> np.ndarray:
        """The mean of the windows' clip embeddings (the windows one clip apart, and the last)."""
        return torch.stack(self.clip_embeddings).mean(0).numpy()

    def _add_windows(self, starts: list[int], masks: list[np.ndarray | None]) -> None:
        """Score the windows at ``starts`` (samples); put their positions (those ``masks`` keep) in the table."""
        clips = [self._clip(start) for start in starts]
        outputs = self.tagger.outputs(clips)
        self._positions = outputs.frame_logits.shape[1]
        self._share = self.tagger.audio.seconds / self._positions
        self.clip_embeddings += list(outputs.clip_embeddings)
        for i, (start, mask) in enumerate(zip(starts, masks, strict=True)):
            times = start / self.rate + self._share * np.arange(self._positions)
            keep = torch.ones(self._positions, dtype=torch.bool) if mask is None else torch.from_numpy(mask)
            self._extend(times[keep.numpy()], outputs.frame_logits[i][keep], outputs.frame_embeddings[i][keep])

    def _clip(self, start: int) -> torch.Tensor:
        begin = start - self.offset
        return torch.from_numpy(to_clip(self.buffer[begin : begin + self.length], self.length))

    def _extend(self, times: np.ndarray, logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        if self.table_logits is None:
            self.table_times, self.table_logits = times, logits
            self.table_embeddings = embeddings if self.embeddings else None
            return
        self.table_times = np.concatenate([self.table_times, times])
        self.table_logits = torch.cat([self.table_logits, logits])
        if self.embeddings:
            self.table_embeddings = torch.cat([self.table_embeddings, embeddings])

    def _frames(self, limit: float, count: int | None = None) -> FramePiece:
        """The frames from ``next_frame`` on that start before ``limit`` (and number below ``count``)."""
        end = self.next_frame if count is None else count
        if limit != np.inf:  # near where the condition below turns, then exactly to it
            end = max(self.next_frame, int((limit - 1e-9) / self.step) - 2)
            while end * self.step + 1e-9 < limit:
                end += 1
        times = np.arange(self.next_frame, end) * self.step
        index = np.searchsorted(self.table_times, times + 1e-9, side="right") - 1
        index = torch.from_numpy(np.clip(index, 0, len(self.table_times) - 1))
        piece = FramePiece(times, self.table_logits[index], self.table_embeddings[index] if self.embeddings else None)
        self.next_frame = end
        first = int(index[-1]) if len(index) else 0  # the positions before this one are done with
        self.table_times = self.table_times[first:]
        self.table_logits = self.table_logits[first:]
        if self.embeddings:
            self.table_embeddings = self.table_embeddings[first:]
        return piece

    def _join(self, pieces: list[FramePiece]) -> FramePiece:
        if not pieces:
            return FramePiece(np.zeros(0), torch.zeros(0, len(self.tagger.class_names)), None)
        embeddings = torch.cat([p.embeddings for p in pieces]) if self.embeddings else None
        return FramePiece(np.concatenate([p.times for p in pieces]), torch.cat([p.logits for p in pieces]), embeddings)


@dataclass
class _Pending:
    """A file on its way through :meth:`Tagger.predict_files`: its ``windows`` to take (``cut`` once all
    were taken; ``reason`` for a file that cannot be read), their starts and the scores done so far."""

    source: str
    seconds: float = 0.0
    reason: str | None = None
    windows: Iterator[tuple[int, torch.Tensor]] = iter(())
    cut: bool = False
    starts: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)


class _Decoded(torch.utils.data.Dataset):
    """Each file as float mono at ``sample_rate``, or the reason it cannot be read (a string)."""

    def __init__(self, paths: list[str], sample_rate: int) -> None:
        self.paths, self.sample_rate = paths, sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | str | None]:
        """``(path, sound)``; the sound is None for a file longer than ``LONG_SECONDS`` (decoded later, in blocks)."""
        import soundfile

        path = self.paths[index]
        try:
            if soundfile.info(path).duration > LONG_SECONDS:
                return path, None
        except (soundfile.LibsndfileError, RuntimeError, OSError):
            pass  # read_mono says why
        try:  # a tensor: from a worker it travels through shared memory, not pickled through a pipe
            return path, torch.from_numpy(read_mono(path, self.sample_rate))
        except ClipError as error:
            return path, str(error)


def _usable_cores() -> int:
    """The cores this process may run on (a job's share of a node), as torch's DataLoader counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _as_is(item):  # the DataLoader's collate: the decoded sound as it is, not a tensor
    return item
