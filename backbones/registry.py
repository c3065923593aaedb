"""The family registry: timm model classes, their example names and their stem surgery."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """A timm model family.

    ``model_classes`` are the timm classes it covers (matched by class name);
    ``examples`` are timm model names known to work, smallest first;
    ``replace_stem(model, conv_factory)`` swaps the part of the stem that
    downsamples for ``conv_factory(out_channels)`` and returns the replaced
    module's qualified name.
    """

    name: str
    model_classes: tuple[str, ...]
    examples: tuple[str, ...]
    replace_stem: Callable[[nn.Module, Callable[[int], nn.Conv2d]], str]
    stem_note: str


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(model: nn.Module) -> Family | None:
    """The registered family of a timm model, or None."""
    name = type(model).__name__
    return next((f for f in FAMILIES.values() if name in f.model_classes), None)


def replace_stem_conv(path: str) -> Callable[[nn.Module, Callable[[int], nn.Conv2d]], str]:
    """Stem surgery that replaces only the conv at ``path`` and keeps what follows it
    (a norm, an activation)."""

    def replace(model: nn.Module, conv_factory: Callable[[int], nn.Conv2d]) -> str:
        old = model.get_submodule(path)
        model.set_submodule(path, conv_factory(old.out_channels))
        return path

    return replace
