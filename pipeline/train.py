"""The training loop: one process, or many under ``torchrun`` (DistributedDataParallel).

``train(recipe, data, eval_data, out)`` reads the data, builds the model the recipe names,
and runs the paper's recipe; the loop itself is :func:`_run`, on one screen. A run
directory holds everything a run makes::

    config.json          the resolved recipe, the data, the class names, what a fine-tuning run kept
    metrics.jsonl        a line every log_every steps and one per evaluation
    curves.png           loss, learning rate and mAP
    checkpoints/         step_NNNNNNN.pt: all a resume needs (the last `keep`, and the best)
    best.safetensors     the best model by eval mAP, a dclsify checkpoint (dclsify.load)
    tensorboard/         event files, when tensorboard is installed

Only rank 0 writes files and prints. ``train(..., resume=True)`` continues a run exactly
where its last checkpoint left it: model, EMA, optimiser, scheduler, gradient scaler,
every random state and the position in the epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..surgery.checkpoint import (
    AUDIO_KEY,
    FRAME_HEAD_KEY,
    CheckpointError,
    convert,
    load,
    read_metadata,
    require_trust,
    save,
)
from ..surgery.dcls import Dcls2d
from ..surgery.files import atomic_path
from ..surgery.heads import FrameError, attach_frame_head, detach_frame_head, frame_head_of
from ..surgery.rewrite import SurgeryError, example_input, reset_head, stem_geometry
from .augment import Augment
from .datasets import open_source
from .evaluate import autocast, metrics, score_clips
from .frontend import LogMel
from .loader import FailureLog, make_loader
from .recipe import BatchPlan, Recipe, RecipeError, TrainRecipe, as_recipe, plan_batch, recipe_from_dict
from .sources import ClipDataset, read_blacklist
from .teacher import distillation_loss, read_teacher, teacher_targets

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "curves.png",
    "best.safetensors",
    "last.safetensors",
    "checkpoints",
    "tensorboard",
)


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_map: float | None
    best_checkpoint: Path | None
    last_eval: dict | None
    seconds: float
    clips_per_second: float
    interrupted: bool = False
    replaced_clips: dict = field(default_factory=dict)


# -- processes and devices ------------------------------------------------------------------


def _distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group under torchrun: NCCL for
    GPUs, gloo for CPUs (``device``: the recipe's train.device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("train.device is cuda, but torch sees no CUDA device here")
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        torch.cuda.set_device(device)
    return device


@contextmanager
def _deterministic(on: bool, device: torch.device):
    """``train.deterministic``: a run that computes the same bits in every process (README,
    Determinism). Torch's deterministic algorithms, which our conv's ``auto`` follows (it then
    chooses by estimate, not by timing), and cuDNN without its timing; as they were afterwards."""
    if not on:
        yield
        return
    if device.type == "cuda" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        # cuBLAS reads this once, at the process's first cuBLAS call (torch too, to allow it under
        # deterministic algorithms): in time here unless the process used cuBLAS before, and then
        # torch's error says to set it in the environment. :4096:8: torch's notes say :16:8 may be slower
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True)  # an operator with no deterministic version raises, naming itself
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True  # benchmark times per process
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2:]


# -- the model and its optimiser ------------------------------------------------------------


# the model.* keys that shape a checkpoint's layers: taken from the checkpoint unless the recipe sets them
LAYER_KEYS = ("dcls", "kernel", "count", "version", "sync", "match", "stem")


@dataclass(frozen=True)
class FineTuning:
    """What a run from a dclsify checkpoint (``model.source``) took from it: ``model.fine_tuning``
    after :func:`build_model`, the run's first line and ``fine_tuning`` in its config.json."""

    source: str
    tensors_kept: int  # the checkpoint's tensors (weights and buffers) the model starts from
    head_kept: bool  # the data's classes are the checkpoint's, same names in the same order
    checkpoint_classes: int | None
    classes: int
    audio_recorded: bool  # False: the checkpoint records no front-end (convert's files), the recipe's is used
    audio_overrides: dict  # audio.KEY -> [the checkpoint's value, the recipe's], where the recipe sets another
    frozen: bool
    frame_pooling: str | None = None  # the run's frame-wise head's pooling; None: a clip head
    checkpoint_frame_pooling: str | None = None  # the checkpoint's

    def describe(self) -> str:
        if self.head_kept:
            head = f"head kept ({self.classes} classes)"
        elif self.checkpoint_classes == self.classes:
            head = f"head new ({self.classes} classes, not the checkpoint's names in its order)"
        elif self.checkpoint_classes is None:
            head = f"head new ({self.classes} classes)"
        else:
            head = f"head new ({self.checkpoint_classes} -> {self.classes} classes)"
        if not self.audio_recorded:
            audio = "the checkpoint records no front-end: the recipe's"
        else:
            audio = "the checkpoint's front-end" + "".join(
                f", audio.{key} {json.dumps(mine)} (its {json.dumps(theirs)})"
                for key, (theirs, mine) in self.audio_overrides.items()
            )
        frozen = "; the body frozen, in eval mode: the head alone trains" if self.frozen else ""
        kind = "" if self.frame_pooling is None else f", its frames head ({self.frame_pooling} pooling)"
        if self.frame_pooling != self.checkpoint_frame_pooling:
            now, then = _head_kind(self.frame_pooling), _head_kind(self.checkpoint_frame_pooling)
            kind = f", {now} where the checkpoint has {then}"
        return f"fine-tuning from {self.source}: {self.tensors_kept} tensors kept, {head}{kind}; {audio}{frozen}"

    def as_dict(self) -> dict:
        return asdict(self)


