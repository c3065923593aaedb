"""Knowledge distillation: a teacher's logits for every clip of a training set, and the loss that learns from them.

:func:`score_to_file` scores each clip of a training set, as loaded and without augmentation,
with one trained model or the mean logits of several, into an HDF5 file keyed by clip name
(``dclsify logits``). :func:`read_teacher` maps a training set's clips onto the rows of such a
file once, before training starts, and :func:`distillation_loss` is what a training step
then minimises::

    loss = (1 - kd_weight) x BCE(logits, labels) + kd_weight x BCE(logits, sigmoid(teacher / T))

(softmax cross-entropy for single-label data), the teacher's targets mixed by the same mixup
as the labels. The file::

    names      clips        the clip names, as the data source reports them (clip_name), UTF-8
    logits     clips x C    float32: the mean over the checkpoints of their fp32 logits
    replaced   clips        bool: the clip could not be read; its row holds the logits of the
                            clip that stands in for it in training (the next readable one)
    attributes class_names (JSON), multi_label, checkpoints (JSON: the paths as given),
               checkpoint_sha256 (JSON), clip_names_sha256, data (JSON), sample_rate,
               clip_seconds, precision, clips, done (rows written), dclsify_version

It is written to ``OUT.partial`` in commits (the rows, then ``done``), so the same call
after an interruption continues from the last commit; only a complete file is renamed to ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._version import __version__
from ..surgery.audio import AudioConfig
from ..surgery.checkpoint import load
from .datasets import open_source
from .evaluate import autocast
from .frontend import LogMel
from .loader import make_loader
from .sources import ClipDataset, DataError, open_hdf5

COMMIT_SECONDS = 5.0
PRECISIONS = ("fp32", "bf16", "fp16")
SHOWN_MISSING = 5  # clip names a missing-clip error lists


class TeacherError(DataError):
    """Teacher checkpoints or a teacher file that cannot be used; the message says why and what to do."""


@dataclass
class LogitsReport:
    output: Path
    clips: int
    classes: int
    checkpoints: list[str]
    resumed_from: int = 0  # clips scored by an earlier, interrupted run
    replaced: list[str] = field(default_factory=list)  # names of the clips that could not be read
    seconds: float = 0.0  # this run's time

    @property
    def clips_per_second(self) -> float:
        return (self.clips - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Teacher:
    """A teacher file mapped onto a training set: ``rows[i]`` is the file's row of the set's clip ``i``."""

    path: Path
    logits: np.ndarray  # (file rows, classes) float32, memory-mapped where the file allows
    rows: np.ndarray  # (training clips,) int64
    checkpoints: list[str]

    def logits_for(self, indices: Tensor) -> Tensor:
        """The teacher's float32 logits of the training set's clips ``indices`` (a batch's), on the CPU."""
        return torch.from_numpy(np.asarray(self.logits[self.rows[indices.numpy()]], dtype=np.float32))


# -- the loss -------------------------------------------------------------------------------


def teacher_targets(logits: Tensor, temperature: float, multi_label: bool) -> Tensor:
    """Soft targets from a teacher's logits: ``sigmoid(logits / T)`` (``softmax`` for single-label data)."""
    scaled = logits.float() / temperature
    return torch.sigmoid(scaled) if multi_label else scaled.softmax(-1)


def distillation_loss(
    logits: Tensor, targets: Tensor, taught: Tensor, kd_weight: float, multi_label: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, label term, teacher term)``: ``loss = (1 - kd_weight) x label term + kd_weight x teacher term``.

    Both terms are the training loss of ``logits`` against soft targets: BCE for multi-label
    data, softmax cross-entropy for single-label data; ``targets`` are the (smoothed, mixed)
    labels and ``taught`` the (mixed) :func:`teacher_targets`. The student's logits are not
    divided by the temperature, and the teacher term is not scaled by ``T^2`` (Hinton's
    softmax KD does both): the issue's formula softens only the teacher's targets, so
    ``kd_weight`` alone sets the balance of the two terms at every temperature.
    """
    loss = F.binary_cross_entropy_with_logits if multi_label else F.cross_entropy
    labels, teacher = loss(logits, targets), loss(logits, taught)
    return (1 - kd_weight) * labels + kd_weight * teacher, labels, teacher


# -- scoring a training set -----------------------------------------------------------------


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def names_digest(names: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()


def _load_teachers(checkpoints: Sequence[str | os.PathLike], device, trust_code: bool):
    """The checkpoints as models in eval mode, with what they must agree on: class names, scores, clip format."""
    if not checkpoints:
        raise TeacherError("no checkpoint to score with")
    models = [load(path, device=device, trust_code=trust_code).eval() for path in checkpoints]
    first, reference = models[0], Path(checkpoints[0])
    for path, model in zip(checkpoints[1:], models[1:], strict=True):
        if (
            model.class_names != first.class_names
            or model.dclsify.config.num_classes != first.dclsify.config.num_classes
        ):
            raise TeacherError(f"{path} and {reference} score different classes: their logits cannot be averaged")
        if model.multi_label != first.multi_label:
            raise TeacherError(
                f"{path} and {reference} differ in sigmoid (multi-label) or softmax scores: their logits do not average"
            )
        audio, first_audio = model.audio or AudioConfig(), first.audio or AudioConfig()
        if (audio.sample_rate, audio.samples) != (first_audio.sample_rate, first_audio.samples):
            raise TeacherError(
                f"{path} hears clips of {audio.seconds:g} s at {audio.sample_rate} Hz and {reference} of "
                f"{first_audio.seconds:g} s at {first_audio.sample_rate} Hz: score them separately"
            )
    return models


def _check_classes(checkpoint, model, dataset: ClipDataset, data) -> None:
    names, head = model.class_names, model.dclsify.config.num_classes
    if names is not None and names != dataset.class_names:
        same_count = " (the same number, other names or order)" if len(names) == len(dataset.class_names) else ""
        raise TeacherError(
            f"{checkpoint} was trained on {len(names)} classes and {data} has {len(dataset.class_names)}{same_count}"
        )
    if head is not None and head != len(dataset.class_names):
        raise TeacherError(f"{checkpoint} scores {head} classes and {data} has {len(dataset.class_names)}")


def _identity(checkpoints, digests, names, dataset, audio, precision, multi_label, data) -> dict:
    """What a partial file records of its making; a continuation must match it."""
    return dict(
        checkpoints=json.dumps([str(p) for p in checkpoints]),
        checkpoint_sha256=json.dumps(digests),
        clip_names_sha256=names_digest(names),
        class_names=json.dumps(dataset.class_names),
        multi_label=multi_label,
        data=json.dumps([str(p) for p in data] if isinstance(data, (list, tuple)) else str(data)),
        sample_rate=audio.sample_rate,
        clip_seconds=audio.seconds,
        precision=precision,
        clips=len(names),
        dclsify_version=__version__,
    )


def _differences(recorded, identity: dict) -> list[str]:
    """How a partial file's making differs from this call's, in words (empty: the same)."""
    differences = []
    if recorded.get("checkpoint_sha256") != identity["checkpoint_sha256"]:
        differences.append(f"other checkpoints ({', '.join(json.loads(recorded.get('checkpoints', '[]')))})")
    if any(recorded.get(key) != identity[key] for key in ("data", "clip_names_sha256", "clips")):
        data = json.loads(recorded.get("data", "null"))
        differences.append(f"other data ({recorded.get('clips')} clips of {data})")
    if recorded.get("class_names") != identity["class_names"]:
        differences.append("other classes")
    for key in ("precision", "sample_rate", "clip_seconds"):
        if recorded.get(key) != identity[key]:
            differences.append(f"{key} {recorded.get(key)}")
    return differences


def _open_partial(partial: Path, identity: dict, names: list[str], classes: int):
    """The partial file to continue (its identity checked), or a new one."""
    import h5py

    if partial.exists():
        try:
            handle = h5py.File(partial, "r+")
        except OSError:
            handle = None  # damaged by a hard kill mid-write: nothing in it can be trusted
        if handle is not None:
            differences = _differences(handle.attrs, identity)
            if not differences:
                return handle
            handle.close()
            raise TeacherError(
                f"{partial} was begun with {', '.join(differences)}: give the same checkpoints and data to "
                "continue it, or --overwrite to start again"
            )
        partial.unlink()
    handle = h5py.File(partial, "w")
    handle.create_dataset("names", data=names, dtype=h5py.string_dtype())
    # contiguous and uncompressed: a reader memory-maps it, and resumed writes land in place
    handle.create_dataset("logits", (len(names), classes), dtype=np.float32)
    handle.create_dataset("replaced", (len(names),), dtype=bool)
    handle.attrs.update(**identity, done=0)
    handle.flush()
    return handle


def score_to_file(
    checkpoints: Sequence[str | os.PathLike],
    data,
    output: str | os.PathLike,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    trust_code: bool = False,
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> LogitsReport:
    """Score every clip of ``data`` (any source :func:`~dclsify.pipeline.datasets.open_source` reads,
    as ``dclsify train --data`` takes it) with the mean logits of ``checkpoints`` into ``output``,
    an HDF5 file keyed by clip name (the module's docstring describes it), for ``train.teacher``.

    The clips are heard as the checkpoints were trained (their clip format and log-mel settings;
    several checkpoints must agree on the clip format, the classes and sigmoid or softmax scores,
    and on the data's classes), in eval mode, without augmentation; ``precision`` is the
    autocast of the forward pass (the logits are stored as float32 whatever it is). Each
    checkpoint's logits are averaged, not its probabilities. ``progress(done, total)`` is
    called after every batch. Interrupted (an exception or Ctrl-C), the work committed so far
    stays in ``OUT.partial`` and the same call continues it; a partial file begun with other
    checkpoints or data is refused, unless ``overwrite``, which also replaces an existing
    ``output`` (otherwise refused). Returns a :class:`LogitsReport`.
    """
    started = time.perf_counter()
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    if precision not in PRECISIONS:
        raise TeacherError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if output.is_dir():
        raise TeacherError(f"cannot write {output}: it is a folder")
    if output.exists() and not overwrite:
        raise TeacherError(f"{output} exists already: remove it, or give --overwrite to score again")
    device = torch.device(device)
    checkpoints = [Path(p) for p in checkpoints]
    models = _load_teachers(checkpoints, device, trust_code)
    audio = models[0].audio or AudioConfig()
    dataset = open_source(data, audio, audio_dir, classes)
    for path, model in zip(checkpoints, models, strict=True):
        _check_classes(path, model, dataset, data)
    multi_label = models[0].multi_label if models[0].multi_label is not None else dataset.multi_label
    names = [dataset.clip_name(i) for i in range(len(dataset))]
    identity = _identity(
        checkpoints, [file_digest(p) for p in checkpoints], names, dataset, audio, precision, multi_label, data
    )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            partial.unlink(missing_ok=True)
        handle = _open_partial(partial, identity, names, len(dataset.class_names))
    except OSError as error:
        raise TeacherError(f"cannot write {partial}: {error.strerror or error}") from None
    frontends = [LogMel(model.audio or AudioConfig()).to(device) for model in models]
    done = int(handle.attrs["done"])
    report = LogitsReport(output, len(dataset), len(dataset.class_names), [str(p) for p in checkpoints], done)

    def commit() -> None:
        handle.flush()  # the rows first, then the count that vouches for them
        handle.attrs["done"] = done
        handle.flush()

    try:
        loader = make_loader(dataset, batch_size, train=False, workers=workers, pin_memory=device.type == "cuda")
        loader.sampler.set_epoch(0, start=done)
        last_commit = time.monotonic()
        with torch.no_grad():
            for batch in loader:
                waveforms = batch.waveforms.to(device, non_blocking=True)
                total = None
                for model, frontend in zip(models, frontends, strict=True):
                    with autocast(device, precision):
                        logits = model(frontend(waveforms)).float()
                    total = logits if total is None else total + logits
                mean = (total / len(models)).cpu().numpy()
                if not np.isfinite(mean).all():
                    raise TeacherError(
                        f"the logits of {dataset.clip_path(int(batch.indices[0]))} and its batch are not finite "
                        f"(nan or inf){'; score in fp32' if precision != 'fp32' else ''}"
                    )
                handle["logits"][done : done + len(mean)] = mean
                handle["replaced"][done : done + len(mean)] = batch.replaced.numpy()
                done += len(mean)
                if time.monotonic() - last_commit > COMMIT_SECONDS:
                    commit()
                    last_commit = time.monotonic()
                if progress is not None:
                    progress(done, len(dataset))
        commit()
    except BaseException:
        try:  # keep what was scored: the same call continues from here
            commit()
        finally:
            handle.close()
        raise
    report.replaced = [names[i] for i in np.flatnonzero(handle["replaced"][:])]
    handle.close()
    os.replace(partial, output)
    report.seconds = time.perf_counter() - started
    return report


# -- reading a teacher file for training ----------------------------------------------------


def _map_rows(path: Path, file_names: list[str], dataset: ClipDataset) -> np.ndarray:
    """Each training clip's row in the file, by name; the k-th clip of a name takes the k-th row
    of that name (names repeat where a manifest holds files of one name in several folders)."""
    by_name: dict[str, list[int]] = {}
    for row, name in enumerate(file_names):
        by_name.setdefault(name, []).append(row)
    seen: dict[str, int] = {}
    rows = np.empty(len(dataset), dtype=np.int64)
    missing = []
    for index in range(len(dataset)):
        name = dataset.clip_name(index)
        occurrence = seen.get(name, 0)
        seen[name] = occurrence + 1
        candidates = by_name.get(name, ())
        if occurrence < len(candidates):
            rows[index] = candidates[occurrence]
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:SHOWN_MISSING]) + (", ..." if len(missing) > SHOWN_MISSING else "")
        raise TeacherError(
            f"{len(missing)} of the {len(dataset)} training clips are not in the teacher file {path} "
            f"(the first: {shown}): score this training data with `dclsify logits CHECKPOINT --data DATA -o {path}`"
        )
    return rows


def read_teacher(path: str | os.PathLike, dataset: ClipDataset) -> Teacher:
    """The teacher file ``path`` (written by :func:`score_to_file`) mapped onto the training set
    ``dataset``: complete, of the same classes and kind of scores, and holding every clip of the
    set by name, else a :class:`TeacherError` that says which (a missing clip: how many, and the
    first few names). The logits are memory-mapped (read as batches need them) where the file
    stores them contiguously, as :func:`score_to_file` does."""

    path = Path(path)
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        hint = (
            f" ({partial} is an unfinished one: run its `dclsify logits` again to finish it)"
            if partial.exists()
            else ""
        )
        raise TeacherError(f"no such teacher file: {path}{hint}")
    handle = open_hdf5(path, TeacherError)
    with handle:
        if "names" not in handle or "logits" not in handle:
            raise TeacherError(f"{path} is not a teacher file (no names or logits): make one with `dclsify logits`")
        logits_set = handle["logits"]
        clips = len(handle["names"])
        if logits_set.ndim != 2 or logits_set.shape[0] != clips:
            raise TeacherError(f"{path}: logits of shape {logits_set.shape} for {clips} names")
        if int(handle.attrs.get("done", clips)) < clips:
            raise TeacherError(f"{path} is incomplete ({int(handle.attrs['done'])} of {clips} clips scored)")
        class_names = json.loads(handle.attrs.get("class_names", "null"))
        if class_names is not None and class_names != dataset.class_names:
            raise TeacherError(
                f"the teacher file {path} scores {len(class_names)} classes and the training data has "
                f"{len(dataset.class_names)}"
                + (" (other names or order)" if len(class_names) == len(dataset.class_names) else "")
            )
        if logits_set.shape[1] != len(dataset.class_names):
            raise TeacherError(
                f"{path} holds {logits_set.shape[1]} logits a clip; the data has {len(dataset.class_names)} classes"
            )
        multi_label = handle.attrs.get("multi_label")
        if multi_label is not None and bool(multi_label) != dataset.multi_label:
            kinds = {True: "multi-label (sigmoid)", False: "single-label (softmax)"}
            raise TeacherError(
                f"the teacher file {path} holds {kinds[bool(multi_label)]} logits and the training data is "
                f"{kinds[dataset.multi_label]}"
            )
        rows = _map_rows(path, handle["names"].asstr()[:].tolist(), dataset)
        checkpoints = json.loads(handle.attrs.get("checkpoints", "[]"))
        offset = logits_set.id.get_offset()
        mappable = logits_set.chunks is None and logits_set.compression is None and offset is not None
        if mappable and logits_set.dtype == np.dtype("<f4"):
            logits = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=logits_set.shape)
        else:
            logits = logits_set[:].astype(np.float32)
    return Teacher(path, logits, rows, checkpoints)
