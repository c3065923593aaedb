"""EdgeNeXt (timm ``edgenext.py``): a ConvNeXt-style patchify stem; its LayerNorm2d stays."""

from .registry import Family, register, replace_stem_conv

FAMILY = register(
    Family(
        name="edgenext",
        model_classes=("EdgeNeXt",),
        examples=("edgenext_xx_small", "edgenext_small"),
        replace_stem=replace_stem_conv("stem.0"),
        stem_note="stem.0 conv replaced, stem.1 LayerNorm2d kept",
    )
)
