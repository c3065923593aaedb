"""Sound events from frame scores (pipeline/events.py), pure numpy: hand cases with their exact events,
the median filter against scipy's, random sounds against a plain reference of the four steps, the
same events and stream lines however the frames come in pieces, when each stream line comes, the
rules, the thresholds file and the output formats."""

import json

import numpy as np
import pytest
from scipy.ndimage import median_filter
from scipy.signal import lfilter

from dclsify.pipeline import events
from dclsify.pipeline.events import (
    Event,
    EventRules,
    EventTracker,
    EventUpdate,
    _MedianFilter,
    detect_events,
    format_events,
    read_thresholds,
)

STEP = 0.1
NO_RULES = {"median_filter": 0, "min_duration": 0, "min_gap": 0}  # hysteresis alone


def events_of(*rows, step=STEP, seconds=None, **rules) -> list[tuple[float, float, str, float]]:
    """The events of hand-written frame scores (one row per class: "a", "b", ...) as (onset, offset,
    label, score), rounded to the microsecond; ``rules`` on top of :data:`NO_RULES`."""
    scores = np.array(rows, dtype=np.float32)
    times = np.arange(scores.shape[1]) * step
    seconds = scores.shape[1] * step if seconds is None else seconds
    names = list("abcdefgh"[: len(rows)])
    found = detect_events(times, scores, names, EventRules(**{**NO_RULES, **rules}), step, seconds)
    return [(round(e.onset, 6), round(e.offset, 6), e.label, round(e.score, 6)) for e in found]


# hand cases


def test_a_run_at_or_above_the_threshold_is_one_event_from_its_first_frame_to_its_last_frames_end():
    assert events_of([0, 0, 0.8, 0.9, 0.5, 0, 0]) == [(0.2, 0.5, "a", 0.9)]


def test_frames_between_low_and_threshold_extend_an_event_on_both_sides():
    # 0.3 is low itself (in), 0.29 is not
    assert events_of([0, 0.35, 0.4, 0.8, 0.4, 0.3, 0.29, 0], threshold=0.5, low=0.3) == [(0.1, 0.6, "a", 0.8)]


def test_a_run_that_never_reaches_the_threshold_is_no_event():
    assert events_of([0, 0.4, 0.49, 0.4, 0, 0.45, 0], threshold=0.5, low=0.3) == []


def test_low_defaults_to_six_tenths_of_the_threshold():
    assert events_of([0.29, 0.31, 0.9, 0.31, 0.29]) == [(0.1, 0.4, "a", 0.9)]  # low 0.3
    assert events_of([0.47, 0.49, 0.9, 0.49, 0.47], threshold=0.8) == [(0.1, 0.4, "a", 0.9)]  # low 0.48


def test_a_run_below_the_threshold_does_not_bridge_two_events():
    # the 0.4 frame is no event, so the events are 3 frames apart, not 1: with min_gap 0.2 they stay two
    found = events_of([0.9, 0, 0.4, 0, 0.9], low=0.3, min_gap=0.2)
    assert found == [(0.0, 0.1, "a", 0.9), (0.4, 0.5, "a", 0.9)]


@pytest.mark.parametrize(("step", "gap_frames"), [(0.1, 3), (0.02, 5), (0.01, 10), (0.032, 4)])
def test_events_less_than_min_gap_apart_merge_and_events_exactly_min_gap_apart_do_not(step, gap_frames):
    """ "Less than min_gap apart" merges, as the doc says: a gap of exactly min_gap (in whole frames)
    does not, wherever the events lie (float times must not move the boundary)."""
    min_gap = gap_frames * step
    for shift in range(40):
        for gap in (gap_frames - 1, gap_frames, gap_frames + 1):
            row = [0] * shift + [0.9, 0.9] + [0] * gap + [0.8, 0.8] + [0] * 3
            onset, first_end, second = shift * step, (shift + 2) * step, (shift + 2 + gap) * step
            expected = (
                [(onset, second + 2 * step, "a", 0.9)]
                if gap < gap_frames
                else [(onset, first_end, "a", 0.9), (second, second + 2 * step, "a", 0.8)]
            )
            found = events_of(row, step=step, min_gap=min_gap)
            assert found == [(round(a, 6), round(b, 6), label, s) for a, b, label, s in expected], (shift, gap)


