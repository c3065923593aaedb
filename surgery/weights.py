"""Foreign weights onto a dclsify model: each tensor copied where it fits, and a report, by name, of
everything adapted, dropped or left as initialised.

A foreign state dict goes through a family's mapping (timm's own ``checkpoint_filter_fn`` for timm
weights; ours in ``backbones/<family>.py`` for the DCLS-Audio layout) onto our model's keys, then
:func:`load_mapped` copies what fits. :func:`load_timm_weights` is what ``convert(...,
pretrained=FILE)`` and ``dclsify import --model timm:NAME`` load timm (ImageNet) weights with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from timm.layers import resample_patch_embed
from timm.models import adapt_input_conv
from torch import nn

from ..backbones.registry import map_key_by_key
from .files import CheckpointError

STEM_MODES = ("adapt", "init")


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


def mapped_by(filter_fn, state_dict, model: nn.Module, report: ImportReport) -> dict[str, torch.Tensor]:
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
    if stem not in STEM_MODES:
        raise CheckpointError(f"stem must be one of {STEM_MODES}, got {stem!r}")
    timm_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    mapped = dict(state_dict)
    if timm_filter is not None:
        mapped = mapped_by(_whole_or_key_by_key(timm_filter), state_dict, model, report)
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
