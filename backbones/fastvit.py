"""FastViT (timm ``fastvit.py``): the whole MobileOne stem gives way to the single audio conv."""

from timm.models import fastvit as timm_fastvit
from torch import nn

from .registry import Family, register


def replace_stem(model: nn.Module, conv_factory) -> str:
    # The MobileOne stem's width is that of its last block's output.
    out_channels = next(m for m in reversed(list(model.stem.modules())) if isinstance(m, nn.Conv2d)).out_channels
    model.stem = conv_factory(out_channels, False)
    return "stem"


def checkpoint_filter_fn(state_dict, model):
    """DCLS-Audio's FastViT (Apple's ml-fastvit names: one flat ``network.N`` list of stages,
    downsamplings and the ``pe`` pos-embedding; ``rbr_skip``/``rbr_conv``/``rbr_scale``,
    ``lkb_origin``, ``convffn``, ``conv_exp``, ``se.reduce``/``se.expand``, bare
    ``layer_scale*`` tensors) onto timm's names. timm's own filter for ml-fastvit checkpoints
    does it, train-form branches included: the single-conv audio stem ``patch_embed.weight``
    becomes ``stem.weight``, and the Dcls2d's ``weight``/``P``/``SIG`` ride along under
    ``stages.S.blocks.B.mlp.conv.conv`` and, for ``network.6.pe``, ``stages.3.pos_emb.pos_enc``
    (which shares P/SIG with stage 3's blocks there as here)."""
    return timm_fastvit.checkpoint_filter_fn(state_dict, model)


FAMILY = register(
    Family(
        name="fastvit",
        model_classes=("FastVit",),
        examples=("fastvit_t8", "fastvit_sa12", "fastvit_sa24", "fastvit_sa36"),
        replace_stem=replace_stem,
        stem_note="the whole MobileOne stem replaced by one conv (no bias, as DCLS-Audio)",
        checkpoint_filter_fn=checkpoint_filter_fn,
        # DCLS-Audio's main.py gives every model --layer_scale_init_value (default 1e-6) and their
        # FastViT takes it; timm's FastViT starts its layer scales at 1e-5
        model_kwargs={"layer_scale_init_value": 1e-6},
    )
)