@pytest.mark.parametrize(("step", "frames"), [(0.1, 3), (0.02, 5), (0.01, 10), (0.032, 4), (0.02, 1)])
def test_an_event_shorter_than_min_duration_is_dropped_and_one_of_exactly_min_duration_kept(step, frames):
    min_duration = frames * step
    for shift in range(60):
        row = [0] * shift + [0.9] * frames + [0] * 2
        onset, offset = round(shift * step, 6), round((shift + frames) * step, 6)
        assert events_of(row, step=step, min_duration=min_duration) == [(onset, offset, "a", 0.9)], shift
        short = [0] * shift + [0.9] * (frames - 1) + [0] * 2
        assert events_of(short, step=step, min_duration=min_duration) == [], shift


def test_events_merge_before_min_duration_drops_them():
    # two 1-frame runs, 1 frame apart: 3 frames (0.3 s) together, so kept with min_duration 0.3
    assert events_of([0.9, 0, 0.7, 0], min_gap=0.2, min_duration=0.3) == [(0.0, 0.3, "a", 0.9)]
    assert events_of([0.9, 0, 0.7, 0], min_gap=0.1, min_duration=0.3) == []  # 1 frame = min_gap: not merged


def test_each_class_has_its_own_thresholds_and_events_come_by_onset_then_label():
    found = events_of(
        [0, 0.6, 0, 0, 0, 0],
        [0, 0.6, 0.75, 0.85, 0.65, 0],  # low 0.7: 0.6 and 0.65 are out
        [0, 0.6, 0, 0, 0, 0],
        threshold=[0.5, 0.8, 0.7],
        low=[0.3, 0.7, 0.5],
    )
    assert found == [(0.1, 0.2, "a", 0.6), (0.2, 0.4, "b", 0.85)]


def test_an_event_at_the_start_begins_at_0_and_one_running_to_the_end_stops_at_the_sound_end():
    assert events_of([0.9, 0.9, 0, 0, 0.9, 0.9, 0.9]) == [(0.0, 0.2, "a", 0.9), (0.4, 0.7, "a", 0.9)]
    assert events_of([0.9, 0.9, 0, 0, 0.9, 0.9, 0.9], seconds=0.65) == [(0.0, 0.2, "a", 0.9), (0.4, 0.65, "a", 0.9)]


def test_a_three_frame_median_filter_removes_a_one_frame_spike_and_fills_a_one_frame_dip():
    assert EventRules(median_filter=0.3).median_frames(STEP) == 3
    assert events_of([0, 0, 0.9, 0, 0], median_filter=0.3) == []
    assert events_of([0, 0.9, 0.9, 0, 0.9, 0.9, 0], median_filter=0.3) == [(0.1, 0.6, "a", 0.9)]
    assert events_of([0, 0.9, 0.9, 0, 0], median_filter=0.3) == [(0.1, 0.3, "a", 0.9)]  # 2 frames stay
    # the edges repeat the first and last frame: a spike there stays
    assert events_of([0.9, 0, 0, 0, 0, 0.9], median_filter=0.3) == [(0.0, 0.1, "a", 0.9), (0.5, 0.6, "a", 0.9)]


def test_an_event_score_is_its_highest_filtered_frame_score():
    # filtered: 0, 0.6, 0.7, 0.7, 0.7, 0, 0 (the 0.95 and 0.9 spikes are gone)
    assert events_of([0, 0.6, 0.95, 0.7, 0, 0.9, 0], median_filter=0.3) == [(0.1, 0.5, "a", 0.7)]


