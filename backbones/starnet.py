"""StarNet (timm ``starnet.py``): the stem's ConvBN keeps its BatchNorm and ReLU6."""

from .registry import Family, register, replace_stem_conv

FAMILY = register(
    Family(
        name="starnet",
        model_classes=("StarNet",),
        examples=("starnet_s1", "starnet_s4"),
        replace_stem=replace_stem_conv("stem.0.conv"),
        stem_note="stem.0.conv replaced, its BatchNorm and ReLU6 kept",
    )
)
