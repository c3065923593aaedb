"""What a DCLS model learned: where each stage's kernel elements sit, how wide and how strong.

:func:`kernel_stats` summarises each P/SIG group (a stage, with ``sync="stage"``);
:func:`plot_kernels` draws them as the DCLS papers do: every element of a group as a point
at its learned position, sized by its weight and ringed by its spread, beside the built
kernels of a few channels.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .dcls import SIGMA_FLOOR, Dcls2d


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
    """Draw every P/SIG group of ``model`` to a PNG: a row per group, its elements (all channels
    of its first layer) as points at their positions, sized by |weight|, with a ring of one
    spread, then the built kernels of its first ``channels`` channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    from .checkpoint import atomic_path

    groups = dcls_groups(model)
    if not groups:
        raise ValueError("the model has no Dcls2d layer: nothing to draw (a DSC model, or a baked export?)")
    figure, axes = plt.subplots(
        len(groups),
        1 + channels,
        figsize=(3.1 * (1 + channels), 3.0 * len(groups)),
        squeeze=False,
        layout="constrained",
    )
    for row, members in groups.items():
        name, layer = members[0]
        kh, kw = layer.dilated_kernel_size
        with torch.no_grad():
            x, y = (layer.P[i].detach().float().flatten().numpy() for i in (0, 1))
            weight = layer.weight.detach().float().flatten().abs().numpy()
            kernel = layer.kernel().detach().float()
        ax = axes[row, 0]
        size = 4 + 60 * weight / max(weight.max(), 1e-12)
        if layer.SIG is not None:
            sx, sy = ((layer.SIG[i].detach().abs() + SIGMA_FLOOR).float().flatten().numpy() for i in (0, 1))
            rings = EllipseCollection(
                2 * sx, 2 * sy, 0, units="xy", offsets=list(zip(x, y, strict=True)), offset_transform=ax.transData,
                facecolors="none", edgecolors="tab:orange", linewidths=0.3, alpha=0.25,
            )  # fmt: skip
            ax.add_collection(rings)
        ax.scatter(x, y, s=size, c="tab:blue", alpha=0.5, linewidths=0)
        ax.set(xlim=(-kw / 2, kw / 2), ylim=(-kh / 2, kh / 2), aspect="equal")
        ax.set_title(f"group {row}: {len(members)} layers x {layer.out_channels} ch\n{name}", fontsize=8)
        ax.set_xlabel("position, width (kernel units)", fontsize=7)
        ax.set_ylabel("height", fontsize=7)
        for column in range(channels):
            image_ax = axes[row, 1 + column]
            if column < kernel.shape[0]:
                values = kernel[column, 0].numpy()
                bound = max(abs(values.min()), abs(values.max()), 1e-12)
                image_ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, origin="lower",
                                extent=(-kw / 2, kw / 2, -kh / 2, kh / 2))  # fmt: skip
                image_ax.set_title(f"channel {column}: built {kh}x{kw} kernel", fontsize=8)
            image_ax.set_xticks([])
            image_ax.set_yticks([])
    figure.suptitle(title or "learned DCLS kernels: element positions (size: |weight|, ring: spread)")
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path
