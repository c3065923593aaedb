"""Tagging sounds with a trained checkpoint: the right label, windows over long sounds, the CLI."""

import json

import numpy as np
import pytest
import soundfile
import torch
from rich.console import Console
from test_train import CLASSES, TINY, make_set
from typer.testing import CliRunner

from dclsify import cli
from dclsify.cli import app
from dclsify.pipeline.predict import Tagger
from dclsify.pipeline.recipe import load_recipe
from dclsify.pipeline.train import train

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


@pytest.fixture(scope="module")
def tagger_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    quiet = ["augment.speed_p=0", "augment.erase_p=0", "augment.mixup_alpha=0", "train.epochs=6", "train.lr=4e-3"]
    result = train(load_recipe(None, TINY + quiet), make_set(folder / "train.h5", 24, 0), None, folder / "run")
    return result.run_dir / "last.safetensors"


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


def test_predict_command_tags_files_and_folders(tagger_checkpoint, tmp_path):
    folder = tmp_path / "sounds"
    folder.mkdir()
    soundfile.write(folder / "a_low.wav", tone(300, 16000, 0.5), 16000)
    soundfile.write(folder / "b_middle.ogg", tone(1000, 44100, 0.5), 44100)
    (folder / "c_broken.wav").write_bytes(b"not a sound")
    result = runner.invoke(app, ["predict", str(tagger_checkpoint), str(folder), "--top-k", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    firsts = {row[0].rsplit("/", 1)[-1]: row[1] for row in rows if row and row[0].startswith(str(tmp_path))}
    assert firsts == {"a_low.wav": "low", "b_middle.ogg": "middle"}
    assert "warning:" in result.output and "c_broken.wav: unreadable" in result.output
    lines = runner.invoke(app, ["predict", str(tagger_checkpoint), str(folder / "a_low.wav"), "--json"]).output
    data = json.loads(lines.splitlines()[0])
    assert data["labels"][0]["label"] == "low" and len(data["labels"]) == 4 and data["windows"] == 1
    broken = runner.invoke(app, ["predict", str(tagger_checkpoint), str(folder / "c_broken.wav")])
    assert broken.exit_code == 1 and "no sound could be read" in broken.output
    missing = runner.invoke(app, ["predict", str(tmp_path / "none.safetensors"), str(folder)])
    assert missing.exit_code == 1 and "no such checkpoint" in missing.output
