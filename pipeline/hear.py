"""The HEAR 2021 API (https://hearbenchmark.com/hear-api.html) over a dclsify checkpoint, as ``dclsify.hear``.

``load_model(path)`` gives a torch module with ``sample_rate`` (a HEAR rate, see :func:`hear_rate`),
``scene_embedding_size`` and ``timestamp_embedding_size`` (both the input size of the head's last
linear layer); ``get_scene_embeddings(audio, model)`` gives (sounds, scene_embedding_size) clip
embeddings and ``get_timestamp_embeddings(audio, model)`` (sounds, timestamps,
timestamp_embedding_size) frame embeddings with their times (sounds, timestamps) in milliseconds,
for ``audio`` (sounds, samples) float32 in [-1, 1] at ``model.sample_rate``. They are
:meth:`~dclsify.pipeline.predict.Tagger.embed`'s, each sound on its own: a batch gives what each of
its sounds gives alone.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

from .predict import Tagger

HEAR_RATES = (16000, 22050, 44100, 48000)  # the rates the HEAR tasks come at (the validator takes no other)


def hear_rate(model_rate: int) -> int:
    """The HEAR rate to take audio at for a model trained at ``model_rate``: the lowest that loses nothing
    (32 kHz: 44.1 kHz), or 48 kHz; the audio is resampled to the model's rate as any waveform is."""
    return next((rate for rate in HEAR_RATES if rate >= model_rate), HEAR_RATES[-1])


class HearModel(nn.Module):
    """A :class:`~dclsify.pipeline.predict.Tagger` as the module the HEAR API passes around.

    ``timestamp_step`` is the time between timestamps in seconds (default: the front-end's hop)."""

    def __init__(self, tagger: Tagger, timestamp_step: float | None = None) -> None:
        super().__init__()
        self.tagger = tagger
        self.model, self.frontend = tagger.model, tagger.frontend  # submodules: .to(device) moves them
        self.sample_rate = hear_rate(tagger.audio.sample_rate)
        self.scene_embedding_size = self.timestamp_embedding_size = tagger.embedding_size
        self.timestamp_step = timestamp_step
        self.eval()  # as the model inside it: an embedding module, never trained here

    def _apply(self, fn, recurse=True):  # .to(device) / .cuda(): the tagger follows the model
        result = super()._apply(fn, recurse)
        self.tagger.device = next(self.model.parameters()).device
        return result


def load_model(model_file_path: str | os.PathLike = "", device: str = "cpu", trust_code: bool = False) -> HearModel:
    """A dclsify checkpoint (``.safetensors``) as a HEAR model, on ``device``."""
    if not model_file_path:
        raise ValueError("dclsify.hear.load_model needs the path of a dclsify checkpoint")
    return HearModel(Tagger(model_file_path, device=device, trust_code=trust_code))


def _sounds(audio: Tensor, model: HearModel) -> Tensor:
    if audio.ndim != 2:
        raise ValueError(f"audio must be (sounds, samples), got {tuple(audio.shape)}")
    return audio.detach().float().cpu()


def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """(sounds, samples) float audio at ``model.sample_rate`` -> (sounds, scene_embedding_size) float32."""
    sounds = _sounds(audio, model)
    rows = [model.tagger.embed(sound, model.sample_rate) for sound in sounds]
    empty = np.zeros((0, model.scene_embedding_size), np.float32)
    return torch.from_numpy(np.stack(rows) if rows else empty).float().to(audio.device)


def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """(sounds, samples) float audio at ``model.sample_rate`` -> (sounds, timestamps, timestamp_embedding_size)
    float32 embeddings and (sounds, timestamps) float32 times in milliseconds, evenly spaced from 0."""
    sounds = _sounds(audio, model)
    embedded = [
        model.tagger.embed(sound, model.sample_rate, frames=True, step=model.timestamp_step) for sound in sounds
    ]
    if not embedded:
        return torch.zeros(0, 0, model.timestamp_embedding_size), torch.zeros(0, 0)
    times = torch.from_numpy(np.stack([t for t, _ in embedded]) * 1000).float()
    embeddings = torch.from_numpy(np.stack([e for _, e in embedded])).float()
    return embeddings.to(audio.device), times.to(audio.device)
