"""Sound events from frame scores: when each sound starts and ends.

The frame scores of a sound (classes x frames, ``step`` seconds apart, see :meth:`Tagger.frames
<dclsify.pipeline.predict.Tagger.frames>`) become events in four steps, for each class:

1. a median filter over ``median_filter`` seconds (odd length in frames; the edges repeat the first
   and last frame) smooths out single-frame flickers;
2. hysteresis: an event is a run of frames at or above ``low`` that holds at least one frame at or
   above ``threshold``, so a sound that wavers near the threshold is one event, not many;
3. events of a class less than ``min_gap`` seconds apart are merged;
4. events shorter than ``min_duration`` seconds are dropped.

An event starts where its first frame starts and ends where its last frame ends (at most the
sound's end); its score is the highest filtered frame score in it.

:class:`EventTracker` does this on frames handed over in pieces, as a live stream gives them, and
says when an event starts (as soon as it is sure to be kept) and when it ends (as soon as no later
frame can extend it). :func:`detect_events` hands it a whole sound at once, so a file and the same
audio streamed give the same events.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

FORMATS = ("table", "tsv", "csv", "json")


@dataclass(frozen=True)
class Event:
    """A sound event: ``label`` from ``onset`` to ``offset`` (seconds from the start of ``source``)."""

    source: str
    onset: float
    offset: float
    label: str
    score: float

    def as_dict(self) -> dict:
        """The event with times rounded to the millisecond (JSON and CSV keys: file, onset, offset, label, score)."""
        return {
            "file": self.source,
            "onset": round(self.onset, 3),
            "offset": round(self.offset, 3),
            "label": self.label,
            "score": round(self.score, 4),
        }


@dataclass(frozen=True)
class EventUpdate:
    """A line of a live stream: an event that has started (``offset`` None; ``score``: its best frame
    so far), or that has ended."""

    label: str
    onset: float
    score: float
    offset: float | None = None

    @property
    def time(self) -> float:
        """The time the line is about, its order among lines: the onset of a start, the offset of an end."""
        return self.onset if self.offset is None else self.offset

    def as_dict(self) -> dict:
        """The line as JSON keys (label, onset, offset for an end, score), times rounded to the millisecond."""
        line = {"label": self.label, "onset": round(self.onset, 3)}
        if self.offset is not None:
            line["offset"] = round(self.offset, 3)
        return line | {"score": round(self.score, 4)}


@dataclass(frozen=True)
class EventRules:
    """How frame scores become events (see the module's doc). ``threshold`` and ``low`` are one value
    or one per class; ``low`` None is 0.6 x the threshold (0.3 for 0.5). Times in seconds; 0 turns a
    step off."""

    threshold: float | Sequence[float] = 0.5
    low: float | Sequence[float] | None = None
    median_filter: float = 0.25
    min_duration: float = 0.1
    min_gap: float = 0.1

    def __post_init__(self) -> None:
        for name in ("median_filter", "min_duration", "min_gap"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be 0 or more seconds, got {value:g}")

    def thresholds(self, classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The (threshold, low) of each of ``classes`` classes, checked: 0 <= low <= threshold <= 1."""
        high = _per_class(self.threshold, classes, "threshold")
        low = 0.6 * high if self.low is None else _per_class(self.low, classes, "low")
        for name, values in (("threshold", high), ("low", low)):
            outside = ~((values >= 0) & (values <= 1))  # NaN too
            if outside.any():
                raise ValueError(f"{name} must be in [0, 1], got {values[outside][0]:g}")
        above = np.flatnonzero(low > high)
        if len(above):  # the first class at fault, its own two values
            c = above[0]
            raise ValueError(f"low must not exceed the threshold: low {low[c]:g} > threshold {high[c]:g}")
        return high, low

    def median_frames(self, step: float) -> int:
        """The median filter's length in frames of ``step`` seconds: odd, at least 1."""
        frames = max(1, round(self.median_filter / step))
        return frames + 1 - frames % 2


def _per_class(value, classes: int, name: str) -> np.ndarray:
    values = np.broadcast_to(np.asarray(value, dtype=np.float64), (classes,)) if np.ndim(value) == 0 else None
    if values is None:
        values = np.asarray(value, dtype=np.float64)
        if values.shape != (classes,):
            raise ValueError(f"{name} needs one value or one per class ({classes}), got {values.shape[0]}")
    return np.array(values)


def read_thresholds(
    path: str | os.PathLike, class_names: list[str], threshold: float, low: float | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-class thresholds from a CSV with the columns ``label`` and ``threshold`` (and ``low``, optional).

    A class the file does not name takes ``threshold`` (and ``low``); a label that is not one of
    ``class_names`` is an error. Returns (thresholds, lows or None where neither the file nor ``low`` gives any)."""
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = set(reader.fieldnames or ())
        if not {"label", "threshold"} <= columns:
            raise ValueError(f"{path}: needs the columns label and threshold, has {', '.join(sorted(columns))}")
        rows = [(reader.line_num, row) for row in reader]  # the line a row ends on: blank lines count
    index = {name: i for i, name in enumerate(class_names)}
    high = np.full(len(class_names), threshold, dtype=np.float64)
    given_low = "low" in columns or low is not None
    lows = np.full(len(class_names), np.nan if low is None else low, dtype=np.float64)
    for line, row in rows:
        label = row["label"]
        if label not in index:
            raise ValueError(f"{path}, line {line}: {label!r} is not one of the model's classes")
        try:
            high[index[label]] = float(row["threshold"])
            if row.get("low") not in (None, ""):
                lows[index[label]] = float(row["low"])
        except (TypeError, ValueError):  # TypeError: a row without its threshold (None)
            raise ValueError(f"{path}, line {line}: thresholds must be numbers") from None
    if not given_low:
        return high, None
    return high, np.where(np.isnan(lows), 0.6 * high, lows)


_MEDIAN_VALUES = 1 << 22  # window values the median filter sorts at a time (memory)


class _MedianFilter:
    """A running median over ``frames`` frames (odd) of a (classes, frames) score stream, the edges
    repeating the first and last frame: what ``scipy.ndimage.median_filter(mode="nearest")`` gives
    for the whole, given in pieces. A frame comes out once the frames after it that it needs are in."""

    def __init__(self, frames: int) -> None:
        self.half = frames // 2
        self.left: np.ndarray | None = None  # the ``half`` frames before the pending ones
        self.pending = np.zeros((0, 0), dtype=np.float32)
        self.times = np.zeros(0)

    def push(
        self, times: np.ndarray, scores: np.ndarray, last: bool = False, floor: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The frames (times, filtered scores) that ``scores`` (and ``last``: the end) make final. With
        ``floor`` (one value per class), a frame whose median is below it may come out as -inf: only
        whether it is below counts there, and that needs no median (at most half its window reach it)."""
        if scores.shape[1]:
            if self.left is None:
                self.left = np.repeat(scores[:, :1], self.half, axis=1)
                self.pending = scores.copy()  # no view of the caller's array: it may refill it
            else:
                self.pending = np.concatenate([self.pending, scores], axis=1)
            self.times = np.concatenate([self.times, times])
        ready = self.pending.shape[1] if last else max(0, self.pending.shape[1] - self.half)
        if self.left is None or ready == 0:  # nothing yet, or too little for a window
            return times[:0], scores[:, :0]
        right = np.repeat(self.pending[:, -1:], self.half, axis=1) if last else self.pending[:, :0]
        buffer = np.concatenate([self.left, self.pending, right], axis=1)
        filtered = self.pending[:, :ready] if self.half == 0 else self._medians(buffer, ready, floor)
        out_times = self.times[:ready]
        self.left = buffer[:, ready : ready + self.half]
        self.pending, self.times = self.pending[:, ready:], self.times[ready:]
        return out_times, filtered

    def _medians(self, buffer: np.ndarray, ready: int, floor: np.ndarray | None) -> np.ndarray:
        """The medians of the first ``ready`` windows of ``buffer`` (those reaching ``floor``, -inf the others)."""
        size = 2 * self.half + 1
        windows = np.lib.stride_tricks.sliding_window_view(buffer, size, axis=1)
        out = np.full((len(buffer), ready), -np.inf, dtype=np.float32)
        if floor is not None:  # a median reaches the floor where more than half its window's frames do
            counts = np.zeros((len(buffer), buffer.shape[1] + 1), dtype=np.int32)
            np.cumsum(buffer >= floor[:, None], axis=1, out=counts[:, 1:])
            reach = counts[:, size : size + ready] - counts[:, :ready] > self.half
        block = max(1, _MEDIAN_VALUES // (len(buffer) * size))  # frames at a time
        for begin in range(0, ready, block):
            part, into = windows[:, begin : begin + block], out[:, begin : begin + block]
            if floor is None:
                into[:] = np.median(part, axis=-1)
            elif (mask := reach[:, begin : begin + block]).any():
                into[mask] = np.median(part[mask], axis=-1)
        return out


@dataclass
class _Run:
    """Frames at or above the low threshold, one after another, up to the one that reaches the
    threshold (``confirmed``: from then on its frames go to the event)."""

    onset: float
    offset: float
    score: float
    confirmed: bool  # a frame reached the threshold


@dataclass
class _Open:
    """An event not final yet: it may still grow, or merge with a run to come."""

    onset: float
    offset: float
    score: float
    started: bool = False  # its start was reported


def _grow(span: _Run | _Open, times: np.ndarray, row: np.ndarray, begin: int, end: int, step: float) -> None:
    """``span`` takes in frames ``begin:end`` (of ``times``; scores ``row``)."""
    span.offset = float(times[end - 1]) + step
    span.score = max(span.score, float(row[begin:end].max()))


@dataclass
class _ClassState:
    run: _Run | None = None
    event: _Open | None = None


@dataclass
class EventTracker:
    """Events of a sound handed over as frame scores in pieces: :meth:`push` (times, scores) as they
    come, :meth:`close` at the end. Each call returns the :class:`EventUpdate` lines it makes final:
    a start as soon as the event is sure to last ``min_duration`` (its score: the best frame up to
    there), an end as soon as no later frame can extend it (``min_gap`` after its last frame, more
    while a run that might merge is open). The lines and :attr:`events` (those that ended) are the
    same however the frames are cut into pieces. Times are compared to a millionth of ``step``: a
    duration or gap of whole frames equal to ``min_duration`` or ``min_gap`` counts as equal, whatever
    the float rounding of the times."""

    class_names: list[str]
    rules: EventRules
    step: float
    source: str = ""
    events: list[Event] = field(default_factory=list)

    PIECE = 1024  # frames tracked at a time: the memory of a long piece stays small

    def __post_init__(self) -> None:
        if self.step <= 0:
            raise ValueError(f"the step must be positive, got {self.step:g}")
        self.high, self.low = self.rules.thresholds(len(self.class_names))
        self._median = _MedianFilter(self.rules.median_frames(self.step))
        self._states = [_ClassState() for _ in self.class_names]
        self._now = 0.0  # where the frames seen so far end
        self._eps = 1e-6 * self.step

    def push(self, times: np.ndarray, scores: np.ndarray) -> list[EventUpdate]:
        """Frame scores (classes x frames) starting at ``times`` (seconds, ``step`` apart, after those given before)."""
        times, scores = np.asarray(times, dtype=np.float64), np.asarray(scores, np.float32)
        updates = []
        for begin in range(0, len(times), self.PIECE):
            end = begin + self.PIECE
            updates += self._track(*self._median.push(times[begin:end], scores[:, begin:end], floor=self.low))
        return sorted(updates, key=lambda update: update.time)

    def close(self, seconds: float | None = None) -> list[EventUpdate]:
        """The end of the sound (``seconds`` long: offsets stop there): every event still open ends."""
        nothing = np.zeros((len(self.class_names), 0), np.float32)
        updates = self._track(*self._median.push(np.zeros(0), nothing, last=True, floor=self.low))
        end = self._now if seconds is None else seconds
        for c, state in enumerate(self._states):
            state.run = None  # a confirmed run is in its event already; an unconfirmed one is no event
            if state.event is not None:
                state.event.offset = min(state.event.offset, end)
                self._finish(c, state, updates)
        return sorted(updates, key=lambda update: update.time)

    def _far(self, gap: float) -> bool:
        """Whether ``gap`` seconds keep two events apart: at least ``min_gap``."""
        return gap >= self.rules.min_gap - self._eps

    def _lasts(self, duration):
        """Whether ``duration`` seconds (one or an array) keep an event: at least ``min_duration``."""
        return duration >= self.rules.min_duration - self._eps

    def _track(self, times: np.ndarray, scores: np.ndarray) -> list[EventUpdate]:
        updates: list[EventUpdate] = []
        if not len(times):
            return updates
        above_low = scores >= self.low[:, None]
        above_high = scores >= self.high[:, None]
        self._now = float(times[-1]) + self.step
        busy = above_low.any(1) | np.array([s.run is not None or s.event is not None for s in self._states])
        for c in np.flatnonzero(busy):
            state = self._states[c]
            flags = np.concatenate([[state.run is not None], above_low[c], [False]]).astype(np.int8)
            edges = np.flatnonzero(np.diff(flags))  # run starts (+1) and ends (-1), as frame indices
            bounds = edges.reshape(-1, 2) if state.run is None else np.concatenate([[0], edges]).reshape(-1, 2)
            for begin, end in bounds:
                if end == begin:  # the run open before this piece ended with it
                    state.run = None
                    continue
                if state.run is None:  # a new run
                    state.run = _Run(float(times[begin]), 0.0, -np.inf, False)
                self._extend(c, state, times, scores[c], above_high[c], begin, end, updates)
                if end < len(times):  # the run ended in this piece
                    state.run = None
            event, run = state.event, state.run
            if event is not None and self._far(self._now - event.offset):
                if run is None or self._far(run.onset - event.offset):  # no run that could still merge
                    self._finish(c, state, updates)
        return sorted(updates, key=lambda update: update.time)

    def _extend(self, c: int, state: _ClassState, times, row, high, begin: int, end: int, updates) -> None:
        """Frames ``begin:end`` (all at or above low) go on with the class's run, frame-exact where it
        matters, so that pieces change nothing: the run joins an event with the frame that reaches the
        threshold, and the event starts with the frame that makes it last ``min_duration``."""
        run = state.run
        if not run.confirmed:
            reached = np.flatnonzero(high[begin:end])
            if not len(reached):
                _grow(run, times, row, begin, end, self.step)
                return
            split = begin + int(reached[0]) + 1
            _grow(run, times, row, begin, split, self.step)
            run.confirmed = True
            self._confirm(c, state, run, updates)
            begin = split
        event = state.event
        if begin < end and not event.started:
            long_enough = self._lasts(times[begin:end] + self.step - event.onset)
            if long_enough.any():
                split = begin + int(np.argmax(long_enough)) + 1
                _grow(event, times, row, begin, split, self.step)
                self._start(c, event, updates)
                begin = split
        if begin < end:
            _grow(event, times, row, begin, end, self.step)

    def _confirm(self, c: int, state: _ClassState, run: _Run, updates: list[EventUpdate]) -> None:
        """A run that reached the threshold (its frames up to there): it extends the open event, or
        (``min_gap`` or more after it) ends it and opens its own."""
        if state.event is not None and self._far(run.onset - state.event.offset):
            self._finish(c, state, updates)
        if state.event is None:
            state.event = _Open(run.onset, run.offset, run.score)
        else:
            state.event.offset, state.event.score = run.offset, max(state.event.score, run.score)
        event = state.event
        if not event.started and self._lasts(event.offset - event.onset):
            self._start(c, event, updates)

    def _start(self, c: int, event: _Open, updates: list[EventUpdate]) -> None:
        event.started = True
        updates.append(EventUpdate(self.class_names[c], event.onset, event.score))

    def _finish(self, c: int, state: _ClassState, updates: list[EventUpdate]) -> None:
        """The open event is final: kept if it lasted ``min_duration`` (its start was reported then), else dropped."""
        event, state.event = state.event, None
        if event.started:
            label = self.class_names[c]
            updates.append(EventUpdate(label, event.onset, event.score, event.offset))
            self.events.append(Event(self.source, event.onset, event.offset, label, event.score))


def detect_events(
    times: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    rules: EventRules,
    step: float,
    seconds: float,
    source: str = "",
) -> list[Event]:
    """The events in a sound's frame scores (classes x frames at ``times``, ``step`` apart; the sound
    lasts ``seconds``), ordered by onset, then label."""
    tracker = EventTracker(class_names, rules, step, source)
    tracker.push(times, scores)
    tracker.close(seconds)
    return sorted(tracker.events, key=lambda event: (event.onset, event.label))


def format_events(events: Sequence[Event], kind: str) -> str:
    """Events as text: ``tsv`` (DCASE: filename onset offset event_label, with a header), ``csv``
    (file, onset, offset, label, score) or ``json`` (one object per line)."""
    if kind == "json":
        return "".join(json.dumps(event.as_dict()) + "\n" for event in events)
    out = io.StringIO()
    if kind == "tsv":
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(["filename", "onset", "offset", "event_label"])
        writer.writerows([e.source, f"{e.onset:.3f}", f"{e.offset:.3f}", e.label] for e in events)
    elif kind == "csv":
        writer = csv.DictWriter(out, ["file", "onset", "offset", "label", "score"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(event.as_dict() for event in events)
    else:
        raise ValueError(f"the format must be one of {', '.join(FORMATS[1:])}, got {kind!r}")
    return out.getvalue()