def _head_kind(frame_pooling: str | None) -> str:
    return "a clip head" if frame_pooling is None else f"a frames head ({frame_pooling} pooling)"


def resolve_recipe(recipe: Recipe) -> Recipe:
    """The recipe a run from ``model.source`` uses: for a dclsify checkpoint, the checkpoint's
    front-end (``audio.*``, as it recorded them), layers (:data:`LAYER_KEYS`) and head (``model.head``,
    ``model.frame_pooling``) wherever the recipe does not set them (:attr:`Recipe.given`), so that its
    sample rate applies to the new data; any other source's recipe as it is. What :func:`train` records
    and ``--dry-run`` prints."""
    return _resolve(recipe)[0]


def _resolve(recipe: Recipe) -> tuple[Recipe, dict | None, dict]:
    """(the resolved recipe, the checkpoint's metadata or None, the recipe's audio values that differ
    from the checkpoint's: key -> [checkpoint's, recipe's])."""
    m = recipe.model
    if not m.source:
        raise TrainError(
            "model.source is empty: this recipe fine-tunes a dclsify checkpoint; name it with "
            "--set model.source=CHECKPOINT.safetensors"
        )
    if not m.source.endswith(".safetensors"):
        return recipe, None, {}
    try:
        metadata = read_metadata(m.source)
    except CheckpointError as error:
        raise TrainError(str(error)) from None
    layers = {}
    for key in LAYER_KEYS:
        if f"model.{key}" not in recipe.given:
            value = metadata["rewrite"][key]
            layers[key] = _stem_text(value) if key == "stem" else value
    pooling = metadata[FRAME_HEAD_KEY]
    if "model.head" not in recipe.given:
        layers["head"] = "clip" if pooling is None else "frames"
    if "model.frame_pooling" not in recipe.given and pooling is not None:
        layers["frame_pooling"] = pooling
    audio, overrides, recorded = recipe.audio, {}, metadata[AUDIO_KEY]
    if recorded is not None:
        mine = {f.name: getattr(audio, f.name) for f in fields(audio) if f"audio.{f.name}" in recipe.given}
        overrides = {k: [getattr(recorded, k), v] for k, v in mine.items() if v != getattr(recorded, k)}
        try:
            audio = dataclasses.replace(recorded, **mine)
        except ValueError as error:
            raise TrainError(f"the front-end of {m.source} with the recipe's audio settings: {error}") from None
    resolved = dataclasses.replace(recipe, model=dataclasses.replace(m, **layers), audio=audio)
    return resolved, metadata, overrides


def _stem_text(stem) -> str:
    """A checkpoint's recorded stem ([[kh, kw], [sh, sw]] or None) as model.stem writes it."""
    if stem is None:
        return "none"
    if stem_geometry("audio") == (tuple(stem[0]), tuple(stem[1])):
        return "audio"
    return "{}x{}/{}x{}".format(*stem[0], *stem[1])


def build_model(
    recipe: Recipe | str | os.PathLike,
    num_classes: int,
    overrides: list[str] = (),
    trust_code: bool = False,
    class_names: list[str] | None = None,
) -> nn.Module:
    """The model a recipe names, with a head of ``num_classes``: what :func:`train` trains.

    ``recipe`` is a :class:`Recipe`, a built-in recipe's name or a TOML file; ``overrides``
    ``section.key=value`` strings, as ``--set`` takes them. ``model.source`` is a timm name or
    a ``file:PATH.py:FACTORY`` (rewritten for audio: DCLS or, with ``model.dcls = false``, its
    DSC twin), or a dclsify checkpoint to fine-tune (converted, imported or trained), read as
    :func:`resolve_recipe` resolves the recipe: its layers and front-end are the checkpoint's
    unless the recipe sets them, and a key that shapes its layers (``dcls``, ``kernel``,
    ``stem``, ...) that the recipe sets must say what the checkpoint holds (an error names those
    that do not). It is rebuilt with the recipe's ``drop_path``; its head is kept where the data's
    ``class_names`` are the checkpoint's (same names, same order; without names, where the
    counts agree) and new otherwise (``model.fine_tuning``, a :class:`FineTuning`, says which).
    ``model.head = "frames"`` gives the model a frame-wise head (:func:`~dclsify.surgery.heads.attach_frame_head`);
    a checkpoint's head becomes the one the recipe sets (a new frames head on its classifier, or its clip head).
    A model that cannot take the run's spectrograms (another channel count, a size it cannot
    run on) is a :class:`TrainError`. ``model.freeze`` trains the head only.
    """
    recipe, metadata, audio_overrides = _resolve(as_recipe(recipe, overrides))
    m = recipe.model
    if m.num_classes and m.num_classes != num_classes:
        raise TrainError(f"model.num_classes is {m.num_classes}, but the data has {num_classes} classes")
    drop_path = {"drop_path_rate": m.drop_path} if m.drop_path else {}
    stem = None if m.stem.lower() == "none" else m.stem
    try:
        if metadata is not None:
            _check_layers_match(m, stem, metadata["rewrite"], m.source)
            recorded = {k: v for k, v in metadata["model_kwargs"].items() if k != "drop_path_rate"}
            model = load(m.source, trust_code=trust_code, model_kwargs={**recorded, **drop_path})
            model.fine_tuning = _start_from_checkpoint(model, recipe, num_classes, class_names, audio_overrides)
        else:
            require_trust(m.source, trust_code, "the recipe")
            model = convert(
                m.source,
                drop_path,
                kernel=m.kernel,
                count=m.count,
                version=m.version,
                match=m.match,
                sync=m.sync,
                stem=stem,
                num_classes=num_classes,
                input_size=recipe.audio.input_size,
                dcls=m.dcls,
                seed=recipe.train.seed,
            )
            _check_channels(model, f"the model of {m.source}", "set model.stem (audio, or KHxKW[/SHxSW])")
            if m.head == "frames":
                attach_frame_head(model, m.frame_pooling)
    except (SurgeryError, CheckpointError, FrameError) as error:
        raise TrainError(str(error)) from None
    if recipe.train.layer_decay != 1:
        stage_depths(model)  # a model without stages is refused here, before a run writes anything
    if m.freeze:
        head = {id(p) for module in head_modules(model) for p in module.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in head)
    return model


