"""A timm model's classifier head, split after its global pooling, and the frame-wise head built on it.

Every family the project rewrites pools its last feature map globally by averaging, then has an
optional norm over channels (LayerNorm), an optional hidden MLP and a last linear layer:
:func:`head_parts` finds them. The frame outputs of any model (``dclsify.pipeline.frames``) and the
frame-wise head below both run these parts on each time position of the feature map.

The frame-wise head (a recipe's ``model.head = "frames"``, :func:`attach_frame_head`) trains the
model to score each time position: the last feature map is pooled over frequency only, the model's
own head parts run on each position (the norm normalising each frame by itself), and the frame
probabilities ``p`` are pooled over positions into the clip's, per class:

* ``linear_softmax``: ``sum(p^2) / sum(p)``, each frame weighted by its own probability (Wang,
  Li and Metze's linear softmax pooling), so that a clip's score comes from its active frames;
* ``attention``: weights from a softmax over positions of a linear layer on the frame embeddings
  (one attention logit per class), as PANNs' decision-level attention.

The model's ``forward`` still gives clip logits (the logit of the pooled probability): the loss,
evaluation, inference and export take it as any model. The head is the model's ``frame_head``
(holding only the pooling's own weights) and its ``forward_head``, which calls it; both are rebuilt by
:func:`~dclsify.surgery.checkpoint.load` from the checkpoint's ``frame_head`` metadata.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rewrite import init_new_layer

FRAME_POOLINGS = ("linear_softmax", "attention")


class FrameError(ValueError):
    """A model whose head dclsify cannot apply frame by frame."""


@dataclass
class HeadParts:
    """A classifier head after its global average pooling: ``norm`` (a LayerNorm over channels, or
    None), ``hidden`` (an MLP, or Identity) and the last linear layer ``fc``. ``channels_last``: the
    features come as (batch, height, width, channels) (MambaOut)."""

    channels_last: bool
    norm: nn.Module | None
    hidden: nn.Module
    fc: nn.Linear

    @property
    def exact(self) -> bool:
        """Whether the mean over positions of the frame logits is the clip logit (no MLP after the norm)."""
        return isinstance(self.hidden, nn.Identity)

    @property
    def embedding_size(self) -> int:
        return self.fc.in_features


def _check_average(pool: nn.Module | str) -> None:
    kind = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
    if kind != "avg":
        raise FrameError(f"frame scores need a head that averages over positions; this one pools with {kind!r}")


def _norm_or_none(norm: nn.Module | None) -> nn.Module | None:
    if norm is None or isinstance(norm, nn.Identity):
        return None
    if not isinstance(norm, nn.LayerNorm):  # timm's LayerNorm2d is one; an RMS norm does not centre
        raise FrameError(f"frame scores know heads with a LayerNorm, not a {type(norm).__name__}")
    return norm


def head_parts(model: nn.Module) -> HeadParts:
    """The parts of a timm model's head after its pooling (see the module's doc), or FrameError."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):  # ConvMixer, StarNet: the model pools, the head is one layer
        _check_average(model.global_pool)
        return HeadParts(False, None, nn.Identity(), head)
    if head is not None and hasattr(head, "pool_type") and not hasattr(head, "global_pool"):  # MambaOut's MlpHead
        _check_average(head.pool_type)
        return HeadParts(True, _norm_or_none(head.norm), head.pre_logits, head.fc)
    if head is None or not hasattr(head, "global_pool") or not hasattr(head, "fc"):
        raise FrameError(f"frame scores do not know the head of {type(model).__name__}")
    _check_average(head.global_pool)
    norm, fc = _norm_or_none(getattr(head, "norm", None)), head.fc
    hidden = getattr(head, "pre_logits", None) or nn.Identity()  # NormMlpClassifierHead's optional MLP
    if all(hasattr(fc, name) for name in ("fc1", "act", "norm", "fc2")):  # MetaFormer's MlpHead
        hidden, fc = nn.Sequential(fc.fc1, fc.act, fc.norm), fc.fc2
    if not isinstance(fc, nn.Linear):
        raise FrameError(f"frame scores need a head that ends with a linear layer, not {type(fc).__name__}")
    return HeadParts(False, norm, hidden, fc)


def frames_of(features: Tensor, parts: HeadParts) -> Tensor:
    """The last feature map pooled over frequency only: (batch, positions, channels)."""
    if parts.channels_last:
        features = features.permute(0, 3, 1, 2)
    return features.mean(2).transpose(1, 2)


