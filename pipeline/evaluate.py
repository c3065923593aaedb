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
from dataclasses import asdict, dataclass, field

import numpy as np


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

    def as_dict(self, per_class: bool = False) -> dict:
        """The scalar metrics as a plain dict (for JSON); with ``per_class``, the per-class list too."""
        data = asdict(self)
        if not per_class:
            del data["per_class"]
        return data


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
      ``mAUC``). A class with AUC exactly 1 (or 0) makes it +inf (or -inf).
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
        class_names = [f"class {i}" for i in range(classes)]
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

    return Metrics(
        mAP=mean(ap[with_positives]),
        mAUC=mean(auc),
        d_prime=math.sqrt(2) * mean(norm.ppf(auc)),
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
    from dclsify.surgery.checkpoint import atomic_path

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "ap", "positives"])
    for name, ap, positives in metrics.per_class:
        writer.writerow([name, "" if ap is None else repr(ap), positives])
    with atomic_path(path) as temporary:
        temporary.write_text(text.getvalue())
