"""Tagging sounds with a trained checkpoint: the right label, windows over long sounds, the CLI."""

import json

import numpy as np
import pytest
import soundfile
import torch
from rich.console import Console
from test_train import CLASSES
from typer.testing import CliRunner

from dclsify import cli
from dclsify.cli import app
from dclsify.pipeline.predict import Tagger
from dclsify.pipeline.sources import to_clip

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


def tone(frequency: float, rate: int, seconds: float) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * frequency * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


def test_a_tone_gets_its_label_whatever_its_rate_and_length(tagger_checkpoint, tmp_path):
    tagger = Tagger(tagger_checkpoint, hop_seconds=0.25)
    assert tagger.class_names == CLASSES and tagger.audio.sample_rate == 8000 and tagger.multi_label
    path = tmp_path / "middle.flac"
    soundfile.write(path, np.stack([tone(1000, 22050, 1.2)] * 2, axis=1), 22050)  # stereo, 22 kHz, 1.2 s
    prediction = tagger(path)
    assert prediction.windows == 4 and prediction.seconds == pytest.approx(1.2, abs=1e-3)  # 0, .25, .5, .7 s
    assert prediction.top(1)[0][0] == "middle" and prediction.top(1)[0][1] > 0.5 and len(prediction.top(10)) == 4
    assert prediction.top(4, threshold=0.99) == [(n, s) for n, s in prediction.top(4) if s >= 0.99]
    data, rate = soundfile.read(path, dtype="float32")
    same = tagger(torch.from_numpy(data.T.copy()), sample_rate=rate)  # the same sound as a (channels, samples) tensor
    np.testing.assert_allclose(same.scores, prediction.scores, atol=1e-5)
    mean = Tagger(tagger_checkpoint, pooling="mean", hop_seconds=0.25)(path)
    assert np.all(mean.scores <= prediction.scores + 1e-6)  # the mean of the windows never exceeds their max
    low = tagger(torch.from_numpy(tone(300, 8000, 0.3)), sample_rate=8000)  # shorter than a clip: one padded window
    assert low.windows == 1 and low.top(1)[0][0] == "low"
    with pytest.raises(ValueError, match="needs its sample_rate"):
        tagger(torch.zeros(100))


def test_a_long_sound_is_cut_into_windows_and_an_event_at_its_end_is_found(tagger_checkpoint):
    tagger = Tagger(tagger_checkpoint, hop_seconds=0.2)  # 0.5-s clips at 8 kHz, 0.2 s apart
    sound = np.concatenate([np.zeros(20000, np.float32), tone(300, 8000, 0.5)])  # 2.5 s of silence, then "low"
    windows = tagger.windows(sound)
    assert windows.shape == (14, 4000) and windows.dtype == torch.int16  # 0, 0.2, ..., 2.4 s, and 2.5 s: the end
    np.testing.assert_array_equal(windows[3].numpy(), to_clip(sound[4800:8800], 4000))
    np.testing.assert_array_equal(windows[-1].numpy(), to_clip(sound[-4000:], 4000))
    found = tagger(sound, sample_rate=8000)
    assert found.windows == 14 and found.seconds == 3.0 and found.top(1)[0][0] == "low"
    np.testing.assert_allclose(found.window_starts, [*np.arange(13) * 0.2, 2.5], atol=1e-9)
    assert found.window_scores.shape == (14, 4) and found.window_scores.argmax(0)[CLASSES.index("low")] == 13
    np.testing.assert_array_equal(found.scores, found.window_scores.max(0))
    low = CLASSES.index("low")
    assert found.scores[low] > 0.5 > Tagger(tagger_checkpoint, "cpu", "mean", 0.2)(sound, 8000).scores[low]
    np.testing.assert_array_equal(tagger.windows(sound[:1000]).numpy(), to_clip(sound[:1000], 4000)[None])