@dataclass
class FrameHeadOutputs:
    """A frame-wise head's logits (batch, positions, classes), its clip logits (batch, classes) and the
    frame embeddings (batch, positions, embedding_size) its last linear layer saw."""

    frame_logits: Tensor
    clip_logits: Tensor
    frame_embeddings: Tensor


class FrameHead(nn.Module):
    """The frame-wise head's pooling (see the module's doc), the model's ``frame_head``: it runs the
    model's head parts (given at each call, so that a new classifier is the one used) on each time
    position and pools the frame probabilities. It holds only the attention layer, where it has one."""

    def __init__(self, pooling: str, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        if pooling not in FRAME_POOLINGS:
            raise FrameError(f"frame pooling must be one of {', '.join(FRAME_POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        # std-0.02 weights, bias 0: attention logits near 0 at first, so the pooling starts as a plain mean
        self.attention = init_new_layer(nn.Linear(embedding_size, num_classes)) if pooling == "attention" else None

    def forward(self, features: Tensor, parts: HeadParts) -> FrameHeadOutputs:
        frames = frames_of(features, parts)
        if parts.norm is not None:  # each frame normalised by itself, as the head will see it at inference
            norm = parts.norm
            frames = F.layer_norm(frames, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        embeddings = parts.hidden(frames)
        logits = parts.fc(embeddings)
        return FrameHeadOutputs(logits, self.pool(logits, embeddings), embeddings)

    def log_weights(self, frame_logits: Tensor, frame_embeddings: Tensor) -> Tensor:
        """The log of each position's weight in its clip's probability, per class (batch, positions,
        classes): a softmax over positions of log p (linear softmax: weights p / sum p) or of the
        attention logits."""
        if self.attention is None:
            scores = F.logsigmoid(frame_logits.float())
        else:
            scores = self.attention(frame_embeddings).float()
        return scores.log_softmax(1)

    def pool(self, frame_logits: Tensor, frame_embeddings: Tensor) -> Tensor:
        """Clip logits: the logit of ``sum_t w_t p_t``, computed in log space, in float32.

        ``log(sum w p) - log(sum w (1 - p))`` (the weights sum to 1) is the exact logit, from logsigmoids
        that never round to 0 or 1. The plain ``logit(clamp(sum w p, eps, 1 - eps))`` cannot be both exact
        and trainable in float32: 1 - p rounds to 0 below 6e-8, so eps would be about 1e-7, capping logits
        at +-16 and giving no gradient to a clip the model is confidently wrong about."""
        logits = frame_logits.float()
        log_w = self.log_weights(logits, frame_embeddings)
        on, off = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p, log (1 - p)
        return torch.logsumexp(log_w + on, 1) - torch.logsumexp(log_w + off, 1)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}"


def frame_head_of(model: nn.Module) -> FrameHead | None:
    """The model's frame-wise head, or None for a clip head."""
    head = getattr(model, "frame_head", None)
    return head if isinstance(head, FrameHead) else None


def _forward_frame_head(self: nn.Module, features: Tensor, pre_logits: bool = False) -> Tensor:
    """timm's ``forward_head`` of a model with a frame-wise head: the clip logits (``pre_logits``: the
    mean of the frame embeddings, as its clip embedding)."""
    outputs = self.frame_head(features, head_parts(self))
    return outputs.frame_embeddings.mean(1) if pre_logits else outputs.clip_logits


def attach_frame_head(model: nn.Module, pooling: str) -> nn.Module:
    """Give ``model`` (a timm model) a frame-wise head pooling with ``pooling``, in place; one it has is
    replaced (a new attention layer, sized to the classifier it has now). The model's head parts stay
    its own (their weights, their state-dict keys); a head they cannot be found in is a :class:`FrameError`."""
    parts = head_parts(model)
    reference = parts.fc.weight
    head = FrameHead(pooling, parts.embedding_size, parts.fc.out_features)
    model.frame_head = head.to(device=reference.device, dtype=reference.dtype)
    # every timm model's forward is forward_features then forward_head: an instance attribute routes the
    # second through the frame head (deepcopy rebinds it to the copy; torch.jit.trace and torch.export follow it)
    model.forward_head = types.MethodType(_forward_frame_head, model)
    return model


def detach_frame_head(model: nn.Module) -> nn.Module:
    """``model`` with its clip head again: the frame-wise head's pooling removed, in place."""
    if frame_head_of(model) is not None:
        del model.frame_head
        model.__dict__.pop("forward_head", None)
    return model
