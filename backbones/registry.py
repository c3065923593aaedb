"""The family registry: timm model classes, their example names and their stem surgery."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import timm
from torch import Tensor, nn


@dataclass(frozen=True)
class Family:
    """A timm model family.

    ``model_classes`` are the timm classes it covers (matched by class name);
    ``examples`` are timm model names known to work, smallest first;
    ``replace_stem(model, conv_factory)`` swaps the part of the stem that
    downsamples for ``conv_factory(out_channels, bias)`` and returns the replaced
    module's qualified name; ``stem_bias``, when set, overrides that bias (the
    DCLS-Audio models give ConvFormer and FastViT a bias-free stem conv);
    ``checkpoint_filter_fn(state_dict, model)``, when set, maps a DCLS-Audio checkpoint of
    the family (the paper's released models) onto the keys of our rewritten model;
    ``audio_head(model)``, when set, gives the head of a model with the audio stem what
    DCLS-Audio's head of the family computes differently from timm's; ``model_kwargs`` are
    timm constructor arguments that dclsify builds the family's models with unless told
    otherwise: where DCLS-Audio's training built them otherwise than timm's defaults.
    """

    name: str
    model_classes: tuple[str, ...]
    examples: tuple[str, ...]
    replace_stem: Callable[[nn.Module, Callable[[int, bool], nn.Conv2d]], str]
    stem_note: str
    stem_bias: bool | None = None
    checkpoint_filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None
    audio_head: Callable[[nn.Module], None] | None = None
    model_kwargs: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(model: nn.Module) -> Family | None:
    """The registered family of a timm model, or None."""
    name = type(model).__name__
    return next((f for f in FAMILIES.values() if name in f.model_classes), None)


def family_of_name(name: str) -> Family | None:
    """The registered family of a timm model name, without building the model: the family whose
    model class is defined in the module that registers the name."""
    module = sys.modules[timm.models.model_entrypoint(name).__module__]

    def defined_there(cls: str) -> bool:
        return getattr(getattr(module, cls, None), "__module__", None) == module.__name__

    return next((family for family in FAMILIES.values() if any(map(defined_there, family.model_classes))), None)


def replace_stem_conv(path: str) -> Callable[[nn.Module, Callable[[int, bool], nn.Conv2d]], str]:
    """Stem surgery that replaces only the conv at ``path`` (keeping its width and bias)
    and keeps what follows it (a norm, an activation)."""

    def replace(model: nn.Module, conv_factory: Callable[[int, bool], nn.Conv2d]) -> str:
        old = model.get_submodule(path)
        model.set_submodule(path, conv_factory(old.out_channels, old.bias is not None))
        return path

    return replace


def map_key_by_key(filter_fn, state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A timm ``checkpoint_filter_fn`` that renames each key on its own, given one key at a
    time: a key it cannot place (it looks the name up in the model, or reshapes to the
    model's shape) keeps its name, for the import to report, instead of ending the import."""
    mapped = {}
    for key, tensor in state_dict.items():
        try:
            mapped.update(filter_fn({key: tensor}, model))
        except (KeyError, RuntimeError):
            mapped[key] = tensor
    return mapped