def test_a_waveform_may_be_int_pcm_or_samples_by_channels_on_any_device(tagger_checkpoint):
    tagger = Tagger(tagger_checkpoint)
    assert tagger.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # "auto" by default
    sound = tone(1000, 16000, 0.5)
    expected = tagger(torch.from_numpy(sound), sample_rate=16000).scores
    pcm = np.round(sound * 32768).astype(np.int16)  # what soundfile.read(dtype="int16") or scipy gives
    np.testing.assert_allclose(tagger(pcm, sample_rate=16000).scores, expected, atol=1e-4)
    np.testing.assert_allclose(tagger(pcm.astype(np.int32) << 16, sample_rate=16000).scores, expected, atol=1e-4)
    stereo = np.stack([sound, sound], axis=1)  # (samples, channels): soundfile.read's layout
    np.testing.assert_allclose(tagger(stereo, sample_rate=16000).scores, expected, atol=1e-6)
    with_grad = torch.from_numpy(stereo.T.copy()).to(tagger.device).requires_grad_()  # (channels, samples)
    np.testing.assert_allclose(tagger(with_grad, sample_rate=16000).scores, expected, atol=1e-6)
    for bad, message in (
        (np.zeros(0), "not empty"),
        (np.zeros((2, 3, 400)), r"got \(2, 3, 400\)"),
        (pcm.view(np.uint16), "uint16"),
    ):
        with pytest.raises(ValueError, match=message):
            tagger(bad, sample_rate=16000)


def test_the_windows_of_several_files_share_batches_in_order(tagger_checkpoint, tmp_path):
    paths = [tmp_path / name for name in ("a.wav", "b.wav", "c.flac", "d.wav")]
    soundfile.write(paths[0], tone(300, 16000, 0.3), 16000)  # one window
    paths[1].write_bytes(b"not a sound")
    soundfile.write(paths[2], tone(1000, 22050, 1.2), 22050)  # four windows
    soundfile.write(paths[3], tone(300, 8000, 0.5), 8000)  # one window
    tagger = Tagger(tagger_checkpoint, "cpu", hop_seconds=0.25, batch_size=3)
    batches = []
    tagger.model.register_forward_pre_hook(lambda _, inputs: batches.append(len(inputs[0])))
    outcomes = list(tagger.predict_files(paths))
    assert batches == [3, 3]  # a's window and c's first two, then c's last two and d's: not one batch per file
    decoded_ahead = list(tagger.predict_files(paths, workers=2))  # files decoded in two processes: the same
    assert [o[0] if isinstance(o, tuple) else o.source for o in decoded_ahead] == [str(p) for p in paths]
    assert decoded_ahead[1] == outcomes[1] and batches[2:] == [3, 3]
    for ahead, outcome in zip(decoded_ahead[::2] + decoded_ahead[3:], outcomes[::2] + outcomes[3:], strict=True):
        np.testing.assert_array_equal(ahead.window_scores, outcome.window_scores)
    assert outcomes[1][0] == str(paths[1]) and outcomes[1][1].startswith("unreadable")
    alone = Tagger(tagger_checkpoint, "cpu", hop_seconds=0.25, batch_size=1)
    for outcome, path, label, windows in zip(
        outcomes[::2] + outcomes[3:], paths[::2] + paths[3:], ("low", "middle", "low"), (1, 4, 1), strict=True
    ):
        assert outcome.source == str(path) and outcome.windows == windows and outcome.top(1)[0][0] == label
        np.testing.assert_allclose(outcome.scores, alone(path).scores, atol=1e-5)


