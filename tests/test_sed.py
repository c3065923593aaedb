"""Sound event detection metrics against strong labels: F1s and PSDS checked by hand, the labels, the CLI."""

import json
import re
import sys

import numpy as np
import pytest
import soundfile
from rich.console import Console
from test_predict import tone
from typer.testing import CliRunner

from dclsify import cli
from dclsify.cli import app
from dclsify.pipeline.events import Event
from dclsify.pipeline.predict import Frames
from dclsify.pipeline.sed import (
    SedUnavailable,
    evaluate_events,
    find_clips,
    read_strong_labels,
    score_track,
    sed_metrics,
)
from dclsify.pipeline.sources import DataError

runner = CliRunner()
HEADER = "filename\tonset\toffset\tevent_label\n"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


def events(name: str, *spans: tuple[float, float, str]) -> list[Event]:
    return [Event(name, onset, offset, label, 1.0) for onset, offset, label in spans]


def f1s(score) -> tuple[float, float, float]:
    return score.f1, score.precision, score.recall


def test_events_equal_to_the_truth_score_1_and_other_classes_are_left_out():
    reference = {"a.wav": [(1.0, 2.0, "x"), (3.0, 4.5, "y")], "b.wav": [(0.5, 1.0, "x")], "c.wav": []}
    detections = {name: events(name, *spans) for name, spans in reference.items()}
    detections["c.wav"] = events("c.wav", (2.0, 3.0, "z"))  # a class the labels do not name
    durations = {"a.wav": 5.0, "b.wav": 2.0, "c.wav": 4.0}
    step, classes = 0.01, ["x", "y", "z"]
    tracks = {}
    for name, spans in reference.items():  # frame scores 0.9 inside the events, 0.1 elsewhere
        times = np.arange(round(durations[name] / step)) * step
        scores = np.full((3, len(times)), 0.1, np.float32)
        for onset, offset, label in spans:
            scores[classes.index(label), (times > onset - 1e-9) & (times < offset - 1e-9)] = 0.9
        tracks[name] = score_track(Frames(name, durations[name], step, times, scores, classes), ["x", "y"], 5)
    result = sed_metrics(reference, detections, durations, tracks)
    for score in (result.event_micro, result.event_macro, result.segment_micro, result.segment_macro):
        assert f1s(score) == (1.0, 1.0, 1.0)
    assert result.psds1 == result.psds2 == 1.0
    assert (result.files, result.reference_events, result.detected_events, result.unscored_events) == (3, 3, 3, 1)
    assert result.classes == ["x", "y"] and [row["event_f1"] for row in result.per_class] == [1.0, 1.0]
    assert len(tracks["a.wav"][1]) == 5 and tracks["a.wav"][0][-1] == 5.0  # equal frames joined: 500 -> 5 rows
    assert json.loads(json.dumps(result.as_dict()))["event_macro"] == {"f1": 1.0, "precision": 1.0, "recall": 1.0}
    assert sed_metrics(reference, detections, durations).psds1 is None  # no frame scores, no PSDS


def test_the_onset_collar_is_200_ms_and_the_offset_collar_20_percent_of_a_long_event():
    reference = {"a": [(1.0, 2.0, "x"), (3.0, 4.0, "x"), (5.0, 6.0, "y")]}
    detections = {"a": events("a", (1.15, 2.0, "x"), (3.3, 4.0, "x"), (5.0, 6.0, "y"))}  # onsets off by 150, 300 ms
    result = sed_metrics(reference, detections, {"a": 10.0})
    assert f1s(result.event_micro) == pytest.approx((2 / 3, 2 / 3, 2 / 3))  # 2 of 3 detections, of 3 events
    assert f1s(result.event_macro) == pytest.approx((0.75, 0.75, 0.75))  # x: 1 of 2 (0.5), y: 1 of 1
    long = {"b": [(0.0, 5.0, "x")]}  # its offset collar is 1 s (20 % of 5 s), more than 200 ms
    for offset, f1 in ((5.9, 1.0), (6.1, 0.0), (4.1, 1.0), (3.9, 0.0)):
        assert sed_metrics(long, {"b": events("b", (0.1, offset, "x"))}, {"b": 8.0}).event_micro.f1 == f1
    short = {"c": [(0.0, 0.5, "x")]}  # 20 % of 0.5 s is 100 ms: the 200-ms collar holds
    for offset, f1 in ((0.69, 1.0), (0.71, 0.0)):
        assert sed_metrics(short, {"c": events("c", (0.0, offset, "x"))}, {"c": 2.0}).event_micro.f1 == f1


