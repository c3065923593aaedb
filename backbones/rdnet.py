"""RDNet (timm ``rdnet.py``): a ConvNeXt-style patchify stem; its LayerNorm2d stays."""

from .registry import Family, register, replace_stem_conv

FAMILY = register(
    Family(
        name="rdnet",
        model_classes=("RDNet",),
        examples=("rdnet_tiny",),
        replace_stem=replace_stem_conv("stem.0"),
        stem_note="stem.0 conv replaced, stem.1 LayerNorm2d kept",
    )
)