# the median filter


def piece_bounds(rng: np.random.Generator, frames: int) -> list[tuple[int, int]]:
    """``frames`` cut at random into pieces: some empty, some of 1 frame, some longer."""
    bounds, begin = [], 0
    while begin < frames or rng.random() < 0.1:
        kind = rng.random()
        size = 0 if kind < 0.15 else 1 if kind < 0.35 else int(rng.integers(2, max(3, frames // 3 + 2)))
        end = min(frames, begin + size)
        bounds.append((begin, end))
        begin = end
    return bounds


@pytest.mark.parametrize("frames", [1, 2, 7, 24, 25, 26, 300])
@pytest.mark.parametrize("size", [1, 3, 5, 25])
def test_the_median_filter_is_scipys_with_nearest_edges_fed_whole_or_in_pieces(size, frames, monkeypatch):
    """With a floor (the tracker's low thresholds), the medians below it come out as -inf."""
    monkeypatch.setattr(events, "_MEDIAN_VALUES", 64)  # a few frames at a time: the blocks join up
    rng = np.random.default_rng(100 * size + frames)
    scores = rng.random((3, frames)).astype(np.float32)
    scores[1] = np.round(scores[1], 1)  # ties, and medians equal to the floor
    expected = median_filter(scores, size=(1, size), mode="nearest")
    floor = np.array([0.3, 0.5, 0.8])
    above_floor = np.where(expected >= floor[:, None], expected, -np.inf)
    times = np.arange(frames) * 0.01
    half = size // 2
    for bounds in [[(0, frames)]] + [piece_bounds(rng, frames) for _ in range(8)]:
        for given_floor, wanted in ((None, expected), (floor, above_floor)):
            running, parts, part_times = _MedianFilter(size), [], []
            for begin, end in bounds:
                out_times, out = running.push(times[begin:end], scores[:, begin:end], floor=given_floor)
                parts.append(out), part_times.append(out_times)
                # a frame comes out once the `half` frames after it are in
                assert sum(p.shape[1] for p in parts) == max(0, end - half)
            out_times, out = running.push(np.zeros(0), np.zeros((3, 0), np.float32), last=True, floor=given_floor)
            parts.append(out), part_times.append(out_times)
            np.testing.assert_array_equal(np.concatenate(parts, axis=1), wanted if size > 1 else expected)
            np.testing.assert_array_equal(np.concatenate(part_times), times)


def test_the_median_filter_keeps_no_view_of_a_pushed_array():
    """A caller may refill the same buffer for each piece (as audio callbacks do)."""
    rng = np.random.default_rng(0)
    scores = rng.random((2, 40)).astype(np.float32)
    expected = median_filter(scores, size=(1, 5), mode="nearest")
    running, buffer, parts = _MedianFilter(5), np.empty((2, 10), np.float32), []
    for begin in range(0, 40, 10):
        buffer[:] = scores[:, begin : begin + 10]
        parts.append(running.push(np.arange(begin, begin + 10) * 0.01, buffer)[1])
        buffer[:] = -1  # the caller reuses its buffer
    parts.append(running.push(np.zeros(0), np.zeros((2, 0), np.float32), last=True)[1])
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), expected)


# random sounds


def random_case(seed: int):
    """A random sound's frame scores and rules: smoothed random walks through the thresholds (many
    events), sometimes on a 0.1 grid (scores equal to a threshold), sometimes loud at the very start
    or end; times, durations and gaps on the frame grid or off it."""
    rng = np.random.default_rng(seed)
    classes, frames = int(rng.integers(1, 5)), int(rng.integers(1, 300))
    step = float(rng.choice([0.01, 0.02, 0.032, 0.1]))
    walk = lfilter([1.0], [1.0, -float(rng.uniform(0.6, 0.95))], rng.normal(0, 0.6, (classes, frames)), axis=1)
    scores = (1 / (1 + np.exp(-walk - rng.uniform(-1.5, 0.5, (classes, 1))))).astype(np.float32)
    if rng.random() < 0.3:
        scores = np.round(scores, 1)
    if rng.random() < 0.3:
        scores[:, : int(rng.integers(1, 6))] = 0.95
    if rng.random() < 0.3:
        scores[:, -int(rng.integers(1, 6)) :] = 0.95
    threshold = 0.5 if rng.random() < 0.5 else np.round(rng.uniform(0.3, 0.9, classes), 2)
    low = None if rng.random() < 0.5 else np.round(np.asarray(threshold) * rng.uniform(0.3, 1, classes), 2)

    def seconds_of(most: int) -> float:  # a whole number of frames, or between two
        return int(rng.integers(0, most + 1)) * step + (0.0 if rng.random() < 0.7 else float(rng.uniform(0, step)))

    rules = EventRules(threshold, low, seconds_of(30), seconds_of(10), seconds_of(10))
    times = np.arange(frames) * step
    seconds = frames * step - (0.0 if rng.random() < 0.5 else float(rng.uniform(0, step * 0.99)))
    names = [f"class{c}" for c in range(classes)]
    return rng, times, scores, names, rules, step, seconds


def reference_spans(row: np.ndarray, high: float, low: float, step: float, rules: EventRules) -> list[tuple]:
    """The events of one class's filtered scores by the module doc's steps 2 to 4, plainly, in frame
    indices: (first frame, frame after the last, score)."""
    inside = np.concatenate([[False], row >= low, [False]])
    edges = np.flatnonzero(np.diff(inside.astype(np.int8)))
    runs = [(int(a), int(b)) for a, b in edges.reshape(-1, 2) if (row[a:b] >= high).any()]
    merged: list[list[int]] = []
    for a, b in runs:
        if merged and (a - merged[-1][1]) * step < rules.min_gap - 1e-9:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a, b, float(row[a:b].max())) for a, b in merged if (b - a) * step >= rules.min_duration - 1e-9]


