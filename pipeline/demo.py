"""``dclsify demo``: the whole pipeline on built-in data, on a laptop CPU, in minutes.

It generates the seeded sound set of :mod:`.synth` (14 classes, multi-label), trains
ConvNeXt-atto with DCLS and its DSC twin (the same network with its depthwise 7x7
convolutions) with the same recipe (``examples/recipes/demo.toml``), evaluates both on the
held-out split and prints their scores side by side.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import h5py

from ..surgery.checkpoint import load
from .evaluate import Metrics, evaluate
from .plan import RunPlan, plan_run
from .recipe import load_recipe
from .synth import EVAL_CLIPS, TRAIN_CLIPS, make_sound_set
from .train import TrainError, TrainResult, train

DEMO_FOLDER = Path("dclsify-demo")
DEMO_SEED = 0


@dataclass
class DemoRun:
    name: str
    parameters: int
    metrics: Metrics
    seconds: float
    checkpoint: Path


@dataclass
class DemoResult:
    runs: list[DemoRun]
    chance_map: float  # the mAP of random scores: each class's share of the evaluation clips, averaged
    seconds: float


def demo_data(
    folder: str | os.PathLike = DEMO_FOLDER / "data",
    console=None,
    train_clips: int = TRAIN_CLIPS,
    eval_clips: int = EVAL_CLIPS,
) -> tuple[Path, Path]:
    """The demo's train and eval files in ``folder``, generated (seeded) unless already there."""
    folder = Path(folder)
    paths = folder / "train.h5", folder / "eval.h5"
    if all(_is_demo_set(path, clips) for path, clips in zip(paths, (train_clips, eval_clips), strict=True)):
        return paths
    with console.status("generating the demo's sound set") if console is not None else nullcontext():
        return make_sound_set(folder, train_clips, eval_clips, seed=DEMO_SEED)


def _is_demo_set(path: Path, clips: int) -> bool:
    try:
        with h5py.File(path, "r") as handle:
            return int(handle.attrs.get("synth_seed", -1)) == DEMO_SEED and handle["waveform"].shape[0] == clips
    except (OSError, KeyError):
        return False


def chance_map(eval_path: str | os.PathLike) -> float:
    """The expected mAP of scores that know nothing: a class's AP is then its share of positives."""
    with h5py.File(eval_path, "r") as handle:
        targets = handle["target"][:]
    shares = targets.mean(axis=0)
    return float(shares[shares > 0].mean())


def demo(
    folder: str | os.PathLike = DEMO_FOLDER,
    overrides: list[str] = (),
    console=None,
    train_clips: int = TRAIN_CLIPS,
    eval_clips: int = EVAL_CLIPS,
) -> DemoResult:
    """Train and evaluate the DCLS model and its DSC twin on the demo's sound set in ``folder``
    (``overrides``: ``section.key=value`` for both runs' recipe)."""
    started = time.perf_counter()
    folder = Path(folder)
    train_path, eval_path = demo_data(folder / "data", console, train_clips, eval_clips)
    runs = []
    for name, dcls in (("DCLS", True), ("DSC", False)):
        recipe = load_recipe("demo", [*overrides, f"model.dcls={str(dcls).lower()}"])
        if console is not None:
            model = recipe.model
            what = f"Dcls2d {model.kernel}x{model.kernel}/{model.count}" if dcls else "depthwise 7x7"
            console.print(f"[bold]{name}[/]: {model.source.removeprefix('timm:')} with {what}")
        result = train(recipe, train_path, eval_path, folder / "runs" / name.lower(), overwrite=True, console=console)
        metrics = evaluate(result.best_checkpoint, eval_path, batch_size=recipe.train.batch_size)
        parameters = sum(p.numel() for p in load(result.best_checkpoint).parameters())
        runs.append(DemoRun(name, parameters, metrics, result.seconds, result.best_checkpoint))
    return DemoResult(runs, chance_map(eval_path), time.perf_counter() - started)


def train_or_demo(
    recipe: str | os.PathLike | None = None,
    overrides: list[str] = (),
    data: str | os.PathLike | list | None = None,
    eval_data: str | os.PathLike | list | None = None,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    console=None,
    **options,
) -> TrainResult:
    """What ``dclsify train`` runs. ``resume`` (a run directory) continues that run exactly as it was
    recorded (give nothing else). Otherwise ``recipe`` (a built-in name or a TOML file; None: the
    defaults) with ``overrides`` (``section.key=value``) trains on ``data`` into ``out`` (default
    ``runs/RECIPE``); with no ``data`` (and no recipe or ``eval_data``) the demo's recipe trains on
    the demo's sound set, made in ``dclsify-demo/data`` unless there. ``options`` are :func:`train`'s
    (``overwrite``, ``trust_code``, ``audio_dir``, ``classes``, ...)."""
    if resume is not None:
        recorded = ("audio_dir", "classes", "blacklist")  # config.json keeps them
        if recipe or overrides or data or eval_data or out or any(options.get(key) for key in recorded):
            raise TrainError(
                "--resume continues a run as it was recorded: give no --recipe, --set, --data, --eval-data, --out "
                "or --blacklist"
            )
        return train(out=resume, resume=True, console=console, **options)
    if data is None:
        if recipe is not None or eval_data is not None:
            raise TrainError(
                "no --data: give the training data (without --data, --recipe and --eval-data, the demo trains)"
            )
        data, eval_data = demo_data(console=console)
        recipe = "demo"
    return train(load_recipe(recipe, overrides), data, eval_data, _run_dir(recipe, out), console=console, **options)


def plan_or_demo(
    recipe: str | os.PathLike | None = None,
    overrides: list[str] = (),
    data: str | os.PathLike | list | None = None,
    out: str | os.PathLike | None = None,
    processes: int | None = None,
    **options,
) -> RunPlan:
    """What :func:`train_or_demo` would run, worked out without training (:func:`plan_run`):
    without ``data`` and ``recipe``, the demo's recipe on the demo's sound set where it is made
    (nothing is generated). ``options``: ``audio_dir``, ``classes``, ``trust_code``, ``blacklist``."""
    if data is None and recipe is None:
        recipe = "demo"
        paths = (DEMO_FOLDER / "data" / "train.h5", DEMO_FOLDER / "data" / "eval.h5")
        if all(_is_demo_set(path, clips) for path, clips in zip(paths, (TRAIN_CLIPS, EVAL_CLIPS), strict=True)):
            data = paths[0]
    return plan_run(recipe, data, processes, _run_dir(recipe, out), overrides, **options)


def _run_dir(recipe: str | os.PathLike | None, out: str | os.PathLike | None) -> Path:
    return Path(out) if out else Path("runs") / (Path(recipe).stem if recipe else "default")
