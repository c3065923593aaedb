"""ConvNeXt and ConvNeXt-V2 (timm ``convnext.py``): a patchify conv, then a LayerNorm2d, which stays."""

from timm.models import convnext as timm_convnext

from .registry import Family, map_key_by_key, register, replace_stem_conv


def checkpoint_filter_fn(state_dict, model):
    """DCLS-Audio's ConvNeXt (the original ConvNeXt code's names: ``downsample_layers.*``,
    ``stages.S.B.dwconv``, ``gamma``, ``norm``/``head``) onto timm's names. timm's own filter
    for the original ConvNeXt checkpoints does it: the Dcls2d's ``P``/``SIG``/``weight`` ride
    along under ``conv_dw``, the audio stem's conv under ``stem.0``."""
    return map_key_by_key(timm_convnext.checkpoint_filter_fn, state_dict, model)


FAMILY = register(
    Family(
        name="convnext",
        model_classes=("ConvNeXt",),
        examples=("convnext_atto", "convnext_tiny", "convnext_base", "convnextv2_atto", "convnextv2_tiny"),
        replace_stem=replace_stem_conv("stem.0"),
        stem_note="stem.0 conv replaced, stem.1 LayerNorm2d kept",
        checkpoint_filter_fn=checkpoint_filter_fn,
    )
)
