"""``dclsify train --dry-run``: everything a run would use, worked out without training.

The resolved recipe (with a checkpoint's front-end and layers, where it fine-tunes one), how
the global batch is made on N processes and the learning rate it takes, steps per epoch and in
all, the data's clip and class counts, the model's parameters and where the run's files go:
what a user checks before a long run on a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..surgery.checkpoint import read_metadata
from .datasets import open_source
from .loader import make_loader
from .recipe import BatchPlan, Recipe, as_recipe, plan_batch
from .sources import audioset_classes
from .train import FineTuning, TrainError, build_model, check_head_fits, epoch_steps, resolve_recipe


@dataclass(frozen=True)
class RunPlan:
    recipe: Recipe
    batch: BatchPlan
    clips: int | None  # None: no data given
    classes: int
    classes_from: str  # where the class count comes from
    steps_per_epoch: int | None
    warmup_steps: int | None
    parameters: int
    trainable: int
    run_dir: Path
    fine_tuning: FineTuning | None = None  # where model.source is a dclsify checkpoint

    @property
    def steps(self) -> int | None:
        return None if self.steps_per_epoch is None else self.steps_per_epoch * self.recipe.train.epochs

    def as_dict(self) -> dict:
        """What ``--dry-run --json`` prints: the resolved recipe and the values derived from it."""
        return {
            "recipe": self.recipe.as_dict(),
            "processes": self.batch.processes,
            "accumulate": self.batch.accumulate,
            "global_batch": self.batch.global_batch,
            "lr": self.batch.lr,
            "steps_per_epoch": self.steps_per_epoch,
            "steps": self.steps,
            "clips": self.clips,
            "classes": self.classes,
            "parameters": self.parameters,
            "run_dir": str(self.run_dir),
            "fine_tuning": None if self.fine_tuning is None else self.fine_tuning.as_dict(),
        }


def plan_run(
    recipe: Recipe | str | os.PathLike | None = None,
    data: str | os.PathLike | list | None = None,
    processes: int | None = None,
    out: str | os.PathLike = "runs/run",
    overrides: list[str] = (),
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    trust_code: bool = False,
    blacklist: str | os.PathLike | None = None,
) -> RunPlan:
    """What :func:`~dclsify.pipeline.train.train` would do with ``recipe`` on ``data`` with
    ``processes`` processes (default: ``WORLD_SIZE``, as torchrun sets it, else 1), without
    training: the data is opened (not decoded) and the model built. Without ``data`` the
    class count is ``model.num_classes``, a checkpoint source's own or AudioSet's 527, and
    clips and steps are None."""
    recipe = resolve_recipe(as_recipe(recipe, overrides))  # a checkpoint's front-end, as train() reads the data
    processes = processes if processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
    batch = plan_batch(recipe.train, processes)
    clips = per_epoch = warmup = class_names = None
    if data is not None:
        train_set = open_source(data, recipe.audio, audio_dir, classes, blacklist)
        if not train_set.class_names:
            raise TrainError(f"{data} has no classes to learn (no labels)")
        check_head_fits(recipe, train_set.multi_label)
        count, classes_from, class_names = len(train_set.class_names), "the data", train_set.class_names
        clips = len(train_set)
        t = recipe.train
        loader = make_loader(train_set, t.batch_size, True, 0, 0, processes, t.seed, False, t.sampler, t.epoch_clips)
        per_epoch = epoch_steps(loader, batch, t.epoch_clips or clips)
        warmup = round(recipe.train.warmup_epochs * per_epoch)
    elif recipe.model.num_classes:
        count, classes_from = recipe.model.num_classes, "model.num_classes"
    elif _checkpoint_classes(recipe.model.source):  # fine-tuning: the checkpoint's own classes
        count, class_names = _checkpoint_classes(recipe.model.source)
        classes_from = "the checkpoint's; no data given"
    else:
        count, classes_from = len(audioset_classes()), "AudioSet's; no data given"
    model = build_model(recipe, count, trust_code=trust_code, class_names=class_names)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return RunPlan(
        recipe,
        batch,
        clips,
        count,
        classes_from,
        per_epoch,
        warmup,
        parameters,
        trainable,
        Path(out),
        getattr(model, "fine_tuning", None),
    )


def _checkpoint_classes(source: str) -> tuple[int, list[str] | None] | None:
    """(class count, names or None) of a checkpoint source that records a head; None otherwise."""
    if not source.endswith(".safetensors"):
        return None
    recorded = read_metadata(source)  # resolve_recipe read it already: it is there and sound
    count = recorded["rewrite"]["num_classes"]
    return (count, recorded["class_names"]) if count else None
