"""A picture of what the model sees: one clip's waveform and log-mel, before and after augmentation."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import torch

from ..surgery.files import atomic_path
from .augment import Augment, AugmentConfig
from .frontend import LogMel, as_float
from .sources import ClipDataset


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
