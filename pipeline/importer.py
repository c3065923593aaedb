"""The paper's six released checkpoints (DCLS-Audio), and timm's ImageNet weights, as dclsify audio taggers.

A paper model's state dict goes through its family's ``checkpoint_filter_fn``
(``backbones/<family>.py``) onto our rewritten timm model, and comes back with what a trained
model carries: AudioSet's class names, the paper's front-end settings and sigmoid scores. timm
weights go through :func:`~dclsify.surgery.weights.load_timm_weights`. Either way
:func:`~dclsify.surgery.weights.load_mapped` copies what fits and reports, by name, the rest.
This sits in the pipeline because a paper model is an audio model: its front-end and its
AudioSet labels come with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbones import family_of
from ..surgery.audio import AudioConfig
from ..surgery.checkpoint import convert, save
from ..surgery.files import CheckpointError, read_state_dict
from ..surgery.rewrite import RewriteConfig, SurgeryError
from ..surgery.weights import STEM_MODES, ImportReport, check_strict, load_mapped, load_timm_weights, mapped_by
from .sources import audioset_classes


@dataclass(frozen=True)
class PaperModel:
    """One of the models released with the paper (DCLS-Audio), and the timm model it becomes.

    ``marker`` is a key only that family's files hold; DCLS files also hold ``.P`` keys."""

    name: str
    source: str
    dcls: bool
    marker: str


PAPER_MODELS = {
    m.name: m
    for m in (
        PaperModel("convnext_audio_tiny", "timm:convnext_tiny", False, "downsample_layers.0.0.weight"),
        PaperModel("convnext_dcls_audio_tiny", "timm:convnext_tiny", True, "downsample_layers.0.0.weight"),
        PaperModel("convformer_audio_s18", "timm:convformer_s18", False, "downsample_layers.0.conv.weight"),
        PaperModel("convformer_dcls_audio_s18", "timm:convformer_s18", True, "downsample_layers.0.conv.weight"),
        PaperModel("fastvit_audio_sa24", "timm:fastvit_sa24", False, "patch_embed.weight"),
        PaperModel("fastvit_dcls_audio_sa24", "timm:fastvit_sa24", True, "patch_embed.weight"),
    )
}
PAPER_CLASSES = 527  # AudioSet


def detect_paper_model(state_dict: dict[str, torch.Tensor]) -> PaperModel | None:
    """Which of the six released models a DCLS-Audio state dict is, from its keys and its stem's
    shape (one input channel, a (2, 16) kernel: not the RGB stem of an ImageNet file of the
    same layout); None if none."""
    dcls = any(key.endswith(".P") for key in state_dict)
    for paper in PAPER_MODELS.values():
        stem = state_dict.get(paper.marker)
        if stem is not None and tuple(stem.shape[1:]) == (1, 2, 16) and paper.dcls == dcls:
            return paper
    return None


def import_paper_checkpoint(state_dict: dict[str, torch.Tensor], paper: PaperModel, report: ImportReport) -> nn.Module:
    """A DCLS-Audio model's weights in our rewritten timm model (kernel 23, count 26,
    positions shared per stage, the (2, 16) stem, 527 classes), through its family's
    ``checkpoint_filter_fn``."""
    model = convert(paper.source, {}, num_classes=PAPER_CLASSES, dcls=paper.dcls)
    family = family_of(model)
    if family is None or family.checkpoint_filter_fn is None:
        raise CheckpointError(f"no mapping of DCLS-Audio checkpoints for {paper.source}")
    load_mapped(model, mapped_by(family.checkpoint_filter_fn, state_dict, model, report), report)
    return model


def import_checkpoint(
    path: str | os.PathLike,
    model: str | None = None,
    strict: bool = False,
    stem: str = "adapt",
    num_classes: int = PAPER_CLASSES,
    **rewrite_args,
) -> nn.Module:
    """A dclsify model holding the weights of a foreign checkpoint, with ``model.imported``,
    an :class:`ImportReport` of what went where.

    ``path`` is read tensors-only (:func:`~dclsify.surgery.files.read_state_dict`: a
    ``.pth`` that needs more than tensors is refused, nothing is unpickled). ``model`` is
    one of :data:`PAPER_MODELS` (found from the file's keys when None) or ``timm:NAME`` for
    a timm model's (ImageNet) weights, which are given the audio stem (``stem``: adapt or
    init), a new head of ``num_classes`` and the rewrite ``rewrite_args`` (kernel, count,
    dcls...). ``strict`` refuses a file with any tensor no rule explains (report.problems).

    A paper model comes back with AudioSet's class names, the paper's front-end settings
    (``model.audio``) and sigmoid scores (``model.multi_label``), as :func:`~dclsify.load` gives them.
    """
    if stem not in STEM_MODES:
        raise CheckpointError(f"stem must be one of {STEM_MODES}, got {stem!r}")
    path = Path(path)
    state_dict = read_state_dict(path)
    if model is None:
        paper = detect_paper_model(state_dict)
        if paper is None:
            raise CheckpointError(
                f"{path} is not one of the paper's released models (no DCLS-Audio keys): name the model with "
                f"--model (one of {', '.join(PAPER_MODELS)}, or timm:NAME for a timm model's weights)"
            )
    elif model in PAPER_MODELS:
        paper = PAPER_MODELS[model]
    elif model.startswith("timm:"):
        paper = None
    else:
        raise CheckpointError(f"unknown model {model!r}: one of {', '.join(PAPER_MODELS)}, or timm:NAME")
    report = ImportReport(str(path), paper.name if paper else model)
    try:
        if paper is not None:
            defaults = RewriteConfig()
            changed = [f"{k}={v!r}" for k, v in rewrite_args.items() if getattr(defaults, k, None) != v]
            changed += [f"stem={stem!r}"] if stem != "adapt" else []
            changed += [f"num_classes={num_classes}"] if num_classes != PAPER_CLASSES else []
            if changed:
                raise CheckpointError(
                    f"{paper.name} is imported as released: {', '.join(changed)} apply to timm weights only"
                )
            result = import_paper_checkpoint(state_dict, paper, report)
            result.class_names = [c.name for c in audioset_classes()]
            result.audio, result.multi_label = AudioConfig(), True
        else:
            result = convert(model, {}, num_classes=num_classes, **rewrite_args)
            load_timm_weights(result, state_dict, report, stem)
            result.class_names = result.audio = result.multi_label = None
    except SurgeryError as error:
        raise CheckpointError(str(error)) from None
    check_strict(report, strict)
    result.dclsify.pretrained = str(path)  # provenance, recorded by save()
    result.imported = report
    return result


def import_to_file(
    path: str | os.PathLike, output: str | os.PathLike, model: str | None = None, **options
) -> nn.Module:
    """:func:`import_checkpoint` (``options``: its ``strict``, ``stem``, ``num_classes`` and rewrite
    arguments), saved to ``output`` as a dclsify checkpoint with what the model carries (class names,
    front-end settings, score type): what ``dclsify import`` does. Returns the imported model."""
    if Path(output).is_dir():
        raise CheckpointError(f"{output} is a folder: name the checkpoint to write")
    imported = import_checkpoint(path, model, **options)
    save(imported, output, imported.class_names, imported.audio, imported.multi_label)
    return imported
