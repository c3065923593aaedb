"""Knowledge distillation: the teacher file `dclsify logits` writes and its resume, the missing-clip
error, the loss, mixup of the teacher's targets, and distilled runs (exact, resumable, from the CLI)."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from test_train import CLASSES, TINY, losses, make_set
from typer.testing import CliRunner

from dclsify import cli, load, save
from dclsify.cli import app
from dclsify.pipeline.augment import Augment, AugmentConfig
from dclsify.pipeline.datasets import open_source
from dclsify.pipeline.frontend import LogMel
from dclsify.pipeline.recipe import load_recipe
from dclsify.pipeline.teacher import TeacherError, distillation_loss, read_teacher, score_to_file, teacher_targets
from dclsify.pipeline.train import build_model, train

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=300))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_set(tmp_path_factory.mktemp("kd") / "train.h5", 12, 0)  # 3 steps of 4 clips an epoch


def teacher_checkpoint(path, seed: int, classes=CLASSES):
    """A tiny model of ``classes`` saved as a run saves its best (untrained: its logits are what matter here)."""
    recipe = load_recipe(None, [*TINY, f"train.seed={seed}"])
    torch.manual_seed(seed)
    return save(build_model(recipe, len(classes)), path, classes, recipe.audio, True)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return [teacher_checkpoint(folder / f"teacher{seed}.safetensors", seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def scored(data, teachers, tmp_path_factory):
    """The teacher files of one model and of both, scored in batches of 4 (a file of 4 clips besides)."""
    folder = tmp_path_factory.mktemp("scored")
    score_to_file(teachers[:1], data, folder / "one.h5", batch_size=5)  # a last batch of 2
    score_to_file(teachers, data, folder / "two.h5", batch_size=4)
    score_to_file(teachers[:1], make_set(folder / "four.h5", 4, 0), folder / "four_clips.h5")
    return folder


def model_logits(checkpoint, data) -> np.ndarray:
    """A checkpoint's fp32 logits of every clip as loaded, not augmented, in one batch."""
    model = load(checkpoint).eval()
    dataset = open_source(data, model.audio)
    waveforms = torch.stack([torch.from_numpy(dataset.load(i)[0]) for i in range(len(dataset))])
    with torch.no_grad():
        return model(LogMel(model.audio)(waveforms)).numpy()


def read_file(path):
    with h5py.File(path, "r") as handle:
        return handle["names"].asstr()[:].tolist(), handle["logits"][:], dict(handle.attrs), handle["replaced"][:]


