"""ConvFormer and CAFormer (timm ``metaformer.py``): the stem conv is replaced, its norm stays."""

from timm.models import metaformer as timm_metaformer
from torch import nn

from .registry import Family, map_key_by_key, register, replace_stem_conv

DCLS_AUDIO_HEAD_NORM_EPS = 1e-5  # DCLS-Audio's MLP head has nn.LayerNorm's default eps; timm's port 1e-6


def audio_head(model: nn.Module) -> None:
    """Give the MLP head's norm DCLS-Audio's eps, which shows where the head's hidden
    variance is small: the audio model computes as theirs, saved and loaded alike."""
    head_norm = getattr(model.get_classifier(), "norm", None)
    if isinstance(head_norm, nn.LayerNorm):
        head_norm.eps = DCLS_AUDIO_HEAD_NORM_EPS


def checkpoint_filter_fn(state_dict, model):
    """DCLS-Audio's ConvFormer (the MetaFormer reference code's names: ``downsample_layers.*``,
    ``stages.S.B``, Linear layers, ``norm``, an MLP ``head``) onto timm's names.

    timm's filter for the reference MetaFormer checkpoints renames every key and gives the
    Linear weights their 1x1-conv shape; the Dcls2d's ``weight``/``P``/``SIG`` ride along under
    ``token_mixer.dwconv``, the audio stem's conv under ``stem.conv``.
    """
    return map_key_by_key(timm_metaformer.checkpoint_filter_fn, state_dict, model)


FAMILY = register(
    Family(
        name="metaformer",
        model_classes=("MetaFormer",),
        examples=("convformer_s18", "caformer_s18", "convformer_s36"),
        replace_stem=replace_stem_conv("stem.conv"),
        stem_note="stem.conv replaced (no bias, as DCLS-Audio), stem.norm kept",
        stem_bias=False,
        checkpoint_filter_fn=checkpoint_filter_fn,
        audio_head=audio_head,
    )
)
