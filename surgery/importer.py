"""Foreign weights into dclsify models: the paper's six released checkpoints and timm's ImageNet weights.

A foreign state dict goes through its family's mapping (``checkpoint_filter_fn`` in
``backbones/<family>.py`` for the DCLS-Audio layout; timm's own filter for timm weights)
onto the keys of our rewritten timm model, then :func:`load_mapped` copies what fits and
writes down, by name, everything it adapted, dropped or left as initialised.
:func:`load_timm_weights` is also what ``convert(..., pretrained=FILE)`` loads timm weights with.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..backbones import family_of
from ..backbones.registry import map_key_by_key
from .checkpoint import CheckpointError, convert, read_state_dict
from .rewrite import RewriteConfig, SurgeryError

STEM_MODES = ("adapt", "init")


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


@dataclass
class ImportReport:
    """What :func:`import_checkpoint` did with each tensor of the file and of the model.

    ``adapted``, ``dropped`` and ``initialised`` hold ``(key, why)`` pairs: file keys for
    ``dropped``, model keys otherwise. ``problems`` are the entries no rule explains (a file
    key with no place in the model, a shape that differs, a model tensor the file lacks):
    ``strict=True`` refuses a file that has any.
    """

    path: str
    model: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    initialised: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


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


def shared_groups(model: nn.Module) -> list[list[str]]:
    """The state-dict keys of each tensor that several layers share (synchronised P/SIG)."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    return [names for names in names_of.values() if len(names) > 1]


def load_mapped(
    model: nn.Module,
    mapped: dict[str, torch.Tensor],
    report: ImportReport,
    expected_new: dict[str, str] | None = None,
    expected_dropped: dict[str, str] | None = None,
) -> None:
    """Copy every tensor of ``mapped`` (already under the model's key names) that fits the
    model, and record the rest in ``report``.

    ``expected_new`` (model key -> why) are tensors the model is meant to start fresh, and
    ``expected_dropped`` (file key -> why) are tensors meant to be left out: both are
    reported, not counted as problems. A tensor shared by several layers of the model must
    be the same under each of their keys in the file; where it is not, the first is kept.
    A file none of whose tensors fit is refused: it holds another model's weights.
    """
    expected_new, expected_dropped = expected_new or {}, expected_dropped or {}
    own = model.state_dict()
    values: dict[str, torch.Tensor] = {}
    for key, tensor in mapped.items():
        if key in expected_dropped:
            report.dropped.append((key, expected_dropped[key]))
        elif key not in own:
            report.problems.append((key, "in the file, but the model has no such tensor"))
        elif tensor.shape != own[key].shape:
            report.problems.append(
                (key, f"shape {tuple(tensor.shape)} in the file, {tuple(own[key].shape)} in the model")
            )
        else:
            values[key] = tensor
    for names in shared_groups(model):
        present = [name for name in names if name in values]
        for name in present[1:]:
            if not torch.equal(values[name], values[present[0]]):
                report.problems.append((name, f"differs from {present[0]}, which this model shares with it"))
                del values[name]
    for key in own:
        if key not in values:
            if key in expected_new:
                report.initialised.append((key, expected_new[key]))
            elif not any(key == problem for problem, _ in report.problems):
                report.problems.append((key, "the model's, missing from the file: left as initialised"))
    with torch.no_grad():
        for key, tensor in values.items():
            own[key].copy_(tensor)  # state_dict() tensors share storage with the model's
    report.loaded = sorted(values)
    if mapped and not values:
        examples = "; ".join(f"{key}: {why}" for key, why in report.problems[:2])
        raise CheckpointError(
            f"{report.path}: none of its tensors fit {report.model} ({examples}): is it another model's file?"
        )


def check_strict(report: ImportReport, strict: bool) -> None:
    """With ``strict``, refuse (one error naming the first few) a file with any tensor no rule explains."""
    if strict and report.problems:
        listed = "; ".join(f"{key}: {why}" for key, why in report.problems[:3])
        more = f" and {len(report.problems) - 3} more" if len(report.problems) > 3 else ""
        count = f"{len(report.problems)} tensor{'s' if len(report.problems) > 1 else ''}"
        raise CheckpointError(f"{report.path}: {count} do not fit {report.model}: {listed}{more}")


def import_paper_checkpoint(state_dict: dict[str, torch.Tensor], paper: PaperModel, report: ImportReport) -> nn.Module:
    """A DCLS-Audio model's weights in our rewritten timm model (kernel 23, count 26,
    positions shared per stage, the (2, 16) stem, 527 classes), through its family's
    ``checkpoint_filter_fn``."""
    model = convert(paper.source, {}, num_classes=PAPER_CLASSES, dcls=paper.dcls)
    family = family_of(model)
    if family is None or family.checkpoint_filter_fn is None:
        raise CheckpointError(f"no mapping of DCLS-Audio checkpoints for {paper.source}")
    load_mapped(model, _mapped(family.checkpoint_filter_fn, state_dict, model, report), report)
    return model


def _mapped(filter_fn, state_dict, model: nn.Module, report: ImportReport) -> dict[str, torch.Tensor]:
    """``filter_fn(state_dict, model)``; a file it cannot map is one error naming the file."""
    try:
        return dict(filter_fn(state_dict, model))
    except Exception as error:  # noqa: BLE001 - the filter's own error, about a layout it does not know
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"{report.path} does not have the layout of {report.model}: {type(error).__name__}: {detail}"
        ) from None