def _check_layers_match(m, stem, recorded: dict, path: str) -> None:
    """A checkpoint's layers are what they are: the recipe's keys that shape them must agree (those it
    does not set were taken from the checkpoint by :func:`resolve_recipe`)."""
    geometry = stem_geometry(stem)
    asked = {"dcls": m.dcls, "stem": None if geometry is None else [list(geometry[0]), list(geometry[1])]}
    if m.dcls and recorded["dcls"]:
        asked |= {"kernel": m.kernel, "count": m.count, "version": m.version, "sync": m.sync, "match": m.match}
    differ = [key for key, value in asked.items() if value != recorded[key]]
    if differ:

        def shown(key):
            value = recorded[key]
            if key == "stem":
                return "none" if value is None else "{}x{}/{}x{}".format(*value[0], *value[1])
            return value if isinstance(value, str) else json.dumps(value)

        settings = " ".join(f"--set model.{key}={shown(key)}" for key in differ)
        raise TrainError(
            f"model.source {path} holds layers the recipe does not describe ({', '.join(differ)}): "
            f"set what it holds ({settings}), or start from its timm source"
        )


def _start_from_checkpoint(model, recipe: Recipe, num_classes: int, class_names, audio_overrides) -> FineTuning:
    """Check that a loaded checkpoint's model can take the run's spectrograms, give it a new head
    where the classes differ, and say what was kept."""
    source = recipe.model.source
    _check_channels(model, source, "convert its source again with an audio stem (dclsify convert --stem audio)")
    config = model.dclsify.config
    if tuple(config.input_size) != recipe.audio.input_size:
        _check_runs_on(model, recipe.audio, source)
        config.input_size = recipe.audio.input_size  # its checkpoints then describe the input it was tuned on
    before = config.num_classes if config.num_classes is not None else getattr(model, "num_classes", None)
    if class_names is not None and model.class_names is not None:
        head_kept = list(model.class_names) == list(class_names)
    else:
        head_kept = before == num_classes  # convert's files name no classes: their count decides
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    kept = len(tensors)
    recorded = frame_head_of(model)
    recorded_pooling = None if recorded is None else recorded.pooling
    pooling = recipe.model.frame_pooling if recipe.model.head == "frames" else None
    new = head_modules(model) if not head_kept else [recorded] if recorded and pooling != recorded_pooling else []
    kept -= len({id(t) for module in new for t in module.state_dict(keep_vars=True).values()})
    if not head_kept:
        reset_head(model, num_classes)  # std-0.02 layers, as DCLS-Audio starts a head
        config.num_classes = num_classes
        model.class_names = None if class_names is None else list(class_names)
    if pooling is None:
        detach_frame_head(model)
    elif not head_kept or pooling != recorded_pooling:  # a new frames head: its attention layer follows the classes
        attach_frame_head(model, pooling)
    return FineTuning(
        source,
        kept,
        head_kept,
        before,
        num_classes,
        model.audio is not None,
        audio_overrides,
        recipe.model.freeze,
        pooling,
        recorded_pooling,
    )


def _check_channels(model: nn.Module, what: str, remedy: str) -> None:
    channels = example_input(model, model.dclsify.config).shape[1]
    if channels != 1:
        raise TrainError(f"{what} takes {channels}-channel input, not the 1 channel of a log-mel spectrogram: {remedy}")


def _check_runs_on(model: nn.Module, audio, source: str) -> None:
    """Run the model once on a zero spectrogram of the run's size: one it cannot take fails here,
    before any data is read, rather than at the first step."""
    config = model.dclsify.config
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, *audio.input_size))
    except Exception as error:  # noqa: BLE001 - the model's own error, about the run's input size
        detail = " ".join(str(error).split())[:200]
        mels, frames = audio.input_size
        raise TrainError(
            f"{source} cannot run on this run's spectrograms of {mels} mels x {frames} frames "
            f"({type(error).__name__}: {detail}); it was made for {config.input_size[0]} x {config.input_size[1]}: "
            "leave the audio.* settings to the checkpoint, or set ones it can take"
        ) from None
    finally:
        model.train(training)