def filtered(scores: np.ndarray, rules: EventRules, step: float) -> np.ndarray:
    return median_filter(scores, size=(1, rules.median_frames(step)), mode="nearest")


def as_tuples(events: list[Event]) -> list[tuple]:
    return [(e.label, round(e.onset, 6), round(e.offset, 6), e.score) for e in events]


@pytest.mark.parametrize("seed", range(200))
def test_random_sounds_give_the_events_of_a_plain_reference(seed):
    _, times, scores, names, rules, step, seconds = random_case(seed)
    high, low = rules.thresholds(len(names))
    smooth = filtered(scores, rules, step)
    expected = sorted(
        (name, round(a * step, 6), round(min(b * step, seconds), 6), score)
        for c, name in enumerate(names)
        for a, b, score in reference_spans(smooth[c], high[c], low[c], step, rules)
    )
    found = detect_events(times, scores, names, rules, step, seconds)
    assert sorted(as_tuples(found)) == expected
    assert found == sorted(found, key=lambda e: (e.onset, e.label))


def run_in_pieces(tracker: EventTracker, times, scores, bounds, seconds) -> list[tuple[int, EventUpdate]]:
    """The lines of ``tracker`` fed ``bounds``' pieces then closed, each with the piece it came with
    (``len(bounds)``: the close)."""
    lines = []
    for piece, (begin, end) in enumerate(bounds):
        lines += [(piece, line) for line in tracker.push(times[begin:end], scores[:, begin:end])]
    return lines + [(len(bounds), line) for line in tracker.close(seconds)]


def per_class(lines: list[EventUpdate]) -> dict[str, list[EventUpdate]]:
    found: dict[str, list[EventUpdate]] = {}
    for line in lines:
        found.setdefault(line.label, []).append(line)
    return found


