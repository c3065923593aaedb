"""ConvFormer and CAFormer (timm ``metaformer.py``): the stem conv is replaced, its norm stays."""

from .registry import Family, register, replace_stem_conv

FAMILY = register(
    Family(
        name="metaformer",
        model_classes=("MetaFormer",),
        examples=("convformer_s18", "caformer_s18", "convformer_s36"),
        replace_stem=replace_stem_conv("stem.conv"),
        stem_note="stem.conv replaced (no bias, as DCLS-Audio), stem.norm kept",
        stem_bias=False,
    )
)
