"""The head of a trained model applied at each time position of its last feature map (frame-wise output).

The last feature map is pooled over frequency only, leaving one vector per time position; the
classifier head runs on each. Every family the project rewrites pools globally by averaging, then
has an optional norm over channels (LayerNorm), an optional hidden MLP, and a last linear layer:

* ConvMixer, StarNet, FastViT (avg pool -> fc): the head is linear after its pooling, so the mean
  over positions of the frame logits is the clip logit (exactly, up to float rounding).
* ConvNeXt, EdgeNeXt, RDNet (avg pool -> LayerNorm -> fc): each frame is normalised with the
  statistics of the clip's pooled vector (the norm made affine around the clip), so the mean over
  positions of the frame logits is again the clip logit.
* MetaFormer (ConvFormer, CAFormer) and MambaOut (avg pool -> LayerNorm -> fc1 -> act -> LayerNorm
  -> fc2): the first norm as above, then the MLP on each frame. The MLP is not linear, so the mean
  of the frame logits is close to the clip logit, not equal; a frame equal to the clip's pooled
  vector gets the clip logit.

An embedding is the input of the last linear layer: what the classifier sees (the normalised pooled
features, or the MLP's hidden layer where the head has one). ``fc(embedding)`` is the logit, for the
clip and for each frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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


@dataclass
class FrameOutputs:
    """What a batch of spectrograms gives, per clip and per time position of the last feature map:
    logits (batch, [positions,] classes) and embeddings (batch, [positions,] embedding_size)."""

    frame_logits: Tensor
    clip_logits: Tensor
    frame_embeddings: Tensor
    clip_embeddings: Tensor


def _normalise_like_clip(norm: nn.Module, pooled: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
    """``pooled`` (batch, channels) through ``norm``, and ``frames`` (batch, positions, channels) through
    the same affine map: each clip's frames with the mean and variance of its pooled vector."""
    mean = pooled.mean(-1, keepdim=True)
    scale = torch.rsqrt(pooled.var(-1, unbiased=False, keepdim=True) + norm.eps)
    weight = 1.0 if norm.weight is None else norm.weight
    bias = 0.0 if norm.bias is None else norm.bias
    clip = (pooled - mean) * scale * weight + bias
    return clip, (frames - mean[:, None]) * scale[:, None] * weight + bias


def frame_outputs(model: nn.Module, spectrograms: Tensor, parts: HeadParts | None = None) -> FrameOutputs:
    """The model's clip and frame logits and embeddings for (batch, 1, mels, frames) spectrograms.

    ``clip_logits`` are the model's own output (computed from the same pooled features)."""
    parts = parts or head_parts(model)
    features = model.forward_features(spectrograms).float()
    if parts.channels_last:
        features = features.permute(0, 3, 1, 2)
    frames = features.mean(2).transpose(1, 2)  # (batch, positions, channels): pooled over frequency only
    pooled = frames.mean(1)  # the head's global average pool
    if parts.norm is not None:
        pooled, frames = _normalise_like_clip(parts.norm, pooled, frames)
    clip_embeddings, frame_embeddings = parts.hidden(pooled), parts.hidden(frames)
    return FrameOutputs(parts.fc(frame_embeddings), parts.fc(clip_embeddings), frame_embeddings, clip_embeddings)
