"""Pictures: what the model sees (one clip's waveform and log-mel, before and after augmentation),
and a sound's timeline (its log-mel, the frame scores of its top classes and their events)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import torch

from ..surgery.audio import AudioConfig
from ..surgery.files import atomic_path
from .augment import Augment, AugmentConfig
from .events import Event
from .frontend import LogMel, as_float
from .sources import ClipDataset, to_clip


def show_clip(dataset: ClipDataset, index: int, output: str | os.PathLike, seed: int = 0) -> Path:
    """Draw clip ``index`` of ``dataset`` to a PNG: its waveform and normalised log-mel as
    loaded, and after one draw of the training augmentations (roll, speed perturbation and
    random erasing each applied, so that each can be seen; mixup needs a second clip and is
    not shown). The title gives the clip's name and label names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0 <= index < len(dataset):
        raise IndexError(f"clip {index} does not exist: the data has {len(dataset)} clips (0 to {len(dataset) - 1})")
    waveform, target, _, failures = dataset[index]
    if failures:
        raise ValueError(f"clip {index} cannot be read: {failures[0][0]} ({failures[0][1]})")
    audio = dataset.audio
    frontend = LogMel(audio)
    everything = AugmentConfig(speed_p=1, erase_p=1, mixup_alpha=0, label_smoothing=0)
    augment = Augment(frontend, everything, seed=seed)
    with torch.no_grad():
        clean = as_float(waveform[None])
        moved = augment.waveforms(waveform[None])
        views = [
            ("as loaded", clean[0], frontend(clean)[0, 0]),
            (
                "augmented: roll, speed, erasing",
                moved[0],
                frontend.from_power(augment.spectrograms(frontend.power(moved)))[0, 0],
            ),
        ]
    labels = [dataset.class_names[i] for i in torch.nonzero(target).flatten().tolist()]
    figure, axes = plt.subplots(2, 2, figsize=(13, 6.5), height_ratios=[1, 2.2], sharex=True, layout="constrained")
    seconds = torch.arange(audio.samples) / audio.sample_rate
    for column, (title, samples, logmel) in enumerate(views):
        top, bottom = axes[0, column], axes[1, column]
        top.plot(seconds.numpy(), samples.numpy(), linewidth=0.4, color="tab:blue")
        top.set_ylim(-1.05, 1.05)
        top.set_title(title)
        top.set_ylabel("amplitude")
        image = bottom.imshow(
            logmel.numpy(), origin="lower", aspect="auto", cmap="magma", extent=(0, audio.seconds, 0, audio.n_mels)
        )
        bottom.set_xlabel("time (s)")
        bottom.set_ylabel(f"mel bin ({audio.f_min:g}-{audio.top_frequency:g} Hz)")
        figure.colorbar(image, ax=bottom, label="normalised log-mel")
    heading = f"{dataset.clip_name(index)}  -  {', '.join(labels) or 'no label'}"
    figure.suptitle(textwrap.shorten(heading, 140))
    output = Path(output)
    with atomic_path(output) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    return output


def draw_timeline(
    mono: np.ndarray,
    audio: AudioConfig,
    frames,
    events: list[Event],
    output: str | os.PathLike,
    classes: int = 5,
    threshold: np.ndarray | None = None,
) -> Path:
    """Draw a sound's timeline to a PNG: its log-mel (``mono``: float at ``audio.sample_rate``), beneath it
    the frame scores (a :class:`~dclsify.pipeline.predict.Frames`) of its top ``classes`` classes (those
    with events first, by their best event, then by their best frame score), and beneath those their
    ``events`` as bars with their scores. ``threshold`` (one per class) is drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_event: dict[str, float] = {}
    for event in events:
        best_event[event.label] = max(best_event.get(event.label, 0.0), event.score)
    peak = frames.scores.max(1)
    order = sorted(
        range(len(frames.class_names)),
        key=lambda c: (-best_event.get(frames.class_names[c], -1.0), -peak[c]),
    )[:classes]
    with torch.no_grad():
        logmel = LogMel(audio)(torch.from_numpy(to_clip(mono, len(mono)))[None])[0, 0].numpy()
    seconds = len(mono) / audio.sample_rate
    figure, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(13, 7.5), height_ratios=[2, 1.6, 0.25 * len(order) + 0.6], sharex=True, layout="constrained"
    )
    top.imshow(logmel, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, audio.n_mels))
    top.set_ylabel("mel bin")
    top.set_title(textwrap.shorten(f"{frames.source}  -  {len(events)} events", 140))
    colours = plt.get_cmap("tab10")
    for row, c in enumerate(order):
        colour = colours(row % 10)
        middle.step(
            frames.times, frames.scores[c], where="post", color=colour, linewidth=1.2, label=frames.class_names[c]
        )
        if threshold is not None and np.ptp(threshold) > 0:  # thresholds per class: each in its colour
            middle.axhline(threshold[c], color=colour, linestyle="--", linewidth=0.7)
        mine = [e for e in events if e.label == frames.class_names[c]]
        bottom.broken_barh([(e.onset, e.offset - e.onset) for e in mine], (row - 0.4, 0.8), color=colour)
        for event in mine:
            bottom.text(event.onset, row, f" {event.score:.2f}", va="center", fontsize=7, color="white")
    if threshold is not None and np.ptp(threshold) == 0:
        middle.axhline(threshold[0], color="grey", linestyle="--", linewidth=0.8, label="threshold")
    middle.set_ylim(-0.02, 1.02)
    middle.set_ylabel("frame score")
    middle.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: the scores stay visible
    bottom.set_yticks(range(len(order)), [textwrap.shorten(frames.class_names[c], 28) for c in order])
    bottom.set_ylim(len(order) - 0.5, -0.5)
    bottom.set_xlim(0, seconds)
    bottom.set_xlabel("time (s)")
    bottom.set_title("events", fontsize=9, loc="left")
    output = Path(output)
    with atomic_path(output) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    return output
