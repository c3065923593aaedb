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

A model trained with a frame-wise head (``model.head = "frames"``, :mod:`~dclsify.surgery.heads`) gives
that head's own outputs: each frame normalised by itself, the clip logits its pooling of the frame
probabilities (the model's output), and as clip embedding the mean of the frame embeddings (the head
pools probabilities per class, not embeddings, so ``fc`` of it is not the clip logit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..surgery.heads import FrameError, HeadParts, frame_head_of, frames_of, head_parts

__all__ = ["FrameError", "FrameOutputs", "HeadParts", "frame_outputs", "head_parts"]


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

    ``clip_logits`` are the model's own output (computed from the same pooled features, or by its
    frame-wise head from the same frames)."""
    parts = parts or head_parts(model)
    features = model.forward_features(spectrograms).float()
    frame_head = frame_head_of(model)
    if frame_head is not None:  # trained frame by frame: the head's own frames, and its pooling as the clip's
        out = frame_head(features, parts)
        return FrameOutputs(out.frame_logits, out.clip_logits, out.frame_embeddings, out.frame_embeddings.mean(1))
    frames = frames_of(features, parts)  # (batch, positions, channels): pooled over frequency only
    pooled = frames.mean(1)  # the head's global average pool
    if parts.norm is not None:
        pooled, frames = _normalise_like_clip(parts.norm, pooled, frames)
    clip_embeddings, frame_embeddings = parts.hidden(pooled), parts.hidden(frames)
    return FrameOutputs(parts.fc(frame_embeddings), parts.fc(clip_embeddings), frame_embeddings, clip_embeddings)