@pytest.mark.parametrize("seed", range(200))
def test_the_events_and_stream_lines_do_not_depend_on_how_the_frames_are_cut(seed):
    rng, times, scores, names, rules, step, seconds = random_case(seed)
    whole = EventTracker(names, rules, step)
    whole_lines = [line for _, line in run_in_pieces(whole, times, scores, [(0, len(times))], seconds)]
    assert sorted(whole.events, key=lambda e: (e.onset, e.label)) == detect_events(
        times, scores, names, rules, step, seconds
    )
    for _ in range(3):
        cut = EventTracker(names, rules, step)
        cut.PIECE = int(rng.integers(5, 60))  # the tracker's own cut of a long piece, small
        lines = [line for _, line in run_in_pieces(cut, times, scores, piece_bounds(rng, len(times)), seconds)]
        assert per_class(lines) == per_class(whole_lines)
        assert sorted(cut.events, key=lambda e: (e.label, e.onset)) == sorted(
            whole.events, key=lambda e: (e.label, e.onset)
        )


# the stream's timing


def start_frame(row: np.ndarray, first: int, high: float, low: float, step: float, rules: EventRules):
    """The frame by which the event starting at frame ``first`` is sure to be kept: the first whose
    prefix of the sound holds it (lasting min_duration), and its score there."""
    lo, hi = first, len(row) - 1  # the whole sound holds it
    while lo < hi:
        mid = (lo + hi) // 2
        if any(a == first for a, _, _ in reference_spans(row[: mid + 1], high, low, step, rules)):
            hi = mid
        else:
            lo = mid + 1
    return lo, next(s for a, _, s in reference_spans(row[: lo + 1], high, low, step, rules) if a == first)


def end_frame(row: np.ndarray, end: int, low: float, step: float, rules: EventRules) -> int:
    """The frame by which an event ending before frame ``end`` is sure to end: min_gap after it, and
    the run (at or above low) holding that frame, if it started less than min_gap after the event, over."""
    near = end + int(np.ceil(rules.min_gap / step - 1e-9))  # a run starting here or later is min_gap away
    frame = near - 1
    while frame < len(row) and row[frame] >= low:
        start = frame
        while start > 0 and row[start - 1] >= low:
            start -= 1
        if start >= near:
            break
        frame += 1
    return frame


@pytest.mark.parametrize("seed", range(40))
def test_fed_frame_by_frame_each_event_has_one_start_and_one_end_line_each_as_soon_as_it_is_sure(seed):
    """A start comes with the frame that makes the event sure to be kept (confirmed and lasting
    min_duration, as the sound up to that frame shows), an end with the frame after which nothing can
    extend it; both once the median filter has the frames after it. Dropped events have no lines."""
    _, times, scores, names, rules, step, seconds = random_case(seed)
    frames, half = len(times), rules.median_frames(step) // 2
    high, low = rules.thresholds(len(names))
    smooth = filtered(scores, rules, step)
    lines = run_in_pieces(EventTracker(names, rules, step), times, scores, [(i, i + 1) for i in range(frames)], seconds)
    expected = []
    for c, name in enumerate(names):
        for a, b, score in reference_spans(smooth[c], high[c], low[c], step, rules):
            frame, start_score = start_frame(smooth[c], a, high[c], low[c], step, rules)
            expected.append((min(frame + half, frames), name, round(a * step, 6), None, start_score))
            frame = end_frame(smooth[c], b, low[c], step, rules)
            expected.append(
                (min(frame + half, frames), name, round(a * step, 6), round(min(b * step, seconds), 6), score)
            )
    found = [
        (piece, line.label, round(line.onset, 6), None if line.offset is None else round(line.offset, 6), line.score)
        for piece, line in lines
    ]
    assert sorted(found, key=str) == sorted(expected, key=str)


