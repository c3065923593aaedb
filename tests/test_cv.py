"""Cross-validation and repeated seeds: the folds each run trains and is scored on, the summary's
numbers, a stopped study resumed to the same summary, and the errors before any training."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
from rich.console import Console
from test_train import TINY
from typer.testing import CliRunner

from dclsify import cli
from dclsify.cli import app
from dclsify.pipeline.cv import StudyRun, cross_validate, last_evaluation, repeat_seeds, summarize, write_summary
from dclsify.pipeline.datasets import open_source
from dclsify.pipeline.synth import CLASS_NAMES, make_esc50_layout
from dclsify.pipeline.train import TrainError

runner = CliRunner()
RATE = 8000
# one short epoch a run: 14 classes x 4 training folds = 56 clips, 14 steps of 4
QUICK = [*TINY, "audio.seconds=0.5", "train.epochs=1", "train.deterministic=true", "train.log_every=7"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


@pytest.fixture(scope="module")
def esc50(tmp_path_factory) -> Path:
    """The demo's sounds in ESC-50's layout: 14 classes x 5 folds, one clip of each class a fold."""
    return make_esc50_layout(tmp_path_factory.mktemp("data") / "ESC-50", 5, seconds=0.5, sample_rate=RATE)


@pytest.fixture(scope="module")
def study(esc50, tmp_path_factory):
    """Folds 1 and 2 held out in turn, run to the end."""
    out = tmp_path_factory.mktemp("cv") / "study"
    return cross_validate(None, str(esc50), out, folds="1,2", overrides=QUICK)


def test_esc50_layout_as_esc50_has_it(esc50):
    rows = list(csv.DictReader(open(esc50 / "meta" / "esc50.csv")))
    assert list(rows[0]) == ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    assert len(rows) == 70
    for row in rows:
        fold, source, take, target = Path(row["filename"]).stem.split("-")
        assert (fold, source, take, target) == (row["fold"], row["src_file"], row["take"], row["target"])
        assert row["category"] == CLASS_NAMES[int(target)]
        assert row["esc10"] == str(int(target) < 10)
        info = soundfile.info(esc50 / "audio" / row["filename"])
        assert (info.samplerate, info.frames, info.channels) == (RATE, RATE // 2, 1)
    for fold in "12345":  # every class once in every fold
        assert sorted(int(r["target"]) for r in rows if r["fold"] == fold) == list(range(14))


def test_each_run_trains_on_the_other_folds_and_is_scored_on_its_own(study, esc50):
    assert not study.interrupted
    assert [(run.fold, run.seed) for run in study.summary.runs] == [("1", 0), ("2", 0)]
    for run in study.summary.runs:
        config = json.loads((run.dir / "config.json").read_text())
        rest = ",".join(f for f in "12345" if f != run.fold)
        assert config["data"] == f"{esc50}#fold={rest}"
        assert config["eval_data"] == f"{esc50}#fold={run.fold}"
        assert config["recipe"]["train"]["seed"] == 0
        training, held_out = open_source(config["data"]), open_source(config["eval_data"])
        assert (len(training), len(held_out)) == (56, 14)
        assert not {training.clip_name(i) for i in range(56)} & {held_out.clip_name(i) for i in range(14)}
        assert run.metrics == last_evaluation(run.dir)
        assert set(run.metrics) == {"accuracy", "mAP", "mAUC", "d_prime"}


def test_summary_files_hold_the_runs_and_their_mean(study):
    summary = json.loads((study.folder / "summary.json").read_text())
    assert summary["multi_label"] is False
    assert [(r["fold"], r["seed"], r["dir"]) for r in summary["runs"]] == [
        ("1", 0, str(study.folder / "fold-1-seed-0")),
        ("2", 0, str(study.folder / "fold-2-seed-0")),
    ]
    for name in ("accuracy", "mAP"):
        values = [r[name] for r in summary["runs"]]
        assert summary["mean"][name] == pytest.approx(np.mean(values), abs=1e-12)
        assert summary["std"][name] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2), abs=1e-12)
    rows = list(csv.reader(open(study.folder / "summary.csv")))
    assert rows[0][:4] == ["fold", "seed", "accuracy", "mAP"]
    assert [row[0] for row in rows[1:]] == ["1", "2", "mean", "std"]
    assert float(rows[3][3]) == pytest.approx(summary["mean"]["mAP"], rel=1e-5)


def test_a_stopped_study_resumed_ends_with_the_same_summary(study, esc50, tmp_path):
    out = tmp_path / "study"
    stopped = cross_validate(None, str(esc50), out, folds="1,2", overrides=QUICK, stop_after=5)
    assert stopped.interrupted and stopped.summary is None
    assert not (out / "summary.json").exists() and not (out / "fold-2-seed-0").exists()
    resumed = cross_validate(None, "", out, resume=True)
    assert not resumed.interrupted
    ours = json.loads((out / "summary.json").read_text())
    theirs = json.loads((study.folder / "summary.json").read_text())
    for runs in (ours["runs"], theirs["runs"]):
        for run in runs:
            del run["dir"]
    assert ours == theirs  # bit for bit: the recipe is deterministic
    again = cross_validate(None, "", out, resume=True)  # every run ended: nothing trains, same summary
    assert again.summary.mean == resumed.summary.mean


def test_a_run_killed_before_its_first_checkpoint_starts_again(study, esc50, tmp_path):
    out = tmp_path / "study"
    cross_validate(None, str(esc50), out, folds="1", overrides=QUICK, stop_after=3)
    for checkpoint in (out / "fold-1-seed-0" / "checkpoints").glob("*.pt"):
        checkpoint.unlink()  # as if killed before it saved one
    resumed = cross_validate(None, "", out, resume=True)
    assert resumed.summary.runs[0].metrics == study.summary.runs[0].metrics


def test_summarize_exact_numbers():
    runs = [StudyRun("1", 0, Path("a"), {"accuracy": 0.8, "mAP": 0.5, "mAUC": 0.9, "d_prime": math.inf})]
    runs += [StudyRun("2", 0, Path("b"), {"accuracy": 0.9, "mAP": 0.6, "mAUC": 0.8, "d_prime": 2.0})]
    runs += [StudyRun("3", 0, Path("c"), {"accuracy": 1.0, "mAP": 0.7, "mAUC": 0.7, "d_prime": 1.0})]
    summary = summarize(runs, multi_label=False)
    assert summary.mean == pytest.approx({"accuracy": 0.9, "mAP": 0.6, "mAUC": 0.8})  # an infinite d-prime: no mean
    assert summary.std == pytest.approx({"accuracy": 0.1, "mAP": 0.1, "mAUC": 0.1})  # n - 1
    multi = summarize(runs[1:2], multi_label=True)
    assert multi.mean == {"mAP": 0.6, "mAUC": 0.8, "d_prime": 2.0} and multi.std == dict.fromkeys(multi.mean)


def test_write_summary_files(tmp_path):
    runs = [
        StudyRun(None, s, tmp_path / f"seed-{s}", {"mAP": m, "mAUC": 0.5, "d_prime": 0.0})
        for s, m in ((0, 0.25), (1, 0.75))
    ]
    json_path, csv_path = write_summary(tmp_path, summarize(runs, multi_label=True))
    assert json.loads(json_path.read_text())["mean"] == {"mAP": 0.5, "mAUC": 0.5, "d_prime": 0.0}
    assert csv_path.read_text().splitlines() == [
        "fold,seed,mAP,mAUC,d_prime,dir",
        f",0,0.25,0.5,0,{tmp_path / 'seed-0'}",
        f",1,0.75,0.5,0,{tmp_path / 'seed-1'}",
        "mean,,0.5,0.5,0,",
        "std,,0.353553,0,0,",
    ]


def test_k_stratified_folds_for_data_without_folds(tmp_path):
    """A folder of class folders has no folds: --folds 2 makes two stratified ones, each held out once."""
    root = tmp_path / "sounds"
    rng = np.random.default_rng(0)
    for name, frequency in (("high", 2000), ("low", 300)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            t = np.arange(RATE // 2) / RATE
            sound = 0.3 * np.sin(2 * np.pi * frequency * t) + 0.01 * rng.standard_normal(len(t))
            soundfile.write(root / name / f"{name}{i}.wav", sound, RATE)
    result = cross_validate(None, str(root), tmp_path / "cv", folds="2", overrides=[*QUICK, "train.epochs=1"])
    runs = result.summary.runs
    assert [run.fold for run in runs] == ["1", "2"]
    config = json.loads((runs[0].dir / "config.json").read_text())
    assert config["data"] == f"{root}#kfold=2&kfold_seed=0&fold=2"
    assert config["eval_data"] == f"{root}#kfold=2&kfold_seed=0&fold=1"
    held_out = [open_source(json.loads((r.dir / "config.json").read_text())["eval_data"]) for r in runs]
    assert [len(h) for h in held_out] == [4, 4]
    assert all(h.target_matrix().sum(axis=0).tolist() == [2, 2] for h in held_out)  # stratified


def test_repeat_seeds_summarises_one_run_per_seed(tmp_path, esc50):
    data, eval_data = f"{esc50}#fold=1,2,3,4", f"{esc50}#fold=5"
    result = repeat_seeds(None, data, eval_data, tmp_path / "seeds", "0,1", QUICK)
    assert [(run.fold, run.seed, run.dir.name) for run in result.summary.runs] == [
        (None, 0, "seed-0"),
        (None, 1, "seed-1"),
    ]
    seeds = [
        json.loads((run.dir / "config.json").read_text())["recipe"]["train"]["seed"] for run in result.summary.runs
    ]
    assert seeds == [0, 1]
    first, second = (run.metrics for run in result.summary.runs)
    assert first != second  # another seed, another run


@pytest.mark.parametrize(
    "folds, message",
    [
        ("7", "has no fold 7: its folds are 1, 2, 3, 4, 5"),
        ("1,x", "has no fold x"),
    ],
)
def test_folds_that_do_not_exist(esc50, tmp_path, folds, message):
    with pytest.raises(TrainError, match=message):
        cross_validate(None, str(esc50), tmp_path / "cv", folds=folds, overrides=QUICK)
    assert not (tmp_path / "cv").exists()


def test_a_class_no_training_fold_has_stops_before_training(tmp_path):
    root = tmp_path / "ESC-50"
    make_esc50_layout(root, 5, seconds=0.5, sample_rate=RATE)
    rows = list(csv.DictReader(open(root / "meta" / "esc50.csv")))
    kept = [r for r in rows if not (r["category"] == CLASS_NAMES[3] and r["fold"] != "2")]  # class 3 in fold 2 only
    with open(root / "meta" / "esc50.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    with pytest.raises(TrainError, match=f"fold 2: its clips hold classes no training fold has \\({CLASS_NAMES[3]}\\)"):
        cross_validate(None, str(root), tmp_path / "cv", overrides=QUICK)
    assert not (tmp_path / "cv").exists()


def test_cli_cv_errors_are_one_line(esc50, tmp_path):
    result = runner.invoke(app, ["cv", "--data", str(esc50), "--folds", "9", "--out", str(tmp_path / "cv")])
    assert result.exit_code == 1
    assert "has no fold 9: its folds are 1, 2, 3, 4, 5" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["cv", "--resume", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "holds no study to resume" in result.output


def test_cli_cv_prints_the_table(study, esc50, tmp_path):
    args = ["cv", "--data", str(esc50), "--folds", "1,2", "--out", str(tmp_path / "cv")]
    result = runner.invoke(app, [*args, *(f"--set={o}" for o in QUICK)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    mean = next(line for line in lines if line.split()[:1] == ["mean"])
    assert mean.split()[1:3] == [f"{study.summary.mean['accuracy']:.4f}", f"{study.summary.mean['mAP']:.4f}"]
    assert any(line.startswith("fold 1, seed 0: accuracy") for line in lines)
    assert lines[0] == "2 runs: folds 1, 2 held out in turn, seed 0"


def test_cli_train_seeds_then_resume_prints_the_same_table(esc50, tmp_path):
    out = tmp_path / "seeds"
    args = ["train", "--data", f"{esc50}#fold=1,2,3,4", "--eval-data", f"{esc50}#fold=5", "--out", str(out)]
    first = runner.invoke(app, [*args, "--seeds", "3", *(f"--set={o}" for o in QUICK)])
    assert first.exit_code == 0, first.output
    table = first.output[first.output.index("seed  accuracy") :].splitlines()[:-1]
    assert table[2].split()[0] == "3" and [line.split()[0] for line in table[-2:]] == ["mean", "std"]
    assert table[-1].split()[1:3] == ["-", "-"]  # one run: no standard deviation
    again = runner.invoke(app, ["train", "--resume", str(out)])  # every run ended: the same summary
    assert again.exit_code == 0, again.output
    assert again.output[again.output.index("seed  accuracy") :].splitlines()[:-1] == table
    refused = runner.invoke(app, [*args, "--seeds", "0,0"])
    assert refused.exit_code == 1 and "--seeds takes distinct non-negative integers" in refused.output


def test_overwrite_replaces_a_study_never_a_folder_of_something_else(esc50, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("months of work\n")
    with pytest.raises(TrainError, match="is not empty and holds no study"):
        cross_validate(None, str(esc50), folder, folds="1", overrides=QUICK, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainError, match="is a file: a study needs a folder"):
        cross_validate(None, str(esc50), tmp_path / "file", folds="1", overrides=QUICK)


def test_seeds_on_data_of_other_classes_is_one_error(esc50, tmp_path):
    with pytest.raises(TrainError, match="the evaluation data's 10 classes are not the training data's 14"):
        repeat_seeds(None, f"{esc50}#fold=1", f"{esc50}#subset=esc10&fold=2", tmp_path / "seeds", "0", QUICK)
    assert not (tmp_path / "seeds").exists()
