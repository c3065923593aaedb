"""Cross-validation and repeated seeds: one recipe trained once per held-out fold (and seed),
each a normal run directory, summarised as the mean and standard deviation of its figures.

``dclsify cv`` and ``dclsify train --seeds`` are :func:`cross_validate` and :func:`repeat_seeds`.
A study's folder holds ``study.json`` (what it runs, so that ``--resume`` continues it), one run
directory per fold and seed (``fold-1-seed-0``; ``seed-0`` for seeds alone), and, when every run
has ended, ``summary.json`` and ``summary.csv``.

The figures of a run are those of its last evaluation, of the model as training left it (``eval`` in
``metrics.jsonl``), not of its best epoch: picking the epoch on the held-out fold would flatter them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..surgery.files import atomic_path
from .datasets import describe_data, open_source, parse_selector, split_selector
from .plan import plan_run
from .recipe import load_recipe
from .train import TrainError, TrainResult, check_same_classes, train

STUDY_FILE = "study.json"
SUMMARY_METRICS = ("accuracy", "mAP", "mAUC", "d_prime")


@dataclass(frozen=True)
class StudyRun:
    """One training run of a study: its held-out fold (None: seeds alone), seed and directory,
    and its last evaluation (``accuracy``, ``mAP``, ``mAUC``, ``d_prime``; empty until it has ended)."""

    fold: str | None
    seed: int
    dir: Path
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"fold": self.fold, "seed": self.seed, "dir": str(self.dir), **self.metrics}


@dataclass(frozen=True)
class StudySummary:
    """Every run's figures, and their mean and sample standard deviation (n - 1; None for one run)."""

    runs: list[StudyRun]
    multi_label: bool
    mean: dict
    std: dict

    def as_dict(self) -> dict:
        return {
            "multi_label": self.multi_label,
            "runs": [run.as_dict() for run in self.runs],
            "mean": self.mean,
            "std": self.std,
        }


@dataclass
class StudyResult:
    """What :func:`cross_validate` and :func:`repeat_seeds` return: the summary (None when stopped
    before every run ended), the study's folder and whether it was stopped (resume it with ``resume=True``)."""

    folder: Path
    summary: StudySummary | None
    interrupted: bool
    seconds: float
    folds: bool  # a cross-validation (dclsify cv), not seeds alone (dclsify train --seeds)


def summarize(runs: Sequence[StudyRun], multi_label: bool) -> StudySummary:
    """The mean and the sample standard deviation of each figure over ``runs``: ``mAP`` always,
    ``accuracy`` for single-label data, ``mAUC`` and ``d_prime`` besides."""
    names = [m for m in SUMMARY_METRICS if not (multi_label and m == "accuracy")]
    mean, std = {}, {}
    for name in names:
        values = [run.metrics.get(name) for run in runs]
        if any(v is None or not math.isfinite(v) for v in values):
            continue  # an infinite d-prime (a perfect class) has no mean
        mean[name] = float(np.mean(values))
        std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return StudySummary(list(runs), multi_label, mean, std)


def write_summary(folder: str | os.PathLike, summary: StudySummary) -> tuple[Path, Path]:
    """``folder/summary.json`` (:meth:`StudySummary.as_dict`) and ``folder/summary.csv`` (one row a run,
    then the rows ``mean`` and ``std``), each written whole or not at all."""
    folder = Path(folder)
    names = list(summary.mean)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["fold", "seed", *names, "dir"])
    for run in summary.runs:
        writer.writerow([run.fold or "", run.seed, *(_cell(run.metrics.get(n)) for n in names), run.dir])
    for row in ("mean", "std"):
        writer.writerow([row, "", *(_cell(getattr(summary, row)[n]) for n in names), ""])
    paths = folder / "summary.json", folder / "summary.csv"
    for path, content in zip(paths, (json.dumps(summary.as_dict(), indent=2) + "\n", text.getvalue()), strict=True):
        with atomic_path(path) as temporary:
            temporary.write_text(content)
    return paths