def test_segment_f1_counts_1_s_segments():
    reference = {"a": [(0.5, 2.5, "x"), (4.2, 4.8, "y")]}  # x in segments 0, 1, 2; y in 4
    detections = {"a": events("a", (1.2, 1.8, "x"), (3.5, 3.7, "y"))}  # x in 1; y in 3
    result = sed_metrics(reference, detections, {"a": 5.0})
    # x: 1 true positive, 2 misses; y: a false positive and a miss
    assert f1s(result.segment_micro) == pytest.approx((1 / 3, 1 / 2, 1 / 4))  # 1 of 2 segments found, of 4
    assert f1s(result.segment_macro) == pytest.approx((0.25, 0.5, 1 / 6))  # x: (0.5, 1, 1/3), y: (0, 0, 0)
    assert result.event_micro.f1 == 0.0  # x's onset is 700 ms late


def test_psds_counts_false_alarms_per_hour_and_cross_triggers_in_scenario_2():
    reference = {"a": [(10.0, 20.0, "x"), (30.0, 40.0, "y")]}
    bounds = np.array([0.0, 10, 20, 30, 40, 100, 110, 3600])
    scores = np.zeros((7, 2))
    scores[1, 0] = scores[3, 1] = 0.9  # each event found at 0.9
    scores[5, 0] = 0.95  # and a false alarm of x above it, at 100-110 s: 1 per hour before x is found
    result = sed_metrics(reference, {"a": []}, {"a": 3600.0}, {"a": (bounds, scores)})
    # below 1 per hour, x's true positive rate is 0 and y's 1: their mean minus their spread (alpha_st 1) is 0;
    # from 1 to 100 per hour both are 1: the area is 99 / 100
    assert result.psds1 == pytest.approx(0.99) and result.psds2 == pytest.approx(0.99)
    scores[5, 0], scores[3, 0] = 0.0, 0.95  # the false alarm on y's event: a cross trigger of x
    result = sed_metrics(reference, {"a": []}, {"a": 3600.0}, {"a": (bounds, scores)})
    # scenario 2 adds 0.5 x (1 per 10 s of y: 360 per hour), beyond 100 per hour: x is never found within it
    assert result.psds1 == pytest.approx(0.99) and result.psds2 == 0.0
    scores[3, 0] = 0.5  # below the true events' scores: no false alarm before both are found
    assert sed_metrics(reference, {"a": []}, {"a": 3600.0}, {"a": (bounds, scores)}).psds2 == 1.0


