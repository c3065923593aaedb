"""ConvMixer (timm ``convmixer.py``): the patch conv is replaced, its GELU/ReLU and BatchNorm stay."""

from .registry import Family, register, replace_stem_conv

FAMILY = register(
    Family(
        name="convmixer",
        model_classes=("ConvMixer",),
        examples=("convmixer_768_32", "convmixer_1024_20_ks9_p14"),
        replace_stem=replace_stem_conv("stem.0"),
        stem_note="stem.0 conv replaced, activation and BatchNorm kept",
    )
)
