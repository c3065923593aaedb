"""A training run's configuration: plain values in four sections, read from TOML files a user
can copy and edit (``examples/recipes/``), overridden by ``--set section.key=value``.

Every key is checked: an unknown one is an error naming it and the closest valid keys, a
value of the wrong type or out of range an error naming the key and what it takes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..surgery.heads import FRAME_POOLINGS
from .augment import AugmentConfig
from .frontend import AudioConfig
from .loader import SAMPLERS

OPTIMIZERS = ("adamw", "lamb")
PRECISIONS = ("fp32", "bf16", "fp16")
HEADS = ("clip", "frames")


class RecipeError(ValueError):
    """A recipe, or an override of it, that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ModelRecipe:
    """Which model to train: a timm backbone rewritten by dclsify, or a dclsify checkpoint to fine-tune."""

    source: str = "timm:convnext_tiny"  # timm:NAME, file:PATH.py:FACTORY, or a .safetensors checkpoint
    dcls: bool = True  # False: the DSC baseline (only the stem and head change)
    kernel: int = 23
    count: int = 26
    version: str = "gauss"
    sync: str = "stage"
    match: int | str | list = 7
    stem: str = "audio"  # audio (2x16 / 2x16), KHxKW[/SHxSW], or none
    drop_path: float = 0.4
    num_classes: int = 0  # 0: as many as the data has
    # clip: the head on the pooled features; frames: the head on each time position, the clip's score pooled from
    # the frames' (sharp frame scores; multi-label data only). A checkpoint source's own unless the recipe sets it
    head: str = "clip"
    frame_pooling: str = "linear_softmax"  # head = "frames": linear_softmax (sum p^2 / sum p) or attention
    freeze: bool = False  # fine-tuning: train the new head only
    clamp: bool = True  # clamp DCLS positions to the window after each step (the paper's run never does)


@dataclass(frozen=True)
class TrainRecipe:
    """How to train (Table 2 of the paper by default): optimiser, schedule, precision, bookkeeping."""

    epochs: int = 60
    warmup_epochs: float = 20.0
    batch_size: int = 64  # per process
    global_batch: int = 4096  # clips per optimiser step, all processes; 0: batch_size x processes
    lr: float = 4e-3  # the rate at reference_batch clips per step, scaled linearly to the global batch
    reference_batch: int = 4096  # 0: lr is the rate at the global batch, as given
    min_lr: float = 1e-6
    position_lr_scale: float = 5.0  # P and SIG learn this much faster, without weight decay
    weight_decay: float = 0.05  # none on biases, norms, P and SIG
    optimizer: str = "adamw"  # adamw or lamb
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 0.0  # max gradient norm; 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA; else e.g. 0.9998, evaluated alongside
    precision: str = "bf16"  # fp32, bf16 (autocast) or fp16 (autocast and a gradient scaler)
    compile: bool = False  # torch.compile the model
    seed: int = 0
    workers: int = 4  # DataLoader processes per training process
    device: str = "auto"  # auto (cuda if present), cpu, cuda
    eval_every: int = 1  # epochs
    checkpoint_every: int = 1000  # optimiser steps; and at every epoch's end
    keep: int = 3  # step checkpoints kept (the best is kept besides)
    log_every: int = 20  # optimiser steps between lines of metrics.jsonl
    deterministic: bool = False  # the same bits in every process (README: Determinism); slower
    teacher: str = ""  # knowledge distillation: a `dclsify logits` file of the training clips; "": labels only
    kd_weight: float = 0.9  # loss = (1 - kd_weight) x loss on the labels + kd_weight x loss on the teacher's targets
    kd_temperature: float = 1.0  # the teacher's targets: sigmoid (softmax) of its logits / kd_temperature
    sampler: str = "uniform"  # uniform (permutations, without replacement) or balanced (rare labels more often)
    epoch_clips: int = 0  # clips an epoch, all processes together; 0: as many as the training data has
    # fine-tuning: each stage learns at lr x layer_decay^depth, depth 0 the head (and all after the last stage),
    # 1 the last stage, ..., the stem the deepest; 1: one rate for all
    layer_decay: float = 1.0


SECTIONS = {"model": ModelRecipe, "train": TrainRecipe, "audio": AudioConfig, "augment": AugmentConfig}