def _cell(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def last_evaluation(run_dir: str | os.PathLike) -> dict:
    """The figures of a run's last evaluation (``metrics.jsonl``'s last ``eval``), or {} if it has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    last = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "eval" in record:
            last = record["eval"]
    return {name: last.get(name) for name in SUMMARY_METRICS if name in last}


def _finished(run_dir: Path) -> bool:
    return (run_dir / "last.safetensors").is_file()


def _started(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() and any((run_dir / "checkpoints").glob("step_*.pt"))


# -- the study: what it runs, recorded so that it can be resumed ---------------------------------


@dataclass(frozen=True)
class Study:
    """A study as ``study.json`` records it: a recipe (a built-in name or a file, with ``--set``
    overrides), and one :class:`Trial` per fold and seed."""

    recipe: str | None
    overrides: list[str]
    resolved: dict  # the recipe's values when the study started: a recipe file edited since is refused
    trials: list[Trial]
    multi_label: bool
    options: dict  # train()'s audio_dir, classes, trust_code

    def as_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "overrides": self.overrides,
            "resolved": self.resolved,
            "multi_label": self.multi_label,
            "options": self.options,
            "trials": [t.as_dict() for t in self.trials],
        }

    @classmethod
    def from_dict(cls, values: dict) -> Study:
        trials = [Trial(**t) for t in values["trials"]]
        return cls(
            values["recipe"], values["overrides"], values["resolved"], trials, values["multi_label"], values["options"]
        )


@dataclass(frozen=True)
class Trial:
    """One run: train on ``data``, evaluate on ``eval_data``, with ``seed``, in ``name`` (a folder of the study)."""

    name: str
    fold: str | None
    seed: int
    data: str
    eval_data: str

    def as_dict(self) -> dict:
        return {"name": self.name, "fold": self.fold, "seed": self.seed, "data": self.data, "eval_data": self.eval_data}


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]: distinct non-negative integers."""
    if not isinstance(text, str):
        seeds = list(text)
    else:
        try:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise TrainError(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise TrainError(f"--seeds takes distinct non-negative integers, e.g. 0,1,2; got {text!r}")
    return seeds


def fold_plan(data: str, folds: str = "all", fold_seed: int = 0, **where) -> tuple[str, list[str], list[str]]:
    """Where the folds of ``data`` come from, and which are held out in turn.

    A dataset that comes with folds (ESC-50: 5, UrbanSound8K: 10) uses them: ``folds`` is ``all`` or a
    list of its fold names (``1,2,3``). For other data (a folder of class folders, a manifest, an HDF5
    file, a split such as ``ROOT#split=train``), ``folds`` is their number k: k stratified folds are made
    from ``fold_seed`` (the ``kfold`` selector). Returns the data with that selector, the held-out folds
    and all its folds.
    ``where``: ``audio_dir`` and ``classes``, as :func:`~dclsify.pipeline.datasets.open_source` takes them.
    """
    path, selector = _selector_of(data)
    if "fold" in selector or "kfold" in selector:
        raise TrainError(f"{data}: give the dataset without a fold selector; --folds chooses the folds")
    layout = describe_data(data, **where)
    if layout.folds and len(layout.folds) < 2:
        raise TrainError(f"{data} has a single fold: cross-validation needs two at least (--folds K makes K)")
    if layout.folds:
        names = list(layout.folds)
        if folds == "all":
            return data, names, names
        chosen = [f.strip() for f in folds.split(",") if f.strip()]
        missing = [f for f in chosen if f not in layout.folds]
        if missing or not chosen:
            raise TrainError(
                f"{data} has no fold {', '.join(missing) or repr(folds)}: its folds are {', '.join(names)} "
                "(--folds all, or some of them: 1,2,3)"
            )
        return data, chosen, names
    if folds == "all":
        raise TrainError(
            f"{data} ({layout.layout}) comes without folds: give their number, --folds 5, to make that many "
            "stratified folds"
        )
    try:
        count = int(folds)
    except ValueError:
        raise TrainError(
            f"{data} ({layout.layout}) comes without folds: --folds takes their number, e.g. 5; got {folds!r}"
        ) from None
    if not 2 <= count <= layout.clips:
        raise TrainError(f"--folds {count}: k-fold cross-validation needs 2 to {layout.clips} folds here")
    made = _with_selector(path, {**selector, "kfold": str(count), "kfold_seed": str(fold_seed)})
    names = [str(k) for k in range(1, count + 1)]
    return made, names, names


def _selector_of(data: str) -> tuple[str, dict[str, str]]:
    """``ROOT#split=train&kfold=5`` -> (``ROOT``, {"split": "train", "kfold": "5"}), checked."""
    path, text = split_selector(data)
    if text is None:
        return path, {}
    parse_selector(text, data)  # a selector that is wrong fails here, with the datasets' message
    return path, dict(part.partition("=")[::2] for part in text.split("&"))


def _with_selector(path: str, selector: dict[str, str]) -> str:
    return path + ("#" + "&".join(f"{k}={v}" for k, v in selector.items()) if selector else "")


def _fold_trials(data: str, held_out: list[str], every: list[str], seeds: list[int]) -> list[Trial]:
    path, selector = _selector_of(data)
    trials = []
    for fold in held_out:
        rest = ",".join(f for f in every if f != fold)
        train_data = _with_selector(path, {**selector, "fold": rest})
        eval_data = _with_selector(path, {**selector, "fold": fold})
        trials += [Trial(f"fold-{fold}-seed-{s}", fold, s, train_data, eval_data) for s in seeds]
    return trials


def check_classes(trials: Sequence[Trial], options: dict) -> bool:
    """Every evaluation fold's classes must occur in its training folds (else the run could not learn
    them and would be scored on them): one clear error naming the fold and the classes. Returns
    whether the data is multi-label."""
    multi_label = False
    for trial in {t.fold: t for t in trials}.values():
        train_set = open_source(trial.data, None, options.get("audio_dir"), options.get("classes"))
        eval_set = open_source(trial.eval_data, None, options.get("audio_dir"), options.get("classes"))
        check_same_classes(train_set, eval_set)
        multi_label = multi_label or train_set.multi_label
        taught = train_set.target_matrix().any(axis=0)
        asked = eval_set.target_matrix().any(axis=0)
        unseen = [train_set.class_names[i] for i in np.flatnonzero(asked & ~taught)]
        if unseen:
            shown = ", ".join(unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
            raise TrainError(f"fold {trial.fold}: its clips hold classes no training fold has ({shown})")
    return multi_label


# -- running it -----------------------------------------------------------------------------------


def cross_validate(
    recipe: str | os.PathLike | None,
    data: str,
    out: str | os.PathLike,
    folds: str = "all",
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    fold_seed: int = 0,
    console=None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    **options,
) -> StudyResult:
    """Train ``recipe`` once per held-out fold of ``data`` (and per seed: ``train.seed``), the other folds
    as its training data, and summarise the runs (:func:`summarize`; ``out/summary.json`` and ``.csv``).

    ``folds``: see :func:`fold_plan`. ``resume=True`` continues the study in ``out`` (give nothing
    else): ended runs are kept, a stopped one resumes exactly, the others start. ``options`` go to
    :func:`~dclsify.pipeline.train.train` (``audio_dir``, ``classes``, ``trust_code``). Ctrl-C (or
    ``stop_after`` optimiser steps in the run under way) stops the run under way after its step and
    returns ``interrupted``."""
    out = Path(out)
    if resume:
        return _continue(out, console, stop_after)
    where = {key: options.get(key) for key in ("audio_dir", "classes")}
    base, held_out, every = fold_plan(data, folds, fold_seed, **where)
    trials = _fold_trials(base, held_out, every, parse_seeds(seeds))
    return _start(recipe, list(overrides), trials, out, overwrite, options, console, stop_after)


def repeat_seeds(
    recipe: str | os.PathLike | None,
    data: str | os.PathLike | list,
    eval_data: str | os.PathLike | list,
    out: str | os.PathLike,
    seeds: Sequence[int] | str,
    overrides: Sequence[str] = (),
    console=None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    **options,
) -> StudyResult:
    """Train ``recipe`` on ``data`` once per seed (``train.seed``), each evaluated on ``eval_data``, into
    ``out/seed-N``, and summarise as :func:`cross_validate` does. ``resume=True`` continues the study in ``out``."""
    out = Path(out)
    if resume:
        return _continue(out, console, stop_after)
    if eval_data is None:
        raise TrainError("--seeds compares the runs on held-out data: give --eval-data")
    as_text = ",".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)
    eval_text = ",".join(map(str, eval_data)) if isinstance(eval_data, (list, tuple)) else str(eval_data)
    trials = [Trial(f"seed-{s}", None, s, as_text, eval_text) for s in parse_seeds(seeds)]
    return _start(recipe, list(overrides), trials, out, overwrite, options, console, stop_after)


def _start(recipe, overrides, trials, out: Path, overwrite, options, console, stop_after) -> StudyResult:
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: a study needs a folder")
    if (out / STUDY_FILE).exists() and not overwrite:
        raise TrainError(f"{out} holds a study already: --resume {out} continues it, --overwrite replaces it")
    if out.exists() and any(out.iterdir()) and not (out / STUDY_FILE).exists():
        # --overwrite replaces a study, never a folder of something else
        raise TrainError(f"{out} is not empty and holds no study ({STUDY_FILE}): choose another --out")
    multi_label = check_classes(trials, options)
    # everything a run would refuse (the recipe, the data, a checkpoint that cannot take it) fails here, once
    plan_run(
        recipe, trials[0].data, None, out / trials[0].name, [*overrides, f"train.seed={trials[0].seed}"], **options
    )
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = load_recipe(recipe, overrides).as_dict()
    study = Study(
        None if recipe is None else str(recipe), overrides, resolved, trials, multi_label, _as_options(options)
    )
    with atomic_path(out / STUDY_FILE) as temporary:
        temporary.write_text(json.dumps(study.as_dict(), indent=2) + "\n")
    return _carry_out(study, out, console, stop_after)


def _as_options(options: dict) -> dict:
    return {
        key: None if value is None else value if isinstance(value, bool) else str(value)
        for key, value in options.items()
    }


def _continue(out: Path, console, stop_after) -> StudyResult:
    path = out / STUDY_FILE
    if not path.is_file():
        raise TrainError(f"{out} holds no study to resume (no {STUDY_FILE})")
    try:
        study = Study.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise TrainError(f"{path} is damaged ({error})") from None
    return _carry_out(study, out, console, stop_after)


def _carry_out(study: Study, out: Path, console, stop_after) -> StudyResult:
    started = time.perf_counter()
    if load_recipe(study.recipe, study.overrides).as_dict() != study.resolved:
        raise TrainError(f"the recipe {study.recipe} changed since the study in {out} started: put it back to resume")
    progress = _study_progress(console, len(study.trials))
    progress.console.print(_plan_line(study.trials), highlight=False)
    runs, interrupted = [], False
    try:
        for number, trial in enumerate(study.trials, start=1):
            run_dir = out / trial.name
            if not _finished(run_dir):
                heading = f"[{number}/{len(study.trials)}] {_what(trial)}: training"
                progress.console.print(heading)
                result = _train_trial(study, trial, run_dir, progress, stop_after)
                if result.interrupted:
                    interrupted = True
                    break
            figures = last_evaluation(run_dir)
            runs.append(StudyRun(trial.fold, trial.seed, run_dir, figures))
            progress.console.print(f"{_what(trial)}: {_figures(figures, study.multi_label)}", highlight=False)
            progress.update(progress.task_ids[0], advance=1, status=_running_mean(runs, study.multi_label))
    finally:
        progress.stop()
    seconds, folds = time.perf_counter() - started, any(trial.fold is not None for trial in study.trials)
    if interrupted:
        return StudyResult(out, None, True, seconds, folds)
    summary = summarize(runs, study.multi_label)
    write_summary(out, summary)
    return StudyResult(out, summary, False, seconds, folds)


def _train_trial(study: Study, trial: Trial, run_dir: Path, progress, stop_after) -> TrainResult:
    """Run ``trial`` in ``run_dir``: resumed where a checkpoint is, else from the start (over a run
    that was killed before its first checkpoint)."""
    trust_code = bool(study.options.get("trust_code"))
    if _started(run_dir):
        return train(out=run_dir, resume=True, progress=progress, stop_after=stop_after, trust_code=trust_code)
    seeded = load_recipe(study.recipe, [*study.overrides, f"train.seed={trial.seed}"])
    where = {key: study.options.get(key) for key in ("audio_dir", "classes")}
    return train(
        seeded,
        trial.data,
        trial.eval_data,
        run_dir,
        overwrite=True,
        trust_code=trust_code,
        progress=progress,
        stop_after=stop_after,
        **where,
    )


def _plan_line(trials: Sequence[Trial]) -> str:
    """The study's first line: ``5 runs: folds 1, 2, 3, 4, 5 held out in turn, seed 0``."""
    folds = list(dict.fromkeys(t.fold for t in trials if t.fold is not None))
    seeds = list(dict.fromkeys(t.seed for t in trials))
    held_out = f"fold{'s' if len(folds) > 1 else ''} {', '.join(folds)} held out in turn, " if folds else ""
    seeds_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    return f"{len(trials)} run{'s' if len(trials) > 1 else ''}: {held_out}{seeds_text}"


def _what(trial: Trial) -> str:
    return f"fold {trial.fold}, seed {trial.seed}" if trial.fold is not None else f"seed {trial.seed}"


def _figures(figures: dict, multi_label: bool) -> str:
    names = [n for n in ("accuracy", "mAP") if not (multi_label and n == "accuracy")]
    return ", ".join(f"{n} {figures[n]:.4f}" for n in names if figures.get(n) is not None) or "no evaluation"


def _running_mean(runs: list[StudyRun], multi_label: bool) -> str:
    key = "mAP" if multi_label else "accuracy"
    values = [r.metrics[key] for r in runs if r.metrics.get(key) is not None]
    return f"mean {key} {np.mean(values):.4f}" if values else ""


def _study_progress(console, total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console or Console(),
    )
    progress.add_task("runs", total=total, status="")
    progress.start()
    return progress
