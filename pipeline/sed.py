"""Sound event detection metrics against strong labels: event-based F1, segment-based F1 and PSDS.

The metrics are `sed_scores_eval <https://github.com/fgnt/sed_scores_eval>`_'s (the ``sed`` extra);
this module reads the labels, finds the clips, runs the model and hands sed_scores_eval what it takes:

- event-based F1 (``collar_based.fscore``): a detection matches a reference event of its class whose
  onset is within 200 ms of its own and whose offset is within max(200 ms, 20 % of the reference
  event's length), each event matched once (DCASE's ``sed_eval`` settings);
- segment-based F1 (``segment_based.fscore``): per 1-s segment of each file, a class is active where
  an event of it overlaps the segment;
- PSDS (``intersection_based.psds``, DCASE 2021-2023's two scenarios, eFPR per hour up to 100):
  threshold-free, from frame scores.

The F1s are those of the events :class:`~dclsify.pipeline.events.EventRules` makes (hysteresis,
median filter, minimum duration and gap): sed_scores_eval gets scores that are 1 inside our events
and 0 outside, and the threshold 0.5, so that it detects exactly our events. PSDS gets the frame
scores after the same median filter (``median_filter=0``: the raw frame scores), as the DCASE
baselines feed theirs: PSDS then sweeps the threshold over the scores our events are cut from.

Only the classes the labels name are scored: sed_scores_eval refuses a class without a reference
event (its recall is undefined), and PSDS would count it as a class never found. Detections of the
model's other classes are counted apart (``unscored_events``), since labels of a few classes need
not say whether the others sound.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .events import Event, EventRules, detect_events
from .predict import Frames, Tagger, audio_files
from .sources import ClipError, DataError, audioset_classes, clip_stem

ONSET_COLLAR = 0.2  # seconds
OFFSET_COLLAR = 0.2  # seconds, at least
OFFSET_COLLAR_RATE = 0.2  # of the reference event's length, when that is more
SEGMENT = 1.0  # seconds
INSTALL = "strong-label metrics need sed_scores_eval: pip install 'dclsify[sed]'"

# the columns of a strong-label TSV: DCASE's, and AudioSet's strong labels (labels by mid)
COLUMNS = (
    ("filename", "onset", "offset", "event_label"),
    ("segment_id", "start_time_seconds", "end_time_seconds", "label"),
)

Reference = dict[str, list[tuple[float, float, str]]]  # (onset, offset, label) events of each file


@dataclass(frozen=True)
class Scenario:
    """A PSDS operating scenario: detection and ground-truth intersection criteria (``dtc``,
    ``gtc``), cross-trigger tolerance (``cttc``, None: none), the weights of cross triggers and of
    the classes' spread, and the largest effective false positive rate (per hour)."""

    dtc: float
    gtc: float
    cttc: float | None
    alpha_ct: float
    alpha_st: float
    max_efpr: float = 100.0


PSDS1 = Scenario(dtc=0.7, gtc=0.7, cttc=None, alpha_ct=0.0, alpha_st=1.0)  # DCASE 2021-2023, scenario 1
PSDS2 = Scenario(dtc=0.1, gtc=0.1, cttc=0.3, alpha_ct=0.5, alpha_st=1.0)  # scenario 2


@dataclass(frozen=True)
class F1Score:
    f1: float
    precision: float
    recall: float


@dataclass
class EventMetrics:
    """Event- and segment-based F1 (micro: over all events or segments; macro: the mean over the
    scored ``classes``), PSDS of scenarios 1 and 2 (None without frame scores), and counts.
    ``per_class``: for each scored class, its reference events, event and segment F1 and PSDS."""

    event_micro: F1Score
    event_macro: F1Score
    segment_micro: F1Score
    segment_macro: F1Score
    psds1: float | None
    psds2: float | None
    files: int
    reference_events: int
    detected_events: int  # of the scored classes
    unscored_events: int  # detections of classes the labels do not name: left out
    classes: list[str]
    per_class: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self, per_class: bool = True) -> dict:
        data = {
            name: vars(value) if isinstance(value, F1Score) else value
            for name, value in vars(self).items()
            if name != "per_class"
        }
        if per_class:
            data["per_class"] = self.per_class
        return data


