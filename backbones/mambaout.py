"""MambaOut (timm ``mambaout.py``): two strided convs give way to one; the final norm stays.

Its stages work channels-last, so the new stem keeps the old one's layout: conv, then
to (N, H, W, C), then the old ``norm2``.
"""

from torch import nn

from .registry import Family, register


class ChannelsLastStem(nn.Module):
    """A conv whose output goes channels-last into a norm (MambaOut's stem layout)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x):
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


def replace_stem(model: nn.Module, conv_factory) -> str:
    model.stem = ChannelsLastStem(
        conv_factory(model.stem.conv2.out_channels, model.stem.conv2.bias is not None), model.stem.norm2
    )
    return "stem"


FAMILY = register(
    Family(
        name="mambaout",
        model_classes=("MambaOut",),
        examples=("mambaout_femto", "mambaout_tiny"),
        replace_stem=replace_stem,
        stem_note="conv1/norm1/conv2 replaced by one conv, norm2 kept (channels-last)",
    )
)
