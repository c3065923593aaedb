"""FastViT (timm ``fastvit.py``): the whole MobileOne stem gives way to the single audio conv."""

from torch import nn

from .registry import Family, register


def replace_stem(model: nn.Module, conv_factory) -> str:
    # The MobileOne stem's width is that of its last block's output.
    out_channels = next(m for m in reversed(list(model.stem.modules())) if isinstance(m, nn.Conv2d)).out_channels
    model.stem = conv_factory(out_channels, False)
    return "stem"


FAMILY = register(
    Family(
        name="fastvit",
        model_classes=("FastVit",),
        examples=("fastvit_t8", "fastvit_sa12", "fastvit_sa24", "fastvit_sa36"),
        replace_stem=replace_stem,
        stem_note="the whole MobileOne stem replaced by one conv (no bias, as DCLS-Audio)",
    )
)