def load_timm_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], report: ImportReport, stem: str = "adapt"
) -> None:
    """Load a timm model's (ImageNet) weights into ``model``, its audio rewrite (made by
    :func:`~dclsify.surgery.checkpoint.convert`), recording in ``report`` what went where.

    timm's own filter maps them (original repositories' layouts included); the RGB stem is
    adapted to the audio stem's input channels (summed over its colours for one) and resized
    to its kernel (``stem="adapt"``) or started afresh (``"init"``); a head of another size
    is dropped for the new one; layers that became Dcls2d start afresh.
    """
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    if stem not in STEM_MODES:
        raise CheckpointError(f"stem must be one of {STEM_MODES}, got {stem!r}")
    timm_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    mapped = _mapped(_whole_or_key_by_key(timm_filter), state_dict, model, report) if timm_filter else dict(state_dict)
    own = model.state_dict()
    expected_new, expected_dropped = {}, {}

    head = _prefix(model, model.get_classifier())
    classes = getattr(model, "num_classes", "?")
    expected_new.update({key: f"the new head ({classes} classes)" for key in own if key.startswith(head)})
    expected_dropped.update({key: "the ImageNet head" for key in _misfits(mapped, own, head)})
    for replacement in model.dclsify.replaced:
        prefix = replacement.name + "."
        expected_new.update({key: "a Dcls2d now: its elements start afresh" for key in _misfits(own, mapped, prefix)})
        dense = f"the dense {_by(replacement.kernel_size)} kernel (now a Dcls2d)"
        expected_dropped.update({key: dense for key in _misfits(mapped, own, prefix)})
    stem_name = model.dclsify.stem
    if stem_name is not None:
        stem_key = f"{stem_name}.weight"
        rgb = mapped.get(stem_key)
        channels = own[stem_key].shape[1] if stem_key in own else None
        # an RGB stem (or one with the model's channels already): other forms start afresh, below
        if stem == "adapt" and channels and rgb is not None and rgb.ndim == 4 and rgb.shape[1] in (3, channels):
            size, how = own[stem_key].shape[-2:], []
            # timm's own adaptations: of the input channels, and of a patch embedding's kernel (FlexiViT's resize)
            if rgb.shape[1] != channels:
                made = "summed over its 3 input channels" if channels == 1 else f"its 3 input channels made {channels}"
                how.append(made)
                mapped[stem_key] = adapt_input_conv(channels, rgb)
            if rgb.shape[-2:] != size:
                how.append(f"resized {_by(rgb.shape[-2:])} -> {_by(size)}")
                mapped[stem_key] = resample_patch_embed(mapped[stem_key], list(size), verbose=False)
            if how:
                report.adapted.append((stem_key, ", ".join(how)))
            for key in mapped:
                if key.startswith(stem_name + ".") and key not in own:
                    expected_dropped[key] = f"the RGB stem's {key.rpartition('.')[2]}: the audio stem has none"
        elif stem == "init" or any(key.startswith(stem_name + ".") for key in mapped):
            # re-initialised on request, or a stem of another form (FastViT's MobileOne stem)
            why = "re-initialised (stem=init)" if stem == "init" else "new: the RGB stem has another form"
            expected_new.update({key: why for key in own if key.startswith(stem_name + ".")})
            expected_dropped.update({key: "the RGB stem" for key in mapped if key.startswith(stem_name + ".")})
    load_mapped(model, mapped, report, expected_new, expected_dropped)


def _whole_or_key_by_key(timm_filter):
    """timm's filter, or where it fails on a file (a layout it does not know: another model's),
    the same filter one key at a time, so that each key it cannot place is reported by name."""

    def filter_fn(state_dict, model):
        try:
            return timm_filter(state_dict, model)
        except Exception:  # noqa: BLE001 - the filter's own error, about a layout it does not know
            return map_key_by_key(timm_filter, state_dict, model)

    return filter_fn


def _misfits(tensors: dict, other: dict, prefix: str) -> list[str]:
    """The keys of ``tensors`` under ``prefix`` that ``other`` lacks or holds in another shape."""
    return [k for k in tensors if k.startswith(prefix) and (k not in other or tensors[k].shape != other[k].shape)]


def _by(size) -> str:
    return "x".join(map(str, size))


def _prefix(model: nn.Module, module: nn.Module) -> str:
    """The state-dict prefix of ``module``'s tensors within ``model``."""
    return next(f"{name}." for name, m in model.named_modules() if m is module)


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

    ``path`` is read tensors-only (:func:`~dclsify.surgery.checkpoint.read_state_dict`: a
    ``.pth`` that needs more than tensors is refused, nothing is unpickled). ``model`` is
    one of :data:`PAPER_MODELS` (found from the file's keys when None) or ``timm:NAME`` for
    a timm model's (ImageNet) weights, which are given the audio stem (``stem``: adapt or
    init), a new head of ``num_classes`` and the rewrite ``rewrite_args`` (kernel, count,
    dcls...). ``strict`` refuses a file with any tensor no rule explains (report.problems).

    A paper model comes back with AudioSet's class names, the paper's front-end settings
    (``model.audio``) and sigmoid scores (``model.multi_label``), as :func:`~dclsify.load` gives them.
    """
    from dclsify.pipeline.frontend import AudioConfig
    from dclsify.pipeline.sources import audioset_classes

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