def stage_depths(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth from the top, by stage, as ``train.layer_decay`` counts it: 0 for the
    head and all that follows the last stage (a final norm or conv), 1 for the last stage, ...,
    S for the first of S stages, S + 1 for the stem (all before the first stage, and parameters of
    the model itself). The stages are timm's: the children of the model's ``stages`` (ConvNeXt,
    MetaFormer, FastViT); a model without them is a :class:`TrainError`."""
    stages = getattr(model, "stages", None)
    order = [name for name, _ in stages.named_children()] if isinstance(stages, nn.Module) else []
    if not order:
        raise TrainError(
            f"train.layer_decay needs a model built of stages (timm's stages.N), and this "
            f"{type(model).__name__} has none: set train.layer_decay=1"
        )
    children = [name for name, _ in model.named_children()]
    first = children.index("stages")
    depths = {}
    for name, _ in model.named_parameters():
        top, _, rest = name.partition(".")
        if top == "stages":
            depths[name] = len(order) - order.index(rest.partition(".")[0])
        elif top in children and children.index(top) > first:
            depths[name] = 0
        else:
            depths[name] = len(order) + 1
    return depths


def parameter_groups(
    model: nn.Module, weight_decay: float, position_lr_scale: float, layer_decay: float = 1.0
) -> list[dict]:
    """Three groups: weights with decay; biases and norms (1-D) without; DCLS positions and
    spreads (P, SIG) without decay at ``position_lr_scale`` times the rate (timm's schedulers
    honour ``lr_scale``). A parameter shared by several layers appears once; frozen ones not at all.

    With ``layer_decay`` < 1 (fine-tuning, as BEiT and ConvNeXt do it), each of the three is split
    by :func:`stage_depths`, a parameter at depth d learning at ``layer_decay ** d`` times the rate
    (times ``position_lr_scale`` for positions); the groups go from the top down, so the first
    learns at the schedule's own rate."""
    kinds = ("decay", "no_decay", "positions")
    depths = stage_depths(model) if layer_decay != 1 else {}
    groups, seen = {}, set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        leaf = name.rpartition(".")[2]
        kind = "positions" if leaf in ("P", "SIG") else "no_decay" if parameter.ndim <= 1 else "decay"
        groups.setdefault((depths.get(name, 0), kinds.index(kind)), []).append(parameter)
    if layer_decay == 1:
        groups = {key: groups.get(key, []) for key in ((0, 0), (0, 1), (0, 2))}  # the three, as ever
    result = []
    for (depth, kind), parameters in sorted(groups.items()):
        group = {"params": parameters, "weight_decay": weight_decay if kind == 0 else 0.0}
        scale = (layer_decay**depth if layer_decay != 1 else 1.0) * (position_lr_scale if kind == 2 else 1.0)
        if layer_decay != 1 or kind == 2:
            group["lr_scale"] = scale
        result.append(group)
    return result


# DCLS-Audio's --opt_eps, given to either optimiser: AdamW's own default, and not timm's Lamb's (1e-6)
OPTIMIZER_EPS = 1e-8


def make_optimizer(t: TrainRecipe, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer (AdamW or LAMB) over :func:`parameter_groups` (with ``train.layer_decay``)."""
    groups = [g for g in parameter_groups(model, t.weight_decay, t.position_lr_scale, t.layer_decay) if g["params"]]
    if t.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=tuple(t.betas), eps=OPTIMIZER_EPS)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(t.betas), eps=OPTIMIZER_EPS)


def set_training(model: nn.Module, frozen: bool) -> None:
    """``model.train()``, but with a frozen body (``model.freeze``) only the head trains and the
    body runs as at inference (eval mode): its batch-norm statistics stay the checkpoint's (they
    would drift to the new data under weights that cannot follow them), and drop path leaves its
    features whole, so the head learns on the very features it is later evaluated on."""
    model.train()
    if frozen:
        head = {module for part in head_modules(model) for module in part.modules()}
        for module in model.modules():
            if module not in head:
                module.training = False


def head_modules(model: nn.Module) -> list[nn.Module]:
    """What a new head replaces and a linear probe trains: timm's classifier, and a frames head's pooling."""
    frame_head = frame_head_of(model)
    return [model.get_classifier(), *([] if frame_head is None else [frame_head])]


def check_head_fits(recipe: Recipe, multi_label: bool) -> None:
    """A frames head pools sigmoid frame scores (BCE): refuse it on one-label-a-clip data (a softmax)."""
    if recipe.model.head == "frames" and not multi_label:
        raise TrainError(
            'model.head = "frames" is for multi-label data (sigmoid scores per frame, pooled into the clip\'s), '
            "and this data has one label a clip (a softmax): set model.head=clip"
        )


def epoch_steps(loader, plan: BatchPlan, clips: int) -> int:
    """Optimiser steps in an epoch of ``loader`` (one process's batches) at ``plan``'s accumulation."""
    steps = len(loader) // plan.accumulate
    if steps == 0:
        raise TrainError(
            f"{clips} training clips an epoch make no full step of a global batch of {plan.global_batch}: "
            "lower train.global_batch"
        )
    return steps


def clamp_positions(model: nn.Module) -> None:
    """Clamp every trained ``Dcls2d``'s positions to its window; frozen ones stay as they were loaded."""
    clamped = set()  # a stage's layers share one P: clamp it once
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, Dcls2d) or not module.P.requires_grad:
                continue
            if (id(module.P), module.dilated_kernel_size) not in clamped:
                clamped.add((id(module.P), module.dilated_kernel_size))
                module.clamp_parameters()


# -- random states, progress, replicas ------------------------------------------------------


def _random_states(augment: Augment, device: torch.device) -> list[dict]:
    """Every random state of this process, gathered from all ranks (rank order)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    local = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "augment": augment.get_rng_state(),
    }
    if not dist.is_initialized():
        return [local]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _set_random_states(states: list[dict], rank: int, augment: Augment, device: torch.device) -> None:
    if len(states) != (dist.get_world_size() if dist.is_initialized() else 1):
        warnings.warn(
            f"the run was saved by {len(states)} processes and resumes on another number: it goes on, "
            "but not bit for bit as it would have",
            stacklevel=3,
        )
    local = states[rank % len(states)]
    random.setstate(local["python"])
    numpy_state = dict(local["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(local["torch"])
    if device.type == "cuda" and local["cuda"] is not None:
        torch.cuda.set_rng_state(local["cuda"], device)
    augment.set_rng_state(local["augment"])


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _progress(console):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console or Console(),
    )
    progress.start()
    return progress


def _say(progress, text: str) -> None:
    if progress is not None:
        progress.console.print(text)


def _check_replicas(model: nn.Module, rank: int, metrics_path: Path) -> None:
    """Every rank must end with the same weights: DDP's promise, checked once."""

    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, digest.hexdigest())
    identical = len(set(hashes)) == 1
    if rank == 0:
        _write_json_line(metrics_path, {"final": True, "world_size": len(hashes), "replicas_identical": identical})
    if not identical:
        raise TrainError("the processes ended with different weights: DistributedDataParallel went out of step")