class SedUnavailable(RuntimeError):
    """sed_scores_eval cannot be used here: not installed, or with pandas 3."""


def _sed_scores_eval():
    """sed_scores_eval's metric modules and its score table maker, or :class:`SedUnavailable`."""
    try:
        import pandas
        from sed_scores_eval import collar_based, intersection_based, segment_based
        from sed_scores_eval.base_modules.scores import create_score_dataframe
    except ImportError:
        raise SedUnavailable(INSTALL) from None
    if int(pandas.__version__.split(".")[0]) >= 3:  # its Cython code gets read-only arrays from pandas 3
        raise SedUnavailable(f"sed_scores_eval needs pandas below 3, found {pandas.__version__}: {INSTALL}")
    return collar_based, segment_based, intersection_based, create_score_dataframe


def read_strong_labels(path: str | os.PathLike, class_names: list[str]) -> Reference:
    """The events of each file of a strong-label TSV, in the file's order: DCASE's ``filename onset
    offset event_label`` (a row with only a filename: a file without events) or AudioSet's
    ``segment_id start_time_seconds end_time_seconds label`` (labels by mid or by name).

    Raises :class:`DataError` naming the file and line for a missing column, a time that is not a
    number, an offset not after its onset; and one listing the labels not among ``class_names``."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file, delimiter="\t", restval="")
            columns = next((c for c in COLUMNS if set(c) <= set(reader.fieldnames or ())), None)
            if columns is None:
                expected = " or ".join(" ".join(c) for c in COLUMNS)
                raise DataError(f"{path}: needs the columns {expected}; has {' '.join(reader.fieldnames or ())}")
            rows = [(reader.line_num, [(row[c] or "").strip() for c in columns]) for row in reader]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    known = {name: name for name in class_names} | {c.mid: c.name for c in audioset_classes() if c.name in class_names}
    reference: Reference = {}
    unknown: dict[str, int] = {}  # label: its first line
    for line, (name, onset, offset, label) in rows:
        if not name:
            continue
        events = reference.setdefault(name, [])
        if not (onset or offset or label):  # a file without events
            continue
        times = []
        for what, text in (("onset", onset), ("offset", offset)):
            try:
                times.append(float(text))
            except ValueError:
                raise DataError(f"{path}, line {line}: the {what} {text!r} is not a number") from None
            if not math.isfinite(times[-1]) or times[-1] < 0:
                raise DataError(f"{path}, line {line}: the {what} must be 0 s or more, got {text}")
        if times[1] <= times[0]:
            raise DataError(f"{path}, line {line}: the offset ({offset}) must come after the onset ({onset})")
        if label not in known:
            unknown.setdefault(label, line)
            continue
        events.append((times[0], times[1], known[label]))
    if unknown:
        listed = ", ".join(f"{label!r} (line {line})" for label, line in list(unknown.items())[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise DataError(f"{path}: {len(unknown)} labels are not among the model's classes: {listed}{more}")
    if not reference:
        raise DataError(f"{path}: no files in these labels")
    return reference


def find_clips(names: list[str], folder: str | os.PathLike) -> dict[str, Path]:
    """The sound file of each name of a strong-label file in ``folder``: the path relative to it, else
    the one file below it with that file name, or that stem (AudioSet's segment ids have no extension).
    Raises :class:`DataError` listing the names not found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no such folder of clips: {folder}")
    index: dict[str, Path | None] | None = None  # file names and stems below the folder; None: several files
    found, missing = {}, []
    for name in names:
        if (folder / name).is_file():
            found[name] = folder / name
            continue
        if index is None:  # walked once, when a name is not a path
            index = {}
            for path in audio_files([folder]):
                for key in (path.name, path.stem):
                    index[key] = path if key not in index else None
        path = index.get(Path(name).name) or index.get(clip_stem(name))
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} files of the labels are not in {folder} (or not one file alone): {listed}")
    return found