def test_strong_labels_are_read_and_each_mistake_is_one_message(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text(HEADER + "a.wav\t1.0\t2.0\tx\nsub/b.wav\t0\t0.5\ty\nc.wav\t\t\t\na.wav\t1.5\t3\tx\n")
    reference = read_strong_labels(path, ["x", "y", "z"])
    assert reference == {"a.wav": [(1.0, 2.0, "x"), (1.5, 3.0, "x")], "sub/b.wav": [(0.0, 0.5, "y")], "c.wav": []}
    # a class's overlapping events are one event for sed_scores_eval (it refuses them)
    result = sed_metrics(reference, {n: [] for n in reference}, dict.fromkeys(reference, 4.0))
    assert result.reference_events == 2 and result.event_micro.recall == 0.0
    audioset = tmp_path / "audioset.tsv"
    audioset.write_text("segment_id\tstart_time_seconds\tend_time_seconds\tlabel\nYabc_30000\t0.2\t1.4\t/m/09x0r\n")
    assert read_strong_labels(audioset, ["Speech", "Dog"]) == {"Yabc_30000": [(0.2, 1.4, "Speech")]}  # by mid
    for text, message in (
        ("filename\tonset\tevent_label\na.wav\t1\tx\n", "labels.tsv: needs the columns filename onset offset"),
        (HEADER + "a.wav\t1.0\t2.0\tx\na.wav\tsoon\t2\tx\n", "labels.tsv, line 3: the onset 'soon' is not a number"),
        (HEADER + "a.wav\t2.0\t2.0\tx\n", "line 2: the offset (2.0) must come after the onset (2.0)"),
        (HEADER + "a.wav\t-1\t2.0\tx\n", "line 2: the onset must be 0 s or more"),
        (
            HEADER + "a.wav\t0\t1\tdog\nb.wav\t0\t1\tx\nb.wav\t0\t1\tcat\n",
            "2 labels are not among the model's classes: 'dog' (line 2), 'cat' (line 4)",
        ),
        (HEADER, "no files in these labels"),
    ):
        path.write_text(text)
        with pytest.raises(DataError) as caught:
            read_strong_labels(path, ["x", "y"])
        assert message in str(caught.value) and str(path) in str(caught.value)


def test_clips_are_found_by_relative_path_file_name_or_stem(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.wav", "sub/b.flac", "sub/Yabc_30000.wav", "sub/a.wav"):
        soundfile.write(tmp_path / name, np.zeros(800, np.float32), 8000)
    found = find_clips(["a.wav", "sub/a.wav", "b.flac", "Yabc_30000"], tmp_path)
    assert found == {
        "a.wav": tmp_path / "a.wav",
        "sub/a.wav": tmp_path / "sub/a.wav",
        "b.flac": tmp_path / "sub/b.flac",
        "Yabc_30000": tmp_path / "sub/Yabc_30000.wav",
    }
    with pytest.raises(DataError, match=r"3 files of the labels are not in .*: gone.wav, other/a.wav, c.wav$"):
        find_clips(["gone.wav", "other/a.wav", "c.wav", "a.wav"], tmp_path)  # other/a.wav: two a.wav, none there
    with pytest.raises(DataError, match="no such folder of clips"):
        find_clips(["a.wav"], tmp_path / "none")


def test_without_sed_scores_eval_one_message_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sed_scores_eval", None)  # import sed_scores_eval: ImportError
    with pytest.raises(SedUnavailable, match=r"pip install 'dclsify\[sed\]'"):
        sed_metrics({"a": [(0.0, 1.0, "x")]}, {"a": []}, {"a": 2.0})
    result = runner.invoke(app, ["eval", str(tmp_path / "model.safetensors"), "--strong", str(tmp_path / "l.tsv")])
    assert result.exit_code == 1 and "pip install 'dclsify[sed]'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_strong_command_finds_the_tones_of_a_long_file(tagger_checkpoint, tmp_path):
    rate, spans = 8000, [(0.5, 1.5, "low", 300), (2.0, 3.0, "middle", 1000), (3.5, 4.5, "high", 3000)]
    spans.append((5.0, 5.5, "low", 300))
    sound = 0.005 * np.random.default_rng(0).standard_normal(6 * rate).astype(np.float32)
    for onset, offset, _, frequency in spans:
        sound[round(onset * rate) : round(offset * rate)] += tone(frequency, rate, offset - onset)
    clips = tmp_path / "clips"
    (clips / "quiet").mkdir(parents=True)
    soundfile.write(clips / "tones.wav", sound, rate)
    soundfile.write(clips / "quiet" / "noise.wav", sound[: 2 * rate] * 0, rate)  # 2 s of silence, no event
    labels = clips / "labels.tsv"
    labels.write_text(HEADER + "".join(f"tones.wav\t{on}\t{off}\t{label}\n" for on, off, label, _ in spans))
    labels.write_text(labels.read_text() + "quiet/noise.wav\t\t\t\n")
    args = ["eval", str(tagger_checkpoint), "--strong", str(labels), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert ": 2 files, 4 reference events of 3 classes" in result.output
    rows = dict(line.rsplit(None, 1) for line in result.output.splitlines() if re.search(r"  \d\.\d{4}$", line))
    assert set(rows) >= {"event-based F1, macro (200-ms collar)", "segment-based F1, micro (1-s segments)"}
    data = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert data["files"] == 2 and data["reference_events"] == 4 and data["classes"] == ["high", "low", "middle"]
    assert data["event_macro"]["f1"] > 0.7 and data["segment_micro"]["f1"] > 0.7 and data["psds1"] > 0.5
    assert float(rows["PSDS1 (DCASE scenario 1)"]) == pytest.approx(data["psds1"], abs=1e-4)
    assert evaluate_events(tagger_checkpoint, labels, device="cpu").as_dict() == data  # what the command printed
    (tmp_path / "empty").mkdir()
    for extra, message in (
        (["--data", str(labels)], "give --data (clip-level metrics) or --strong"),
        (["--per-class", "ap.csv"], "--per-class is for --data, not --strong"),
        (["--threshold", "0.4", "--low", "0.6"], "low must not exceed the threshold"),
        (["--audio-dir", str(tmp_path / "empty")], "2 files of the labels are not in"),
    ):
        failed = runner.invoke(app, [*args, *extra])
        assert failed.exit_code == 1 and message in failed.output, failed.output