def test_predict_command_tags_files_and_folders(tagger_checkpoint, tmp_path):
    folder = tmp_path / "sounds"
    folder.mkdir()
    soundfile.write(folder / "a_low.wav", tone(300, 16000, 0.5), 16000)
    soundfile.write(folder / "b_middle.ogg", tone(1000, 44100, 0.5), 44100)
    (folder / "c_broken.wav").write_bytes(b"not a sound")
    result = runner.invoke(app, ["predict", str(tagger_checkpoint), str(folder), "--top-k", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert rows[0] == ["sound", "label", "score"]  # piped: no stray line from a progress bar
    firsts = {row[0].rsplit("/", 1)[-1]: row[1] for row in rows if row and row[0].startswith(str(tmp_path))}
    assert firsts == {"a_low.wav": "low", "b_middle.ogg": "middle"}
    assert "warning:" in result.output and "c_broken.wav: unreadable" in result.output
    lines = runner.invoke(app, ["predict", str(tagger_checkpoint), str(folder / "a_low.wav"), "--json"]).output
    data = json.loads(lines.splitlines()[0])
    assert data["labels"][0]["label"] == "low" and len(data["labels"]) == 4 and data["windows"] == 1
    lines = runner.invoke(app, ["predict", str(tagger_checkpoint), str(folder), "--json"]).output.splitlines()
    assert [json.loads(line).get("error", "")[:10] for line in lines] == ["", "", "unreadable"]  # every line parses
    broken = runner.invoke(app, ["predict", str(tagger_checkpoint), str(folder / "c_broken.wav")])
    assert broken.exit_code == 1 and "no sound could be read" in broken.output
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no sound here")
    nothing = runner.invoke(app, ["predict", str(tagger_checkpoint), str(tmp_path / "notes")])
    assert nothing.exit_code == 1 and "no sound files (.wav" in nothing.output
    missing = runner.invoke(app, ["predict", str(tmp_path / "none.safetensors"), str(folder)])
    assert missing.exit_code == 1 and "no such checkpoint" in missing.output


def test_predict_events_finds_each_tone_once_in_every_format_and_draws_a_timeline(tagger_checkpoint, tmp_path):
    rate = 8000
    sound = 0.003 * np.random.default_rng(0).standard_normal(6 * rate).astype(np.float32)
    sound[4000:12000] += tone(300, rate, 1.0)  # "low" from 0.5 to 1.5 s
    sound[16000:24000] += tone(1000, rate, 1.0)  # "middle" from 2 to 3 s
    path = tmp_path / "two tones.wav"
    soundfile.write(path, sound, rate)
    args = ["predict", str(tagger_checkpoint), str(path), "--events"]
    tsv = runner.invoke(app, [*args, "--format", "tsv"])
    assert tsv.exit_code == 0, tsv.output
    lines = [line.split("\t") for line in tsv.stdout.splitlines()]
    assert lines[0] == ["filename", "onset", "offset", "event_label"]
    found = {label: (float(onset), float(offset)) for _, onset, offset, label in lines[1:] if label != "chirp"}
    assert set(found) == {"low", "middle"} and len([line for line in lines if line[3] == "low"]) == 1
    for label, (start, end) in {"low": (0.5, 1.5), "middle": (2.0, 3.0)}.items():
        assert abs(found[label][0] - start) < 0.1 and abs(found[label][1] - end) < 0.1, found
    events = Tagger(tagger_checkpoint, "cpu").events(path)
    as_json = runner.invoke(app, [*args, "--format", "json"])
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [e.as_dict() for e in events]
    assert runner.invoke(app, [*args, "--json"]).stdout == as_json.stdout
    as_csv = runner.invoke(app, [*args, "--format", "csv"]).stdout.splitlines()
    assert as_csv[0] == "file,onset,offset,label,score" and len(as_csv) == len(events) + 1
    table = runner.invoke(app, [*args, "--timeline", str(tmp_path / "timeline.png")])
    assert table.exit_code == 0 and "low" in table.stdout and "onset" in table.stdout
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per-class thresholds: "low" can no longer start an event; the other classes keep --threshold's default
    (tmp_path / "thresholds.csv").write_text("label,threshold\nlow,1.0\n")
    strict = runner.invoke(app, [*args, "--format", "tsv", "--threshold", str(tmp_path / "thresholds.csv")])
    assert strict.exit_code == 0 and "\tlow" not in strict.stdout and "\tmiddle" in strict.stdout
    (tmp_path / "bad.csv").write_text("label,threshold\nlow,0.5\nbarking,0.4\n")
    for extra, message in [
        (["--threshold", str(tmp_path / "bad.csv")], "line 3: 'barking' is not one of the model's classes"),
        (["--threshold", "loud"], "--threshold must be a number or a CSV file"),
        (["--format", "xml"], "--format must be table, tsv, csv or json"),
        (["--low", "0.8"], "low must not exceed the threshold"),
    ]:
        failed = runner.invoke(app, [*args, *extra])
        assert failed.exit_code == 1 and message in " ".join(failed.output.split()), failed.output
    failed = runner.invoke(app, ["predict", str(tagger_checkpoint), str(path), "--format", "tsv"])
    assert failed.exit_code == 1 and "--format go with --events" in failed.output