def test_a_start_line_comes_once_the_event_lasts_min_duration_and_an_end_line_min_gap_after_it():
    rules = EventRules(median_filter=0, min_duration=0.3, min_gap=0.2)
    scores = np.array([[0, 0.9, 0.9, 0.9, 0.9, 0, 0, 0, 0]], np.float32)
    times = np.arange(9) * STEP
    lines = run_in_pieces(EventTracker(["a"], rules, STEP), times, scores, [(i, i + 1) for i in range(9)], 0.9)
    assert [(piece, line.offset is None) for piece, line in lines] == [(3, True), (6, False)]
    assert lines[1][1] == EventUpdate("a", 0.1, pytest.approx(0.9), pytest.approx(0.5))
    # with a 3-frame median filter each line waits for the frame after
    rules = EventRules(median_filter=0.3, min_duration=0.3, min_gap=0.2)
    lines = run_in_pieces(EventTracker(["a"], rules, STEP), times, scores, [(i, i + 1) for i in range(9)], 0.9)
    assert [(piece, line.offset is None) for piece, line in lines] == [(4, True), (7, False)]


def test_an_end_line_waits_for_a_run_that_may_still_reach_the_threshold_and_merge():
    rules = EventRules(median_filter=0, min_duration=0, min_gap=0.2, threshold=0.5, low=0.3)
    scores = np.array([[0.9, 0, 0.4, 0.4, 0.4, 0.4, 0, 0, 0]], np.float32)  # the 0.4 run starts 1 frame after
    lines = run_in_pieces(
        EventTracker(["a"], rules, STEP), np.arange(9) * STEP, scores, [(i, i + 1) for i in range(9)], 0.9
    )
    assert [(piece, line.offset) for piece, line in lines] == [(0, None), (6, pytest.approx(0.1))]
    scores[0, 5] = 0.6  # now it does
    lines = run_in_pieces(
        EventTracker(["a"], rules, STEP), np.arange(9) * STEP, scores, [(i, i + 1) for i in range(9)], 0.9
    )
    assert [(piece, line.offset) for piece, line in lines] == [(0, None), (7, pytest.approx(0.6))]


def test_a_dropped_event_has_no_lines_and_close_ends_every_open_event():
    rules = EventRules(median_filter=0, min_duration=0.3, min_gap=0.5)
    tracker = EventTracker(["a", "b"], rules, STEP)
    scores = np.array([[0, 0.9, 0.9, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.9, 0.9, 0.9, 0.9]], np.float32)
    assert tracker.push(np.arange(8) * STEP, scores) == [EventUpdate("b", 0.4, pytest.approx(0.9))]
    assert tracker.close(0.75) == [EventUpdate("b", 0.4, pytest.approx(0.9), 0.75)]
    assert tracker.events == [Event("", 0.4, 0.75, "b", pytest.approx(0.9))]


def test_a_tracker_takes_empty_and_short_pieces_between_long_ones():
    """As Tagger.stream hands them over: most pieces of audio complete no window, so bring no frames."""
    rng = np.random.default_rng(0)
    walk = lfilter([1.0], [1.0, -0.95], rng.normal(0, 0.5, (2, 2100)), axis=1)
    scores = (1 / (1 + np.exp(-walk))).astype(np.float32)
    times, rules = np.arange(2100) * 0.01, EventRules()  # a 25-frame median filter
    whole = detect_events(times, scores, ["a", "b"], rules, 0.01, 21.0)
    tracker = EventTracker(["a", "b"], rules, 0.01)
    for begin, end in [(0, 0), (0, 3), (3, 3), (3, 1000), (1000, 1000), (1000, 1002), (1002, 1002), (1002, 2100)]:
        tracker.push(times[begin:end], scores[:, begin:end])
    tracker.close(21.0)
    assert sorted(tracker.events, key=lambda e: (e.onset, e.label)) == whole and len(whole) >= 10


def test_a_tracker_needs_a_positive_step():
    with pytest.raises(ValueError, match="step must be positive"):
        EventTracker(["a"], EventRules(), 0)