@dataclass(frozen=True)
class Recipe:
    """A run's configuration. ``given`` holds the keys (``section.key``) that a recipe file, a
    config.json or an override set, as opposed to defaults: where a run starts from a checkpoint,
    the checkpoint's own settings stand for the rest (:func:`~dclsify.pipeline.train.resolve_recipe`).
    It is not part of the recipe's value (equality, :meth:`as_dict`)."""

    model: ModelRecipe = field(default_factory=ModelRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    audio: AudioConfig = field(default_factory=AudioConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def as_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"


def valid_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def default_values() -> dict[str, object]:
    """Every recipe key (``section.key``, as ``--set`` takes it) with its default value."""
    defaults = Recipe().as_dict()
    return {key: defaults[key.split(".")[0]][key.split(".")[1]] for key in valid_keys()}


def _unknown(key: str) -> RecipeError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    close += [k for k in keys if k.endswith(f".{key.rpartition('.')[2]}") and k not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else "; `dclsify train --list-keys` lists them"
    return RecipeError(f"unknown recipe key {key!r}{hint}")


def _check_type(key: str, value, default):
    """``value`` as the type of the field's default: ints are fine where floats go, nothing else converts."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int) and key != "model.match":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif key == "model.match":
        ok = isinstance(value, (int, str, list)) and not isinstance(value, bool)
    elif default is None:
        ok = True
    else:
        ok = isinstance(value, str)
    if not ok:
        raise RecipeError(f"{key} must be a {type(default).__name__}, got {value!r}")
    return value


def _apply(recipe: Recipe, values: dict, where: str) -> Recipe:
    """``recipe`` with the sections of ``values`` (nested: {"train": {"lr": ...}}) put in, and their keys given."""
    sections, given = {}, set(recipe.given)
    for section, entries in values.items():
        if section not in SECTIONS:
            raise (
                _unknown(section)
                if not isinstance(entries, dict)
                else RecipeError(f"{where}: unknown recipe section [{section}]; the sections are {', '.join(SECTIONS)}")
            )
        if not isinstance(entries, dict):
            raise RecipeError(f"{where}: [{section}] must be a table of keys")
        current = getattr(recipe, section)
        defaults = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
        changes = {}
        for key, value in entries.items():
            if key not in defaults:
                raise _unknown(f"{section}.{key}")
            changes[key] = _check_type(f"{section}.{key}", value, defaults[key])
            given.add(f"{section}.{key}")
        try:
            sections[section] = dataclasses.replace(current, **changes)
        except (ValueError, TypeError) as error:
            raise RecipeError(f"{where}: {error}") from None
    return dataclasses.replace(recipe, **sections, given=frozenset(given))


def _check(recipe: Recipe) -> Recipe:
    m, t = recipe.model, recipe.train
    problems = [
        (t.epochs >= 1, "train.epochs must be at least 1"),
        (0 <= t.warmup_epochs < t.epochs, "train.warmup_epochs must be at least 0 and fewer than train.epochs"),
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.global_batch >= 0 and t.reference_batch >= 0, "train.global_batch and reference_batch must be >= 0"),
        (t.lr > 0 and t.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0"),
        (t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}"),
        (t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}"),
        (
            len(t.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas),
            "train.betas must be two numbers in [0, 1)",
        ),
        (0 <= t.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (t.clip_grad >= 0 and t.weight_decay >= 0, "train.clip_grad and train.weight_decay must be >= 0"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None, "train.device must be auto, cpu or cuda[:N]"),
        (
            min(t.eval_every, t.checkpoint_every, t.keep, t.log_every) >= 1,
            "train.eval_every, checkpoint_every, keep and log_every must be at least 1",
        ),
        (t.workers >= 0, "train.workers must be >= 0"),
        (t.sampler in SAMPLERS, f"train.sampler must be one of {', '.join(SAMPLERS)}, got {t.sampler!r}"),
        (t.epoch_clips >= 0, "train.epoch_clips must be >= 0 (0: as many as the training data has)"),
        (m.num_classes >= 0, "model.num_classes must be >= 0 (0: from the data)"),
        (m.head in HEADS, f"model.head must be one of {', '.join(HEADS)}, got {m.head!r}"),
        (
            m.frame_pooling in FRAME_POOLINGS,
            f"model.frame_pooling must be one of {', '.join(FRAME_POOLINGS)}, got {m.frame_pooling!r}",
        ),
        (0 <= m.drop_path < 1, "model.drop_path must be in [0, 1)"),
        (0 <= t.kd_weight <= 1, "train.kd_weight must be in [0, 1]"),
        (t.kd_temperature > 0, "train.kd_temperature must be > 0"),
        (0 < t.layer_decay <= 1, "train.layer_decay must be in (0, 1] (1: no decay)"),
    ]
    for ok, message in problems:
        if not ok:
            raise RecipeError(message)
    return recipe


@dataclass(frozen=True)
class BatchPlan:
    """How a run's global batch is made on ``processes`` processes, and the learning rate it takes."""

    processes: int
    per_process: int
    accumulate: int  # micro-batches per optimiser step in each process
    global_batch: int
    lr: float  # the peak rate of the run
    min_lr: float
    recipe_lr: float
    reference_batch: int  # the global batch recipe_lr is the rate at

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.per_process} per process x {self.processes} "
            f"process{'es' if self.processes > 1 else ''} x {self.accumulate} accumulated"
        )

    def describe_lr(self) -> str | None:
        """One line where the run's rate is not the recipe's (linear scaling); None where it is."""
        if self.global_batch == self.reference_batch:
            return None
        return (
            f"lr {self.lr:.3g} = {self.recipe_lr:.3g} (the recipe's rate at {self.reference_batch} clips) "
            f"x {self.global_batch}/{self.reference_batch}, scaled linearly to the global batch"
        )


def _nearest(values: list[int], target: int) -> list[int]:
    below = [v for v in values if v < target]
    above = [v for v in values if v > target]
    return [*below[-1:], *above[:1]]


def plan_batch(t: TrainRecipe, processes: int) -> BatchPlan:
    """``train.global_batch`` split over ``processes`` processes of ``train.batch_size`` clips:
    the accumulation it takes, and the learning rate scaled linearly from ``train.reference_batch``.
    A global batch they cannot divide is a :class:`RecipeError` naming the batches that work."""
    if processes < 1:
        raise RecipeError(f"the number of processes must be at least 1, got {processes}")
    per_step = t.batch_size * processes
    global_batch = t.global_batch or per_step
    if global_batch % per_step:
        share, hints = global_batch // processes, []
        if global_batch % processes == 0:
            divisors = [b for b in range(1, share + 1) if share % b == 0]
            hints.append(f"train.batch_size {' or '.join(map(str, _nearest(divisors, t.batch_size)))}")
        else:
            hints.append(f"run on a number of processes that divides {global_batch}")
        multiples = [per_step * k for k in range(max(global_batch // per_step, 1), global_batch // per_step + 2)]
        hints.insert(
            len(hints) - 1 if global_batch % processes else 1,
            f"train.global_batch {' or '.join(map(str, _nearest(multiples, global_batch)))}",
        )
        raise RecipeError(
            f"train.global_batch {global_batch} is not a whole number of steps of {t.batch_size} clips per "
            f"process x {processes} processes: set {', or '.join(hints)}"
        )
    reference = t.reference_batch or global_batch
    scale = global_batch / reference
    return BatchPlan(
        processes, t.batch_size, global_batch // per_step, global_batch, t.lr * scale, t.min_lr * scale, t.lr, reference
    )


def recipe_from_dict(values: dict, where: str) -> Recipe:
    """A recipe from nested values (``{"train": {"lr": ...}}``, as a run's config.json records
    them), checked as a recipe file is; ``where`` names their origin in errors."""
    return _check(_apply(Recipe(), values, where))


def parse_override(text: str) -> tuple[str, object]:
    """``section.key=value`` (or ``key=value`` where only one section has that key) -> (dotted key, value).
    The value is read as TOML (``1e-3``, ``true``, ``[0.9, 0.99]``, ``"x"``), else taken as a string."""
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise RecipeError(f"--set takes section.key=value, got {text!r}")
    if "." not in key:
        owners = [k for k in valid_keys() if k.endswith(f".{key}")]
        if len(owners) != 1:
            raise _unknown(key) if not owners else RecipeError(f"{key!r} is in several sections: {', '.join(owners)}")
        key = owners[0]
    if key not in valid_keys():
        raise _unknown(key)
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped with dclsify (``examples/recipes/*.toml``), by name."""
    folder = resources.files("dclsify").joinpath("examples", "recipes")
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".toml")}


def describe_builtin_recipes() -> dict[str, str]:
    """Each built-in recipe's name and what it is (its first comment line), sorted by name."""
    return {
        name: path.read_text().splitlines()[0].lstrip("# ").rstrip(":")
        for name, path in sorted(builtin_recipes().items())
    }


def load_recipe(name_or_file: str | os.PathLike | None = None, overrides: list[str] = ()) -> Recipe:
    """A recipe by name (see :func:`builtin_recipes`), from a TOML file (or a run's ``config.json``),
    or the defaults (None), with ``section.key=value`` overrides applied, checked."""
    recipe = Recipe()
    if name_or_file is not None:
        path = Path(name_or_file)
        if not path.is_file():
            shipped = builtin_recipes()
            if str(name_or_file) not in shipped:
                close = difflib.get_close_matches(str(name_or_file), list(shipped), n=3, cutoff=0.4)
                hint = (
                    f"; did you mean {', '.join(close)}?"
                    if close
                    else f"; the recipes are {', '.join(sorted(shipped))}"
                )
                raise RecipeError(f"no recipe file or built-in recipe {str(name_or_file)!r}{hint}")
            path = shipped[str(name_or_file)]
        try:
            text = path.read_text()
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecipeError(
                f"{path} is not a valid {'JSON' if path.suffix == '.json' else 'TOML'} file: {error}"
            ) from None
        recipe = _apply(recipe, values, str(path))
    return apply_overrides(recipe, overrides)


def apply_overrides(recipe: Recipe, overrides: list[str] = ()) -> Recipe:
    """``recipe`` with ``section.key=value`` overrides (as ``--set`` takes them) applied, checked."""
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".")
        recipe = _apply(recipe, {section: {name: value}}, f"--set {text}")
    return _check(recipe)


def as_recipe(recipe: Recipe | str | os.PathLike | None, overrides: list[str] = ()) -> Recipe:
    """A :class:`Recipe` as given, or read by :func:`load_recipe` (a built-in name, a TOML file, None:
    the defaults), with ``overrides`` applied."""
    if isinstance(recipe, Recipe):
        return apply_overrides(recipe, overrides)
    return load_recipe(recipe, overrides)
