"""Evaluation metrics of an audio tagger: mAP, mAUC, d-prime and top-1 accuracy, per class to CSV.

Average precision and ROC AUC are scikit-learn's (``average_precision_score``,
``roc_auc_score``), computed class by class; this module only decides which classes
count and averages them, as the paper's evaluation does (``../shared/NOTES.md`` section 6).
"""

from __future__ import annotations

import csv
import io
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..surgery.audio import AudioConfig
from ..surgery.checkpoint import load
from ..surgery.files import atomic_path
from .datasets import open_source
from .frontend import LogMel
from .loader import make_loader
from .sources import BlacklistReport, DataError, numbered_classes


@dataclass
class Metrics:
    """The scores of one evaluation.

    ``mAP``: mean of the per-class average precision over the classes with at least one
    positive clip. ``mAUC``: mean of the per-class ROC AUC over the classes with both
    positive and negative clips; ``d_prime`` is derived from the same classes. ``accuracy``:
    top-1 accuracy for a single-label set, None for a multi-label one. ``per_class``:
    ``(class name, AP, positives)`` for every class, AP None where the class has no positive.
    """

    mAP: float
    mAUC: float
    d_prime: float
    accuracy: float | None
    clips: int
    classes: int
    classes_without_positives: int  # left out of mAP, mAUC and d-prime
    classes_without_negatives: int  # left out of mAUC and d-prime (their AP is 1 and counts)
    per_class: list[tuple[str, float | None, int]] = field(repr=False)

    unreadable: list[tuple[str, str]] = field(default_factory=list, repr=False)  # clips left out: (path, reason)
    blacklisted: BlacklistReport | None = field(default=None, repr=False)  # clips a black list left out

    def as_dict(self, per_class: bool = False) -> dict:
        """The scalar metrics as a plain dict for JSON (an infinite d-prime as null); with
        ``per_class``, the per-class list too."""
        data = asdict(self)
        data["unreadable"] = len(self.unreadable)
        if self.blacklisted is None:
            del data["blacklisted"]
        if not per_class:
            del data["per_class"]
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}


def metrics(scores, targets, multi_label: bool = True, class_names: list[str] | None = None) -> Metrics:
    """Score ``scores`` (N clips x C classes, float) against ``targets`` (N x C, bool).

    ``scores`` may be probabilities or logits: AP and AUC depend only on how the clips rank
    within each class, and the sigmoid keeps that order, so logits and their sigmoid give the
    same metrics (in exact arithmetic: float32 sigmoids of large logits tie at 1.0, so logits
    rank more finely); top-1 accuracy takes each row's argmax, the same for logits and their softmax.

    - ``mAP``: scikit-learn's ``average_precision_score(targets[:, c], scores[:, c])`` for each
      class ``c`` with at least one positive, averaged. Classes without a positive clip have
      no defined AP; they are left out and counted in ``classes_without_positives``
      (scikit-learn 1.9 would warn and score them 0, pulling its macro average down).
      With every class present, the result equals ``average_precision_score(targets, scores,
      average="macro")``.
    - ``mAUC``: the mean of ``roc_auc_score`` per class over the classes with both positive
      and negative clips (AUC is undefined otherwise).
    - ``d_prime``: ``sqrt(2) * mean over those classes of scipy.stats.norm.ppf(AUC_c)``, as the
      paper's code computes it (the mean of the per-class d-primes, not the d-prime of
      ``mAUC``). A class with AUC exactly 1 (or 0) makes it +inf (or -inf); both kinds, nan.
    - ``accuracy``: with ``multi_label=False``, the fraction of clips whose highest score is
      their one true class (each row of ``targets`` must hold exactly one True); else None.

    The averages are nan when no class qualifies. Raises ValueError for mismatched shapes,
    non-finite scores or (single-label) rows without exactly one label.
    """
    from scipy.stats import norm
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (clips, classes)")
    clips, classes = scores.shape
    if clips == 0:
        raise ValueError("no clips to evaluate")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite (nan or inf)")
    if class_names is None:
        class_names = numbered_classes(classes)
    if len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names for {classes} score columns")

    positives = targets.sum(axis=0)
    with_positives = np.flatnonzero(positives > 0)
    with_both = np.flatnonzero((positives > 0) & (positives < clips))
    ap = np.full(classes, np.nan)
    for c in with_positives:
        ap[c] = average_precision_score(targets[:, c], scores[:, c])
    auc = np.array([roc_auc_score(targets[:, c], scores[:, c]) for c in with_both])

    accuracy = None
    if not multi_label:
        labels_per_clip = targets.sum(axis=1)
        if (labels_per_clip != 1).any():
            bad = int(np.flatnonzero(labels_per_clip != 1)[0])
            raise ValueError(
                f"single-label accuracy needs exactly one label per clip; clip {bad} has {int(labels_per_clip[bad])}"
            )
        accuracy = float((scores.argmax(axis=1) == targets.argmax(axis=1)).mean())

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else math.nan

    with np.errstate(invalid="ignore"):  # AUCs of 1 and 0 together: +inf and -inf make nan, said above
        d_prime_mean = mean(norm.ppf(auc))

    return Metrics(
        mAP=mean(ap[with_positives]),
        mAUC=mean(auc),
        d_prime=math.sqrt(2) * d_prime_mean,
        accuracy=accuracy,
        clips=clips,
        classes=classes,
        classes_without_positives=int(classes - len(with_positives)),
        classes_without_negatives=int((positives == clips).sum()),
        per_class=[
            (name, None if math.isnan(ap[c]) else float(ap[c]), int(positives[c])) for c, name in enumerate(class_names)
        ],
    )