# the rules


@pytest.mark.parametrize("name", ["median_filter", "min_duration", "min_gap"])
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_rules_refuse_negative_or_not_finite_times(name, value):
    with pytest.raises(ValueError, match=f"{name} must be 0 or more seconds"):
        EventRules(**{name: value})


def test_thresholds_per_class_and_their_defaults():
    high, low = EventRules(0.5).thresholds(3)
    assert high.tolist() == [0.5] * 3 and low.tolist() == pytest.approx([0.3] * 3)
    high, low = EventRules([0.2, 0.5], 0.1).thresholds(2)
    assert high.tolist() == [0.2, 0.5] and low.tolist() == [0.1, 0.1]
    high, low = EventRules([0.2, 0.5]).thresholds(2)
    assert low.tolist() == pytest.approx([0.12, 0.3])


@pytest.mark.parametrize(
    ("threshold", "low", "message"),
    [
        (1.5, None, "threshold must be in \\[0, 1\\], got 1.5"),
        (-0.1, None, "threshold must be in \\[0, 1\\], got -0.1"),
        (float("nan"), None, "threshold must be in \\[0, 1\\], got nan"),
        (0.5, -0.2, "low must be in \\[0, 1\\], got -0.2"),
        (0.5, 0.6, "low must not exceed the threshold: low 0.6 > threshold 0.5"),
        # the class at fault: its own low and threshold, not the largest low and smallest threshold
        ([0.2, 0.9], [0.25, 0.8], "low must not exceed the threshold: low 0.25 > threshold 0.2"),
        ([0.5, 0.5, 0.5], None, "threshold needs one value or one per class \\(2\\), got 3"),
        (0.5, [0.1], "low needs one value or one per class \\(2\\), got 1"),
    ],
)
def test_thresholds_refuse_values_outside_0_1_a_low_above_its_threshold_and_a_wrong_count(threshold, low, message):
    with pytest.raises(ValueError, match=message):
        EventRules(threshold, low).thresholds(2)


@pytest.mark.parametrize(
    ("seconds", "step", "frames"),
    [
        (0.25, 0.02, 13),
        (0.25, 0.01, 25),
        (0, 0.02, 1),
        (0.01, 0.02, 1),
        (0.04, 0.02, 3),
        (0.06, 0.02, 3),
        (0.3, 0.1, 3),
    ],
)
def test_the_median_filter_length_is_odd_and_at_least_one_frame(seconds, step, frames):
    assert EventRules(median_filter=seconds).median_frames(step) == frames


def test_median_frames_are_always_odd():
    for seconds in np.arange(0, 1, 0.007):
        frames = EventRules(median_filter=float(seconds)).median_frames(0.02)
        assert frames >= 1 and frames % 2 == 1 and abs(frames - seconds / 0.02) <= 1.5


# the thresholds file

CLASSES = ["dog", "cat", "bird"]


def write(tmp_path, text: str):
    path = tmp_path / "thresholds.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_thresholds_gives_unnamed_classes_the_defaults_and_no_lows_without_a_low(tmp_path):
    high, low = read_thresholds(write(tmp_path, "label,threshold\ncat,0.7\n"), CLASSES, 0.5, None)
    assert high.tolist() == [0.5, 0.7, 0.5] and low is None
    high, low = read_thresholds(write(tmp_path, "label,threshold\ncat,0.7\n"), CLASSES, 0.5, 0.2)
    assert high.tolist() == [0.5, 0.7, 0.5] and low.tolist() == [0.2, 0.2, 0.2]