def _merged(events: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Events with those of a class that overlap or touch joined: sed_scores_eval refuses them."""
    merged: list[tuple[float, float, str]] = []
    for onset, offset, label in sorted(events, key=lambda e: (e[2], e[0])):
        if merged and merged[-1][2] == label and onset <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(offset, merged[-1][1]), label)
        else:
            merged.append((onset, offset, label))
    return merged


def _detection_table(events: list[Event], classes: list[str], seconds: float, make):
    """A score table that is 1 inside ``events`` and 0 elsewhere, cut at their onsets and offsets."""
    bounds = np.unique(np.round([0.0, seconds, *(t for e in events for t in (e.onset, e.offset))], 6))
    middles = (bounds[:-1] + bounds[1:]) / 2
    scores = np.zeros((len(middles), len(classes)))
    for event in events:
        scores[(middles > event.onset) & (middles < event.offset), classes.index(event.label)] = 1.0
    return make(scores, bounds, classes)


def scored_classes(reference: Reference) -> list[str]:
    """The classes scored against ``reference``: those of its events, sorted."""
    return sorted({label for events in reference.values() for _, _, label in events})


def score_track(frames: Frames, classes: list[str], median_frames: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """PSDS's input of one file: ``(bounds, scores)``, the frame scores of ``classes`` (frames x classes,
    median-filtered over ``median_frames`` frames as :class:`EventRules` filters them) held from
    ``bounds[i]`` to ``bounds[i + 1]`` seconds, the last ending with the sound. Consecutive equal
    frames are joined (the same scores over time in fewer rows: a model's frames repeat each time
    position's score over its share of the window)."""
    from scipy.ndimage import median_filter

    scores = frames.scores[[frames.class_names.index(c) for c in classes]].T.astype(np.float64)
    if median_frames > 1:
        scores = median_filter(scores, size=(median_frames, 1), mode="nearest")
    change = np.concatenate([[True], np.any(np.diff(scores, axis=0) != 0, axis=1)])
    end = frames.seconds if frames.seconds > frames.times[-1] else frames.times[-1] + frames.step
    return np.append(frames.times[change], end), scores[change]


def sed_metrics(
    reference: Reference,
    detections: dict[str, list[Event]],
    durations: dict[str, float],
    scores: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> EventMetrics:
    """The metrics of ``detections`` (the events of each file of ``reference``; the files last
    ``durations`` seconds) against ``reference`` ((onset, offset, label) events of each file), and
    the PSDS of ``scores`` (each file's :func:`score_track` of the :func:`scored_classes`; None: no
    PSDS). Only the classes of ``reference``'s events are scored (see the module's doc)."""
    collar_based, segment_based, intersection_based, make = _sed_scores_eval()
    reference = {name: _merged(events) for name, events in reference.items()}
    classes = scored_classes(reference)
    if not classes:
        raise DataError("the labels hold no event: nothing to score")
    names = list(reference)
    scored = {name: [e for e in detections[name] if e.label in classes] for name in names}
    tables = {name: _detection_table(scored[name], classes, durations[name], make) for name in names}
    durations = {name: durations[name] for name in names}
    event = collar_based.fscore(
        tables,
        reference,
        0.5,
        onset_collar=ONSET_COLLAR,
        offset_collar=OFFSET_COLLAR,
        offset_collar_rate=OFFSET_COLLAR_RATE,
    )
    segment = segment_based.fscore(tables, reference, durations, 0.5, segment_length=SEGMENT)
    psds = {}
    if scores is not None:
        score_tables = {name: make(scores[name][1], scores[name][0], classes) for name in names}
        for key, s in (("psds1", PSDS1), ("psds2", PSDS2)):
            value, per_class, *_ = intersection_based.psds(
                score_tables,
                reference,
                durations,
                dtc_threshold=s.dtc,
                gtc_threshold=s.gtc,
                cttc_threshold=s.cttc,
                alpha_ct=s.alpha_ct,
                alpha_st=s.alpha_st,
                max_efpr=s.max_efpr,
            )
            psds[key] = (float(value), per_class)

    def f1(result, key: str) -> F1Score:
        return F1Score(*(float(part[key]) for part in result[:3]))

    counts = {c: sum(label == c for events in reference.values() for *_, label in events) for c in classes}
    per_class = [
        {
            "class": c,
            "reference_events": counts[c],
            "event_f1": float(event[0][c]),
            "segment_f1": float(segment[0][c]),
            **{key: float(value[1][c]) for key, value in psds.items()},
        }
        for c in classes
    ]
    return EventMetrics(
        event_micro=f1(event, "micro_average"),
        event_macro=f1(event, "macro_average"),
        segment_micro=f1(segment, "micro_average"),
        segment_macro=f1(segment, "macro_average"),
        psds1=psds["psds1"][0] if psds else None,
        psds2=psds["psds2"][0] if psds else None,
        files=len(names),
        reference_events=sum(counts.values()),
        detected_events=sum(map(len, scored.values())),
        unscored_events=sum(len(detections[name]) - len(scored[name]) for name in names),
        classes=classes,
        per_class=per_class,
    )


def evaluate_events(
    tagger: Tagger | str | os.PathLike,
    labels: str | os.PathLike,
    clips: str | os.PathLike | None = None,
    rules: EventRules | None = None,
    device: str = "auto",
    trust_code: bool = False,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> EventMetrics:
    """The sound event detection metrics (:func:`sed_metrics`) of a checkpoint (or a :class:`Tagger`)
    on the files a strong-label TSV names (:func:`read_strong_labels`), found in ``clips`` (default:
    the TSV's folder; :func:`find_clips`). Each file's frame scores (:meth:`Tagger.frames`) give its
    events (``rules``, default :class:`EventRules`) and its PSDS scores; durations are the files'
    (soundfile), every file checked readable before any is scored. ``device``, ``trust_code`` and
    ``batch_size`` make the :class:`Tagger` of a checkpoint; ``progress(done, total)`` is called after
    each file. Raises :class:`DataError` for labels or files that cannot be used and
    :class:`SedUnavailable` without sed_scores_eval."""
    import soundfile

    _sed_scores_eval()  # before the model loads: no minutes of scoring to end in an ImportError
    rules = rules or EventRules()
    if not isinstance(tagger, Tagger):
        tagger = Tagger(tagger, device, batch_size=batch_size, trust_code=trust_code)
    rules.thresholds(len(tagger.class_names))  # bad thresholds fail now, not after the scoring
    reference = read_strong_labels(labels, tagger.class_names)
    classes = scored_classes(reference)
    if not classes:
        raise DataError(f"{labels}: no events in these labels: nothing to score")
    paths = find_clips(list(reference), Path(labels).parent if clips is None else clips)
    durations = {}
    for name, path in paths.items():
        try:
            durations[name] = soundfile.info(path).duration
        except (soundfile.LibsndfileError, RuntimeError) as error:
            raise DataError(f"{path}: unreadable: {getattr(error, 'error_string', None) or error}") from None
    detections, scores = {}, {}
    for done, (name, path) in enumerate(paths.items(), start=1):
        try:
            frames = tagger.frames(path)
        except ClipError as error:
            raise DataError(f"{path}: {error}") from None
        args = (frames.times, frames.scores, tagger.class_names, rules, frames.step, frames.seconds, name)
        detections[name] = detect_events(*args)
        scores[name] = score_track(frames, classes, rules.median_frames(frames.step))  # kept small: only these
        if progress is not None:
            progress(done, len(paths))
    return sed_metrics(reference, detections, durations, scores)
