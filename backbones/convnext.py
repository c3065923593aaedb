"""ConvNeXt and ConvNeXt-V2 (timm ``convnext.py``): a patchify conv, then a LayerNorm2d, which stays."""

from .registry import Family, register, replace_stem_conv

FAMILY = register(
    Family(
        name="convnext",
        model_classes=("ConvNeXt",),
        examples=("convnext_atto", "convnext_tiny", "convnext_base", "convnextv2_atto", "convnextv2_tiny"),
        replace_stem=replace_stem_conv("stem.0"),
        stem_note="stem.0 conv replaced, stem.1 LayerNorm2d kept",
    )
)