# -- the run directory ----------------------------------------------------------------------


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step_*.pt"))


def _save_checkpoint(run_dir: Path, state: dict, keep: int, best_step: int | None) -> Path:

    path = run_dir / "checkpoints" / f"step_{state['step']:07d}.pt"
    try:
        with atomic_path(path) as temporary:
            torch.save(state, temporary)
    except OSError as error:
        previous = _checkpoints(run_dir)
        survivor = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise TrainError(f"cannot save {path}: {error.strerror or error}{survivor}") from None
    kept = {path.name} | ({f"step_{best_step:07d}.pt"} if best_step is not None else set())
    for old in _checkpoints(run_dir)[:-keep]:
        if old.name not in kept:
            old.unlink()
    return path


def _prepare_run_dir(run_dir: Path, overwrite: bool, clear: bool) -> None:
    """Refuse a directory that holds another run, unless ``overwrite``; ``clear`` removes its files."""
    if (run_dir / "config.json").exists():
        if not overwrite:
            raise TrainError(f"{run_dir} holds a run already: --resume {run_dir} continues it, --overwrite replaces it")
        if not clear:
            return
        for name in RUN_FILES:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def _write_json_line(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def plot_curves(run_dir: Path) -> Path | None:
    """curves.png from metrics.jsonl: training loss, learning rate and eval mAP against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval" in r]
    if not steps:
        return None
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue")
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange")
    axes[1].set(title="learning rate", xlabel="step")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["eval"]["mAP"] for r in evals], "o-", label="model")
        ema = [r for r in evals if r.get("eval_ema")]
        if ema:
            axes[2].plot([r["step"] for r in ema], [r["eval_ema"]["mAP"] for r in ema], "s--", label="EMA")
        axes[2].legend()
    axes[2].set(title="eval mAP", xlabel="step")
    figure.suptitle(run_dir.name)
    path = run_dir / "curves.png"
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path


class _Stop(Exception):
    """Raised between optimiser steps when the run is asked to stop."""


class _StopRequest:
    """Ctrl-C, caught as a request: the run stops after the step under way, so that the
    checkpoint it saves is a state the run really passed through (a resume is exact). A
    second Ctrl-C stops at once, without saving. Under DDP every rank stops at the same step."""

    def __init__(self, after_steps: int | None) -> None:
        self.after_steps, self.asked = after_steps, False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._ask)

    def _ask(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def requested(self, step: int, device: torch.device, agree: bool) -> bool:
        """Whether to stop now; under DDP the ranks compare their Ctrl-Cs where ``agree`` (every
        few steps: each comparison waits for the GPU)."""
        if self.after_steps is not None and step >= self.after_steps:
            return True
        if not dist.is_initialized():
            return self.asked
        if not agree:
            return False
        flag = torch.tensor([float(self.asked)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# -- the run --------------------------------------------------------------------------------


def train(
    recipe: Recipe | str | None = None,
    data: str | os.PathLike | list | None = None,
    eval_data: str | os.PathLike | list | None = None,
    out: str | os.PathLike = "runs/run",
    resume: bool = False,
    overwrite: bool = False,
    trust_code: bool = False,
    console=None,
    stop_after: int | None = None,
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    blacklist: str | os.PathLike | None = None,
    progress=None,
) -> TrainResult:
    """Train the model ``recipe`` names on ``data`` (any source :func:`~dclsify.pipeline.datasets.open_source`
    reads), evaluating on ``eval_data`` every ``train.eval_every`` epochs; results in ``out``.

    ``audio_dir`` and ``classes`` are ``open_source``'s: the folder of a segment CSV's clips,
    a manifest's class list. ``blacklist``: a file of clip ids to leave out of the training data
    (:func:`~dclsify.pipeline.sources.read_blacklist`; the evaluation data is scored whole).
    ``resume=True`` continues the run in ``out`` (its recipe, data and black list are read from
    its ``config.json``; give none of them). Ctrl-C (or ``stop_after=N``
    optimiser steps in total) stops the run after the step under way, saves a checkpoint and
    returns; resume continues exactly. With ``train.teacher`` (a file of
    :func:`~dclsify.pipeline.teacher.score_to_file`) the run distils
    (:func:`~dclsify.pipeline.teacher.distillation_loss`); a training clip missing from that
    file stops it before anything is built. With a dclsify checkpoint as ``model.source`` the run
    fine-tunes it (:func:`resolve_recipe`, :func:`build_model`: its layers and front-end kept unless
    the recipe sets them, its head where the data has its classes; ``train.layer_decay``,
    ``model.freeze``), and says what it kept in its first line and config.json. ``progress``: a started
    ``rich.progress.Progress`` to show the run's bars in, beside others (``dclsify cv``'s bar over its
    runs); by default the run has its own. Returns a :class:`TrainResult`.
    """
    started = time.perf_counter()
    run_dir = Path(out)
    if resume:
        if recipe is not None or data is not None or blacklist is not None:
            raise TrainError(
                "--resume continues a run as it was recorded: give no recipe, --set, --data or --blacklist"
            )
        recorded = _recorded_run(run_dir)
        recipe = _recipe_of(recorded)
        data, eval_data = recorded["data"], recorded["eval_data"]
        audio_dir, classes = recorded.get("audio_dir"), recorded.get("classes")
        blacklist = (recorded.get("blacklist") or {}).get("path")
    else:
        recipe = as_recipe(recipe)
        if data is None:
            raise TrainError("no training data: give --data (HDF5, a segment CSV, a manifest or a dataset folder)")
    recipe = resolve_recipe(recipe)  # a checkpoint's front-end: the data is then read at its sample rate
    skip = read_blacklist(blacklist) if blacklist is not None else None
    if resume and skip is not None and skip.digest != recorded["blacklist"]["sha256"]:
        raise TrainError(
            f"the black list {skip.path} changed since the run started: it would train on other clips; "
            "put the list back as it was to resume"
        )
    t = recipe.train
    rank, world, local_rank = _distributed(t.device)
    plan_batch(t, world)  # a global batch these processes cannot make fails before anything is read
    if not resume:
        _prepare_run_dir(run_dir, overwrite, clear=rank == 0)  # every rank decides alike; one clears
        if world > 1:
            dist.barrier()
    device = _device(t.device, local_rank)
    if t.compile and device.type != "cuda":
        raise TrainError(
            "train.compile is for GPUs: on the CPU, torch 2.11's compiled backward of these models gave wrong "
            "gradients (some zero) in our tests; train eagerly there"
        )
    train_set = open_source(data, recipe.audio, audio_dir, classes, skip)
    eval_set = open_source(eval_data, recipe.audio, audio_dir, classes) if eval_data is not None else None
    if not train_set.class_names:
        raise TrainError(f"{data} has no classes to learn (no labels)")
    check_head_fits(recipe, train_set.multi_label)
    if eval_set is not None:
        check_same_classes(train_set, eval_set)
    teacher = read_teacher(t.teacher, train_set) if t.teacher else None  # a missing clip stops the run here
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    random.seed(t.seed)
    np.random.seed(t.seed)
    model = build_model(recipe, len(train_set.class_names), trust_code=trust_code, class_names=train_set.class_names)
    model = model.to(device)
    fine_tuning = getattr(model, "fine_tuning", None)
    torch.manual_seed(t.seed + rank)  # and each rank its own drop-path masks
    if rank == 0 and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "recipe": recipe.as_dict(),
            "data": _as_text(data),
            "eval_data": _as_text(eval_data),
            "audio_dir": _as_text(audio_dir),
            "classes": _as_text(classes),
            "class_names": train_set.class_names,
            "multi_label": train_set.multi_label,
            "world_size": world,
            "blacklist": None if skip is None else {"sha256": skip.digest, **asdict(train_set.blacklisted)},
            "fine_tuning": None if fine_tuning is None else fine_tuning.as_dict(),
        }
        (run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    with _deterministic(t.deterministic, device):
        return _run(
            recipe,
            model,
            train_set,
            eval_set,
            run_dir,
            device,
            rank,
            world,
            resume,
            console,
            stop_after,
            started,
            teacher,
            progress,
        )


def check_same_classes(train_set: ClipDataset, eval_set: ClipDataset) -> None:
    """Evaluation data must have the training data's classes, the same names in the same order."""
    if eval_set.class_names != train_set.class_names:
        raise TrainError(
            f"the evaluation data's {len(eval_set.class_names)} classes are not the training data's "
            f"{len(train_set.class_names)} (same names in the same order are needed)"
        )


