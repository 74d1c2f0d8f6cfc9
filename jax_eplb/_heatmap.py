"""Heatmap PNG of per-layer, per-rank load before and after a plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jax_eplb._atomic import atomic_path


def save_heatmap(path: Path, before: np.ndarray, after: np.ndarray, layer_ids, imbalance: tuple[float, float],
                 after_title: str = "with EPLB plan") -> None:
    """``before``/``after``: ``[L, R]`` rank load / mean rank load, summed over the window (the cells).

    ``imbalance``: (before, after) as the report and the console give it - max/mean - 1 per
    iteration, averaged over iterations and layers - so the titles match the printed figures
    (a window's summed load is smoother than its iterations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(layer_ids) + 2.4), sharey=True)
    vmax = max(before.max(), after.max())
    for ax, data, title, value in ((axes[0], before, "without EPLB", imbalance[0]),
                                   (axes[1], after, after_title, imbalance[1])):
        image = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{title}: imbalance {value:.3f}")
        ax.set_xlabel("EP rank")
    fig.suptitle("imbalance: max/mean - 1 of each iteration, averaged (as printed); "
                 "cells: the window's summed load / mean", fontsize=9)
    axes[0].set_yticks(range(len(layer_ids)), [str(i) for i in layer_ids])
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes, label="rank load / mean")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