def test_the_logits_file_holds_each_clips_fp32_logits_and_the_mean_of_several(data, teachers, scored, tmp_path):
    names, logits, attrs, replaced = read_file(scored / "one.h5")
    assert names == [f"clip{i}" for i in range(12)]
    assert logits.dtype == np.float32 and logits.shape == (12, 4) and not replaced.any()
    assert json.loads(attrs["class_names"]) == CLASSES and attrs["done"] == 12 and attrs["multi_label"]
    assert json.loads(attrs["checkpoints"]) == [str(teachers[0])] and attrs["precision"] == "fp32"
    expected = [model_logits(path, data) for path in teachers]
    assert np.abs(expected[0] - expected[1]).max() > 0.05  # two teachers that differ
    np.testing.assert_allclose(logits, expected[0], rtol=1e-5, atol=1e-6)
    mean = read_file(scored / "two.h5")[1]
    np.testing.assert_allclose(mean, (expected[0] + expected[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not list(scored.glob("*.partial"))
    # the file is read by clip name: a training set in another order gets each clip's own row
    with h5py.File(data) as source, h5py.File(tmp_path / "reversed.h5", "w") as handle:
        for key in ("audio_name", "waveform", "target"):
            handle[key] = source[key][:][::-1]
        handle.attrs.update(source.attrs)
    teacher = read_teacher(scored / "two.h5", open_source(tmp_path / "reversed.h5"))
    assert teacher.rows.tolist() == list(range(11, -1, -1)) and teacher.checkpoints == [str(p) for p in teachers]
    assert isinstance(teacher.logits, np.memmap)  # read as batches need it, not loaded whole (AudioSet's: 4 GB)
    batch = teacher.logits_for(torch.tensor([0, 5]))
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.from_numpy(mean[[11, 6]]))


def test_an_interrupted_logits_run_continues_to_the_same_file(data, teachers, scored, tmp_path):
    out, partial = tmp_path / "teacher.h5", tmp_path / "teacher.h5.partial"

    def interrupt_after_two_batches(done, total):
        if done == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_to_file(teachers, data, out, batch_size=4, progress=interrupt_after_two_batches)
    assert not out.exists() and read_file(partial)[2]["done"] == 8
    with pytest.raises(TeacherError) as error:
        score_to_file(teachers[:1], scored / "four.h5", out, batch_size=4)
    assert str(error.value).startswith(f"{partial} was begun with other checkpoints ({teachers[0]}, {teachers[1]}), ")
    assert f"other data (12 clips of {data}): give the same checkpoints and data" in str(error.value)
    assert "--overwrite to start again" in str(error.value)
    calls = []
    report = score_to_file(teachers, data, out, batch_size=4, progress=lambda done, total: calls.append(done))
    assert report.resumed_from == 8 and calls == [12]  # only the last batch was scored again
    assert not partial.exists()
    whole, resumed = read_file(scored / "two.h5"), read_file(out)
    assert resumed[0] == whole[0] and np.array_equal(resumed[1], whole[1]) and resumed[2]["done"] == 12
    with pytest.raises(TeacherError, match="teacher.h5 exists already: remove it, or give --overwrite"):
        score_to_file(teachers, data, out)


def test_a_clip_missing_from_the_teacher_stops_training_before_it_starts(data, scored, tmp_path):
    recipe = load_recipe(None, [*TINY, f"train.teacher={json.dumps(str(scored / 'four_clips.h5'))}"])
    with pytest.raises(TeacherError) as error:
        train(recipe, data, None, tmp_path / "run")
    assert "8 of the 12 training clips are not in the teacher file" in str(error.value)
    assert "(the first: clip4, clip5, clip6, clip7, clip8, ...)" in str(error.value)
    assert not (tmp_path / "run").exists()  # no config, no model, no step
    no_file = load_recipe(None, [*TINY, f"train.teacher={json.dumps(str(tmp_path / 'none.h5'))}"])
    with pytest.raises(TeacherError, match="no such teacher file"):
        train(no_file, data, None, tmp_path / "run")


def test_the_loss_is_the_weighted_sum_of_the_two_cross_entropies():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[3.0, -2.0], [1.0, 1.0]])
    taught = teacher_targets(teacher, 1.0, True)
    loss, on_labels, on_teacher = distillation_loss(logits, labels, taught, 0.0, True)
    assert torch.equal(loss, F.binary_cross_entropy_with_logits(logits, labels))  # kd_weight 0: today's loss, exactly
    # BCE of each element, by hand: -(p log s(z) + (1 - p) log(1 - s(z))), averaged over the 4
    taught = teacher_targets(teacher, 2.0, True)
    assert torch.allclose(taught, torch.sigmoid(teacher / 2))
    loss, on_labels, on_teacher = distillation_loss(logits, labels, taught, 0.9, True)
    assert on_labels.item() == pytest.approx(0.5268534658253119, rel=1e-6)
    assert on_teacher.item() == pytest.approx(0.607494166670757, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * 0.5268534658253119 + 0.9 * 0.607494166670757, rel=1e-6)
    # single-label data: softmax cross-entropy against softmax(teacher / T), by hand 0.5113 and 0.5001
    taught = teacher_targets(teacher, 2.0, False)
    assert torch.allclose(taught.sum(-1), torch.ones(2)) and torch.allclose(taught, (teacher / 2).softmax(-1))
    loss, on_labels, on_teacher = distillation_loss(logits, labels, taught, 0.9, False)
    assert on_labels.item() == pytest.approx(0.5113321678769244, rel=1e-6)
    assert on_teacher.item() == pytest.approx(0.5001194379087897, rel=1e-6)
    assert loss.item() == pytest.approx(0.5012407109056031, rel=1e-6)