def test_read_thresholds_takes_an_optional_low_column_else_six_tenths_of_the_threshold(tmp_path):
    path = write(tmp_path, "threshold,label,low\n0.7,cat,0.1\n0.8,bird,\n")  # columns in any order
    high, low = read_thresholds(path, CLASSES, 0.5, None)
    assert high.tolist() == [0.5, 0.7, 0.8] and low.tolist() == pytest.approx([0.3, 0.1, 0.48])
    high, low = read_thresholds(path, CLASSES, 0.5, 0.2)  # the given low for the classes without one
    assert low.tolist() == pytest.approx([0.2, 0.1, 0.2])
    rules = EventRules(*read_thresholds(path, CLASSES, 0.5, None))
    assert [values.tolist() for values in rules.thresholds(3)] == [[0.5, 0.7, 0.8], pytest.approx([0.3, 0.1, 0.48])]


def test_read_thresholds_refuses_a_file_without_the_label_and_threshold_columns(tmp_path):
    with pytest.raises(ValueError, match="needs the columns label and threshold, has label, score"):
        read_thresholds(write(tmp_path, "label,score\ncat,0.7\n"), CLASSES, 0.5, None)
    with pytest.raises(ValueError, match="needs the columns label and threshold, has $"):
        read_thresholds(write(tmp_path, ""), CLASSES, 0.5, None)


def test_read_thresholds_names_the_line_of_an_unknown_label_or_a_bad_number(tmp_path):
    with pytest.raises(ValueError, match="line 3: 'cow' is not one of the model's classes"):
        read_thresholds(write(tmp_path, "label,threshold\ncat,0.7\ncow,0.2\n"), CLASSES, 0.5, None)
    with pytest.raises(ValueError, match="line 4: 'cow' is not one of"):  # a blank line is a line
        read_thresholds(write(tmp_path, "label,threshold\ncat,0.7\n\ncow,0.2\n"), CLASSES, 0.5, None)
    with pytest.raises(ValueError, match="line 2: thresholds must be numbers"):
        read_thresholds(write(tmp_path, "label,threshold\ncat,high\n"), CLASSES, 0.5, None)
    with pytest.raises(ValueError, match="line 3: thresholds must be numbers"):  # a row without its threshold
        read_thresholds(write(tmp_path, "label,threshold\ncat,0.7\ndog\n"), CLASSES, 0.5, None)


# output formats

EVENTS = [Event("a.wav", 0.1, 1.23456, "Dog", 0.912345), Event("b.wav", 2.0, 3.5, "Cat, domestic", 0.5)]


def test_tsv_is_dcase_with_a_header_and_times_to_the_millisecond():
    assert format_events(EVENTS, "tsv") == (
        "filename\tonset\toffset\tevent_label\na.wav\t0.100\t1.235\tDog\nb.wav\t2.000\t3.500\tCat, domestic\n"
    )
    assert format_events([], "tsv") == "filename\tonset\toffset\tevent_label\n"


def test_csv_has_file_onset_offset_label_score():
    assert format_events(EVENTS, "csv") == (
        'file,onset,offset,label,score\na.wav,0.1,1.235,Dog,0.9123\nb.wav,2.0,3.5,"Cat, domestic",0.5\n'
    )


def test_json_is_one_object_per_line():
    lines = format_events(EVENTS, "json").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"file": "a.wav", "onset": 0.1, "offset": 1.235, "label": "Dog", "score": 0.9123},
        {"file": "b.wav", "onset": 2.0, "offset": 3.5, "label": "Cat, domestic", "score": 0.5},
    ]
    assert format_events([], "json") == ""


@pytest.mark.parametrize("kind", ["table", "xml"])
def test_other_formats_are_refused(kind):
    with pytest.raises(ValueError, match="the format must be one of tsv, csv, json"):
        format_events(EVENTS, kind)


def test_a_stream_line_as_a_dict():
    assert EventUpdate("Dog", 1.23456, 0.912345).as_dict() == {"label": "Dog", "onset": 1.235, "score": 0.9123}
    assert EventUpdate("Dog", 1.0, 0.5, 2.0004).as_dict() == {"label": "Dog", "onset": 1.0, "score": 0.5, "offset": 2.0}