def write_per_class_csv(metrics: Metrics, path: str | os.PathLike) -> None:
    """Write ``class,ap,positives`` (one row per class; ``ap`` empty for a class without
    positives) to ``path``, atomically: a reader never sees a half-written file."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "ap", "positives"])
    for name, ap, positives in metrics.per_class:
        writer.writerow([name, "" if ap is None else repr(ap), positives])
    with atomic_path(path) as temporary:
        temporary.write_text(text.getvalue())


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name: fp32 (none), bf16 or fp16."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def fp32_logits(model, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Logits computed in fp32 whatever ``precision``: bf16 logits keep 8 bits of mantissa, so
    many scores tie, which lowers average precision. The body runs at ``precision`` and the head
    in fp32 where the model has timm's ``forward_features``/``forward_head``; otherwise all in fp32."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return model(x).float()
    with autocast(device, precision):
        features = model.forward_features(x)
    return model.forward_head(features.float()).float()


def score_clips(model, loader, frontend, device, precision, multi_label):
    """Scores (sigmoid, or softmax for single-label models) of fp32 logits (:func:`fp32_logits`)
    and targets of every readable clip of the loader, in dataset order, and the clips that
    could not be read (left out, not stood in for); under DDP gathered from all ranks, each
    clip exactly once."""
    model.eval()
    indices, scores, targets, unreadable = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            waveforms = batch.waveforms.to(device, non_blocking=True)
            logits = fp32_logits(model, frontend(waveforms), device, precision)
            read = ~batch.replaced.numpy()
            scores.append((torch.sigmoid(logits) if multi_label else logits.softmax(-1)).cpu().numpy()[read])
            targets.append(batch.targets.numpy()[read])
            indices.append(batch.indices.numpy()[read])
            unreadable += batch.failures
    parts = [(np.concatenate(indices), np.concatenate(scores), np.concatenate(targets), unreadable)] if indices else []
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, parts)
        parts = [part for rank_parts in gathered for part in rank_parts]
    order_index = np.concatenate([p[0] for p in parts])
    if len(np.unique(order_index)) != len(order_index):
        raise RuntimeError("evaluation saw a clip twice: the evaluation sampler is wrong")
    order = np.argsort(order_index)
    unreadable = sorted({failure for p in parts for failure in p[3]})
    return np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order], unreadable


def evaluate(
    checkpoint: str | os.PathLike,
    data,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    trust_code: bool = False,
    audio_dir: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    per_class: str | os.PathLike | None = None,
    blacklist: str | os.PathLike | None = None,
) -> Metrics:
    """Metrics of a dclsify checkpoint on ``data`` (any source :func:`~dclsify.pipeline.datasets.open_source`
    reads), heard as the model was trained: the clip format, the log-mel settings and sigmoid or softmax scores
    come from the checkpoint. Clips that cannot be read are left out and listed in
    ``Metrics.unreadable``; ``audio_dir`` and ``classes`` are ``open_source``'s. ``per_class``,
    when given, is a CSV file to write each class's AP to (:func:`write_per_class_csv`). ``blacklist``:
    a file of clip ids (:func:`~dclsify.pipeline.sources.read_blacklist`) whose clips are left out
    and counted in ``Metrics.blacklisted``."""
    device = torch.device(device)
    model = load(checkpoint, device=device, trust_code=trust_code)
    audio = model.audio or AudioConfig()
    dataset = open_source(data, audio, audio_dir, classes, blacklist)
    names = model.class_names
    if names is not None and names != dataset.class_names:
        raise DataError(
            f"{checkpoint} was trained on {len(names)} classes and the data has {len(dataset.class_names)}"
            + (" (the same number, other names or order)" if len(names) == len(dataset.class_names) else "")
        )
    head = model.dclsify.config.num_classes
    if head is not None and head != len(dataset.class_names):
        raise DataError(f"{checkpoint} scores {head} classes and the data has {len(dataset.class_names)}")
    multi_label = model.multi_label if model.multi_label is not None else dataset.multi_label  # as it was trained
    loader = make_loader(dataset, batch_size, train=False, workers=workers, pin_memory=device.type == "cuda")
    scores, targets, unreadable = score_clips(model, loader, LogMel(audio).to(device), device, precision, multi_label)
    try:
        result = metrics(scores, targets, multi_label, dataset.class_names)
    except ValueError as error:
        raise DataError(f"cannot score {data}: {error}") from None
    result.unreadable, result.blacklisted = unreadable, dataset.blacklisted
    if per_class is not None:
        write_per_class_csv(result, per_class)
    return result