def test_mixup_mixes_the_teacher_targets_with_the_labels_lambda_and_partner():
    recipe = load_recipe(None, TINY)
    frontend = LogMel(recipe.audio)
    generator = torch.Generator().manual_seed(0)
    waveforms = (torch.randn(8, recipe.audio.samples, generator=generator) * 3000).to(torch.int16)
    labels = torch.rand(8, 4, generator=generator) < 0.4
    plain, with_teacher = (Augment(frontend, AugmentConfig(label_smoothing=0), seed=3) for _ in range(2))
    x, y = plain(waveforms, labels)
    x2, y2, taught = with_teacher(waveforms, labels, labels.float())
    assert torch.equal(x, x2) and torch.equal(y, y2)  # the teacher changes no draw: runs without one are as before
    assert torch.equal(taught, y2)  # the same lambda and the same partner for each clip
    assert not torch.equal(y, labels.float())  # and a real mix (lambda not 0 or 1, a partner not itself)
    assert plain.get_rng_state()["host"] == with_teacher.get_rng_state()["host"]
    assert torch.equal(plain.get_rng_state()["torch"], with_teacher.get_rng_state()["torch"])
    smoothing = Augment(frontend, AugmentConfig(label_smoothing=0.1), seed=3)
    _, y, taught = smoothing(waveforms, labels, labels.float())
    torch.testing.assert_close(y, taught * 0.9 + 0.1 / 4)  # the labels are smoothed, the teacher's targets not


def test_a_distilled_run_with_kd_weight_0_is_todays_run_and_resumes_exactly(data, scored, tmp_path):
    plain = train(load_recipe(None, TINY), data, None, tmp_path / "plain", stop_after=2)
    kd = [*TINY, f"train.teacher={json.dumps(str(scored / 'one.h5'))}"]
    zero = train(load_recipe(None, [*kd, "train.kd_weight=0"]), data, None, tmp_path / "zero", stop_after=2)
    assert plain.steps == zero.steps == 2
    assert losses(tmp_path / "zero") == losses(tmp_path / "plain")  # the same floats: same draws, same loss
    distilled = [*kd, "train.kd_temperature=2", "train.epochs=1", "train.log_every=2"]  # windows: steps 1-2, 3
    whole = train(load_recipe(None, distilled), data, None, tmp_path / "whole")
    part = train(load_recipe(None, distilled), data, None, tmp_path / "part", stop_after=1)  # mid-window
    assert part.interrupted
    resumed = train(out=tmp_path / "part", resume=True)
    assert whole.steps == resumed.steps == 3

    def lines(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["loss_labels"], r["loss_teacher"]) for r in records if "loss" in r]

    assert lines(tmp_path / "part") == lines(tmp_path / "whole") and len(lines(tmp_path / "whole")) == 2
    for _, loss, on_labels, on_teacher in lines(tmp_path / "whole"):
        assert loss == pytest.approx(0.1 * on_labels + 0.9 * on_teacher, rel=1e-5)


def test_logits_then_a_distilled_training_from_the_command_line(data, teachers, scored, tmp_path):
    teacher = tmp_path / "teacher.h5"
    made = runner.invoke(app, ["logits", f"{teachers[0]},{teachers[1]}", "--data", str(data), "-o", str(teacher)])
    assert made.exit_code == 0, made.output
    assert f"scored 12 clips x 4 classes with the mean logits of 2 models to {teacher}" in made.output
    overrides = [item for override in [*TINY, "train.epochs=1"] for item in ("--set", override)]

    def distil(run, teacher_file):
        teaching = ["--set", f"train.teacher={json.dumps(str(teacher_file))}"]
        return runner.invoke(app, ["train", "--data", str(data), "--out", str(run), *overrides, *teaching])

    trained = distil(tmp_path / "run", teacher)
    assert trained.exit_code == 0, trained.output
    assert f"distilling from {teacher} (2 model(s)): loss = 0.1 x labels + 0.9 x teacher" in trained.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all({"loss_labels", "loss_teacher"} <= set(r) for r in steps)
    assert all(r["loss"] == pytest.approx(0.1 * r["loss_labels"] + 0.9 * r["loss_teacher"], rel=1e-5) for r in steps)
    # user errors: one line each, no traceback, no file
    missing = distil(tmp_path / "run2", scored / "four_clips.h5")
    assert missing.exit_code == 1 and "8 of the 12 training clips are not in the teacher file" in missing.output
    other = teacher_checkpoint(tmp_path / "three.safetensors", 0, CLASSES[:3])
    out = str(tmp_path / "x.h5")
    for command, message in [
        (["logits", str(other), "--data", str(data), "-o", out], "was trained on 3 classes"),
        (["logits", str(tmp_path / "none.safetensors"), "--data", str(data), "-o", out], "no such checkpoint"),
        (["logits", str(teachers[0]), "--data", str(data), "-o", str(teacher)], "exists already"),
        (["logits", str(teachers[0]), "--data", str(data), "-o", out, "--precision", "fp8"], "fp32, bf16, fp16"),
    ]:
        result = runner.invoke(app, command)
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()
    assert "Traceback" not in missing.output and not (tmp_path / "run2").exists()
