"""Per-family knowledge of timm backbones: how to give each an audio stem.

One module per family registers a :class:`Family` (see :mod:`.registry`); the FX
rewriter finds the depthwise convolutions by itself, so a family only says what
cannot be found generically: where its stem is and which of its parts survive.
"""

from . import convmixer, convnext, edgenext, fastvit, mambaout, metaformer, rdnet, starnet  # noqa: F401  (registration)
from .registry import FAMILIES, Family, family_of, family_of_name, replace_stem_conv

__all__ = ["FAMILIES", "Family", "family_of", "family_of_name", "replace_stem_conv"]
