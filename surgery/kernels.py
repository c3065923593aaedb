"""What a DCLS model learned: where each stage's kernel elements sit, how wide and how strong.

:func:`kernel_stats` summarises each P/SIG group (a stage, with ``sync="stage"``);
:func:`plot_kernels` draws them as the DCLS papers do: every element of a group as a point
at its learned position, sized by its weight and ringed by its spread, beside the built
kernels of a few channels.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load
from .dcls import SIGMA_FLOOR, Dcls2d
from .files import atomic_path


@dataclass
class GroupStats:
    """One P/SIG group: ``layers`` layers of ``channels`` channels, ``count`` elements each."""

    group: int
    first_layer: str
    layers: int
    channels: int
    count: int
    window: int
    position_spread: float  # std of the positions (kernel units), both axes together
    mean_distance: float  # mean distance of an element from the window's centre
    at_edge: float  # share of elements clamped to the window's border
    mean_sigma: float | None  # mean std of an element's Gaussian (|SIG| + 0.27); None for v1
    mean_abs_weight: float  # over every layer of the group

    def as_dict(self) -> dict:
        return asdict(self)


def dcls_groups(model: nn.Module) -> dict[int, list[tuple[str, Dcls2d]]]:
    """The model's Dcls2d layers by shared position tensor, in order: one entry per P/SIG group."""
    groups: dict[int, list[tuple[str, Dcls2d]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Dcls2d):
            groups.setdefault(id(module.P), []).append((name, module))
    return {index: members for index, members in enumerate(groups.values())}


def kernel_stats(model: nn.Module) -> list[GroupStats]:
    """Statistics of the positions, spreads and weights of every P/SIG group of ``model``."""
    stats = []
    for index, members in dcls_groups(model).items():
        name, layer = members[0]
        with torch.no_grad():
            positions = layer.P.detach().float().flatten(1)  # (2, elements)
            half = torch.tensor([layer.dilated_kernel_size[1] // 2, layer.dilated_kernel_size[0] // 2])[:, None]
            sigma = None if layer.SIG is None else float((layer.SIG.detach().abs() + SIGMA_FLOOR).mean())
            weights = torch.cat([m.weight.detach().abs().flatten().float() for _, m in members])
            stats.append(
                GroupStats(
                    group=index,
                    first_layer=name,
                    layers=len(members),
                    channels=layer.out_channels,
                    count=layer.kernel_count,
                    window=max(layer.dilated_kernel_size),
                    position_spread=float(positions.std()),
                    mean_distance=float(positions.norm(dim=0).mean()),
                    at_edge=float((positions.abs() >= half - 1e-3).any(dim=0).float().mean()),
                    mean_sigma=sigma,
                    mean_abs_weight=float(weights.mean()),
                )
            )
    return stats


def plot_kernels(model: nn.Module, path: str | os.PathLike, channels: int = 3, title: str | None = None) -> Path:
    """Draw every P/SIG group of ``model`` to a PNG, a row per group (a stage, with ``sync="stage"``):
    first the elements of every channel of its first layer as points at their learned positions,
    sized by |weight| and ringed by one spread (the std of their Gaussian), in the window's frame;
    then the built kernels of its first ``channels`` channels, on one colour scale per row, each
    with its own elements marked. Axes as on a spectrogram: time (width) across, frequency
    (height) up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection
    from matplotlib.patches import Rectangle

    groups = dcls_groups(model)
    if not groups:
        raise ValueError("the model has no Dcls2d layer: nothing to draw (a DSC model, or a baked export?)")
    figure, axes = plt.subplots(
        len(groups),
        1 + channels,
        figsize=(0.4 + 3.0 * (1 + channels), 0.6 + 3.0 * len(groups)),
        squeeze=False,
        layout="constrained",
    )

    def elements(ax, x, y, sx, sy, size, alpha, ring_alpha, color) -> None:
        if sx is not None:
            ax.add_collection(
                EllipseCollection(
                    2 * sx,
                    2 * sy,
                    0,
                    units="xy",
                    offsets=np.column_stack([x, y]),
                    offset_transform=ax.transData,
                    facecolors="none",
                    edgecolors=color,
                    linewidths=0.5,
                    alpha=ring_alpha,
                )  # fmt: skip
            )
        ax.scatter(x, y, s=size, c=color, alpha=alpha, linewidths=0)

    for row, members in groups.items():
        name, layer = members[0]
        kh, kw = layer.dilated_kernel_size
        extent = (-kw / 2, kw / 2, -kh / 2, kh / 2)  # pixel edges: element offsets from the centre tap
        with torch.no_grad():
            x, y = (layer.P[i].detach().float().reshape(layer.out_channels, -1).numpy() for i in (0, 1))
            weight = layer.weight.detach().float().abs().reshape(layer.out_channels, -1).numpy()
            sx = sy = None
            if layer.SIG is not None:
                sx, sy = ((layer.SIG[i].detach().abs() + SIGMA_FLOOR).float().reshape(layer.out_channels, -1).numpy()
                          for i in (0, 1))  # fmt: skip
            kernel = layer.kernel().detach().float()[:channels, 0].numpy()
        size = 3 + 40 * weight / max(weight.max(), 1e-12)
        ax = axes[row, 0]
        shown = x.size
        elements(
            ax, x.ravel(), y.ravel(), None if sx is None else sx.ravel(), None if sy is None else sy.ravel(),
            size.ravel(), alpha=min(0.8, max(0.1, 200 / shown)), ring_alpha=min(0.5, max(0.02, 20 / shown)),
            color="tab:blue",
        )  # fmt: skip
        ax.add_patch(Rectangle((-(kw // 2), -(kh // 2)), 2 * (kw // 2), 2 * (kh // 2), fill=False, ls="--", lw=0.6))
        ax.set(xlim=extent[:2], ylim=extent[2:], aspect="equal")
        ax.set_title(
            f"{name}\ngroup {row}: {len(members)} layers share these positions\n"
            f"{layer.out_channels} channels x {layer.kernel_count} elements",
            fontsize=8,
        )
        ax.set_xlabel("time offset (width, taps)", fontsize=7)
        ax.set_ylabel("frequency offset (height, taps)", fontsize=7)
        ax.tick_params(labelsize=7)
        bound = max(float(abs(kernel).max()) if kernel.size else 0.0, 1e-12)
        image = None
        for column in range(channels):
            image_ax = axes[row, 1 + column]
            if column >= kernel.shape[0]:
                image_ax.axis("off")
                continue
            image = image_ax.imshow(
                kernel[column], cmap="RdBu_r", vmin=-bound, vmax=bound, origin="lower", extent=extent
            )
            elements(
                image_ax, x[column], y[column], None if sx is None else sx[column], None if sy is None else sy[column],
                size[column], alpha=0.9, ring_alpha=0.6, color="black",
            )  # fmt: skip
            image_ax.set(xlim=extent[:2], ylim=extent[2:])
            image_ax.set_title(f"channel {column}: built {kh}x{kw} kernel", fontsize=8)
            image_ax.tick_params(labelsize=7)
        if image is not None:
            bar = figure.colorbar(image, ax=axes[row, 1:].tolist(), shrink=0.8, pad=0.01)
            bar.set_label("kernel value", fontsize=7)
            bar.ax.tick_params(labelsize=7)
    figure.suptitle(title or "learned DCLS kernels", fontsize=11)
    legend = (
        f"points: kernel elements (area: |weight|; ring: one std of their Gaussian, |SIG| + {SIGMA_FLOOR:g}); "
        "dashed: the window the positions are clamped to"
    )
    figure.supxlabel(textwrap.fill(legend, int(14 * figure.get_figwidth())), fontsize=7)  # laid out, not overlapping
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path


def draw_kernels(
    checkpoint: str | os.PathLike, path: str | os.PathLike, channels: int = 3, trust_code: bool = False
) -> tuple[Path, list[GroupStats]]:
    """What ``dclsify kernels`` does: a checkpoint's learned kernels drawn to ``path``
    (:func:`plot_kernels`), and each group's statistics (:func:`kernel_stats`). A checkpoint
    without Dcls2d layers (a DSC model, a baked export) is a ``ValueError`` naming it."""
    model = load(checkpoint, trust_code=trust_code)
    try:
        drawn = plot_kernels(model, path, channels, title=f"{Path(checkpoint).name}: learned DCLS kernels")
    except ValueError as error:
        raise ValueError(f"{checkpoint}: {error}") from None
    return drawn, kernel_stats(model)