def _as_text(path):
    """A path, or a list of them, as config.json records it."""
    if path is None:
        return None
    return [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path)


def _recorded_run(run_dir: Path) -> dict:
    if not (run_dir / "config.json").is_file():
        raise TrainError(f"{run_dir} holds no run to resume (no config.json)")
    if not _checkpoints(run_dir):
        raise TrainError(f"{run_dir} has no checkpoint to resume from (checkpoints/step_*.pt)")
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TrainError(f"{run_dir / 'config.json'} is damaged ({error})") from None


def _recipe_of(recorded: dict) -> Recipe:
    try:
        values = {section: dict(keys) for section, keys in recorded["recipe"].items()}
        if "accumulate" in values.get("train", {}):  # a run recorded before train.global_batch replaced it
            t = values["train"]
            t["global_batch"] = t["batch_size"] * t.pop("accumulate") * recorded.get("world_size", 1)
        return recipe_from_dict(values, "config.json")
    except (RecipeError, KeyError, AttributeError, TypeError) as error:
        raise TrainError(f"the run's config.json is damaged: {error}") from None


def _run(
    recipe,
    model,
    train_set: ClipDataset,
    eval_set,
    run_dir,
    device,
    rank,
    world,
    resume,
    console,
    stop_after,
    started,
    teacher=None,
    shared_progress=None,
):

    t = recipe.train
    multi_label = train_set.multi_label
    plan = plan_batch(t, world)
    accumulate, global_batch = plan.accumulate, plan.global_batch
    loader = make_loader(
        train_set, t.batch_size, True, t.workers, rank, world, t.seed, device.type == "cuda", t.sampler, t.epoch_clips
    )
    eval_loader = None
    if eval_set is not None:
        eval_loader = make_loader(eval_set, t.batch_size, False, t.workers, rank, world, t.seed, device.type == "cuda")
    steps_per_epoch = epoch_steps(loader, plan, t.epoch_clips or len(train_set))
    total_steps, warmup_steps = t.epochs * steps_per_epoch, round(t.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(recipe.train, model, plan.lr)
    from timm.scheduler import CosineLRScheduler

    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=plan.min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=plan.min_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    ema = None
    if t.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema_decay)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    frontend = LogMel(recipe.audio).to(device)
    augment = Augment(frontend, recipe.augment, seed=t.seed + 1000 * rank)
    step, epoch, step_in_epoch, best_map, best_step = 0, 0, 0, None, None
    window_steps, window_loss = 0, 0.0  # what the next line of metrics.jsonl averages
    window_terms = [0.0, 0.0]  # with a teacher: the loss on the labels and on the teacher's targets
    if resume:
        last = _checkpoints(run_dir)[-1]
        try:
            state = torch.load(last, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
            detail = " ".join(str(error).split())[:200]
            raise TrainError(f"cannot read {last} ({detail}): remove it to resume from the one before") from None
        try:
            model.load_state_dict(state["model"])
            if ema is not None and state["ema"] is not None:
                ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            detail = " ".join(str(error).split())[:300]
            raise TrainError(f"the last checkpoint in {run_dir} does not fit the run's model: {detail}") from None
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        best_map, best_step = state["best_map"], state["best_step"]
        window_steps, window_loss = state["window"]
        window_terms = state.get("window_terms") or window_terms
        _set_random_states(state["random"], rank, augment, device)
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(trained) if t.compile else trained
    failures = FailureLog()
    metrics_path, last_eval, interrupted = run_dir / "metrics.jsonl", None, False
    writer = _tensorboard(run_dir) if rank == 0 else None
    progress = (shared_progress or _progress(console)) if rank == 0 else None
    fine_tuning = getattr(model, "fine_tuning", None)
    for line in (fine_tuning and fine_tuning.describe(), plan.describe(), plan.describe_lr()) if rank == 0 else ():
        if line:
            _say(progress, line)
    if train_set.blacklisted is not None:
        _say(progress, f"training data: {train_set.blacklisted}")
    clips_done, clock = 0, time.perf_counter()
    window_start = time.perf_counter()

    def checkpoint() -> None:
        state = {
            "model": model.state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "best_map": best_map,
            "best_step": best_step,
            "window": (window_steps, float(loss_sum)),
            "window_terms": None if teacher is None else terms_sum.tolist(),
            "random": _random_states(augment, device),
        }
        if rank == 0:
            _save_checkpoint(run_dir, state, t.keep, best_step)

    def evaluate() -> dict:
        nonlocal best_map, best_step, last_eval
        results, unreadable = {}, []
        for name, candidate in (("eval", model), ("eval_ema", None if ema is None else ema.module)):
            if candidate is not None:
                scores, targets, unreadable = score_clips(
                    candidate, eval_loader, frontend, device, t.precision, multi_label
                )
                try:
                    results[name] = metrics(scores, targets, multi_label, train_set.class_names).as_dict()
                except ValueError as error:
                    raise TrainError(f"cannot score the evaluation data: {error}") from None
        set_training(model, recipe.model.freeze)
        if unreadable and rank == 0:
            _say(progress, f"{len(unreadable)} evaluation clips could not be read and were left out")
        if rank == 0:
            better = max(results, key=lambda k: results[k]["mAP"])
            if best_map is None or results[better]["mAP"] > best_map:
                best_map, best_step = results[better]["mAP"], step
                exported = model if better == "eval" else ema.module
                save(exported, run_dir / "best.safetensors", train_set.class_names, recipe.audio, multi_label)
            _write_json_line(metrics_path, {"step": step, "epoch": epoch, **results})
            if writer is not None:
                for name, values in results.items():
                    for key in ("mAP", "mAUC", "d_prime", "accuracy"):
                        if values.get(key) is not None:
                            writer.add_scalar(f"{name}/{key}", values[key], step)
            line = ", ".join(f"{k} {v['mAP']:.4f}" for k, v in results.items())
            _say(progress, f"epoch {epoch} step {step}: mAP {line}" + (" (best)" if best_step == step else ""))
            plot_curves(run_dir)
        last_eval = results
        return results

    set_training(model, recipe.model.freeze)
    loss_sum = torch.full((), window_loss, device=device)
    terms_sum = torch.tensor(window_terms, dtype=loss_sum.dtype, device=device)
    if teacher is not None and rank == 0:
        _say(
            progress,
            f"distilling from {teacher.path} ({len(teacher.checkpoints)} model(s)): loss = {1 - t.kd_weight:g} x "
            f"labels + {t.kd_weight:g} x teacher (sigmoid or softmax of its logits / {t.kd_temperature:g})",
        )
    stop = _StopRequest(stop_after)
    try:
        while epoch < t.epochs:
            loader.sampler.set_epoch(epoch, start=step_in_epoch * t.batch_size * accumulate)
            task = (
                progress.add_task(
                    f"epoch {epoch + 1}/{t.epochs}",
                    total=steps_per_epoch,
                    completed=step_in_epoch,
                    status="",
                )
                if progress
                else None
            )
            batches = iter(loader)
            while step_in_epoch < steps_per_epoch:
                for micro in range(accumulate):
                    batch = next(batches)
                    failures.record(batch.failures)
                    if teacher is None:
                        x, y = augment(
                            batch.waveforms.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
                        )
                    else:
                        taught = teacher_targets(
                            teacher.logits_for(batch.indices).to(device, non_blocking=True),
                            t.kd_temperature,
                            multi_label,
                        )
                        x, y, taught = augment(
                            batch.waveforms.to(device, non_blocking=True),
                            batch.targets.to(device, non_blocking=True),
                            taught,
                        )
                    # DDP averages gradients at the last micro-batch's backward only
                    with trained.no_sync() if world > 1 and micro < accumulate - 1 else nullcontext():
                        with autocast(device, t.precision):
                            logits = forward(x).float()
                        if teacher is None:
                            loss = (
                                F.binary_cross_entropy_with_logits(logits, y)
                                if multi_label
                                else F.cross_entropy(logits, y)
                            ) / accumulate
                        else:
                            loss, on_labels, on_teacher = distillation_loss(logits, y, taught, t.kd_weight, multi_label)
                            loss = loss / accumulate
                            terms_sum += torch.stack([on_labels, on_teacher]).detach() / accumulate
                        (scaler.scale(loss) if scaler else loss).backward()
                    loss_sum += loss.detach()
                if t.clip_grad:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if recipe.model.clamp:
                    clamp_positions(model)
                if ema is not None:
                    ema.update(model, step=step)
                step += 1
                step_in_epoch += 1
                scheduler.step_update(step)
                clips_done += global_batch
                window_steps += 1
                if step % t.log_every == 0 or step_in_epoch == steps_per_epoch:
                    mean_loss = float(loss_sum) / window_steps
                    if world > 1:
                        summed = torch.tensor([mean_loss], device=device)
                        dist.all_reduce(summed)
                        mean_loss = float(summed) / world
                    loss_sum.zero_()
                    terms = {}
                    if teacher is not None:
                        mean_terms = terms_sum / window_steps
                        if world > 1:
                            dist.all_reduce(mean_terms)
                            mean_terms /= world
                        terms = dict(zip(("loss_labels", "loss_teacher"), mean_terms.tolist(), strict=True))
                        terms_sum.zero_()
                    rate = window_steps * global_batch / (time.perf_counter() - window_start)
                    window_steps, window_start = 0, time.perf_counter()
                    current_lr = optimizer.param_groups[0]["lr"]
                    if rank == 0:
                        _write_json_line(
                            metrics_path,
                            {
                                "step": step,
                                "epoch": epoch,
                                "loss": mean_loss,
                                **terms,
                                "lr": current_lr,
                                "clips_per_second": rate,
                            },
                        )
                        if writer is not None:
                            writer.add_scalar("train/loss", mean_loss, step)
                            for name, value in terms.items():
                                writer.add_scalar(f"train/{name}", value, step)
                            writer.add_scalar("train/lr", current_lr, step)
                        if progress:
                            shown = f"{mean_loss:.4f}"
                            if terms:
                                shown += f" (labels {terms['loss_labels']:.4f}, teacher {terms['loss_teacher']:.4f})"
                            status = f"loss {shown}  lr {current_lr:.2e}  {rate:.1f} clips/s"
                            progress.update(task, status=status)
                if progress:
                    progress.update(task, completed=step_in_epoch)
                if step % t.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                    checkpoint()
                if stop.requested(step, device, agree=step % t.log_every == 0):
                    raise _Stop
            epoch, step_in_epoch = epoch + 1, 0
            if progress:
                progress.remove_task(task)
            if eval_loader is not None and (epoch % t.eval_every == 0 or epoch == t.epochs):
                try:
                    evaluate()
                except BaseException:
                    checkpoint()  # the epoch's training is kept, whatever befell its evaluation
                    raise
            checkpoint()
            window_start = time.perf_counter()  # the next rate is of training alone
    except _Stop:
        interrupted = True
        checkpoint()
        _say(
            progress,
            f"stopped at step {step}: a checkpoint is saved; continue with `dclsify train --resume {run_dir}`",
        )
    finally:
        stop.close()
        if progress and progress is not shared_progress:
            progress.stop()
        if writer is not None:
            writer.close()
    if world > 1:
        _check_replicas(model, rank, metrics_path)
    if rank == 0 and metrics_path.exists():
        plot_curves(run_dir)
    if rank == 0 and not interrupted:
        save(model, run_dir / "last.safetensors", train_set.class_names, recipe.audio, multi_label)
    seconds = time.perf_counter() - started
    best = run_dir / "best.safetensors"
    return TrainResult(
        run_dir,
        step,
        best_map,
        best if best.exists() else None,
        last_eval,
        seconds,
        clips_done / max(time.perf_counter() - clock, 1e-9),
        interrupted,
        dict(failures.failures),
    )
