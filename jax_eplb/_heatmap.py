"""Heatmap PNG of per-layer, per-rank load before and after a plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jax_eplb._atomic import atomic_path


def save_heatmap(path: Path, before: np.ndarray, after: np.ndarray, layer_ids,
                 after_title: str = "with EPLB plan") -> None:
    """``before``/``after``: ``[L, R]`` rank load / mean rank load (summed over the window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(layer_ids) + 2), sharey=True)
    vmax = max(before.max(), after.max())
    for ax, data, title in ((axes[0], before, "without EPLB"), (axes[1], after, after_title)):
        image = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{title}\n(summed load) max/mean - 1 = {np.mean(data.max(1) - 1):.3f}")
        ax.set_xlabel("EP rank")
    axes[0].set_yticks(range(len(layer_ids)), [str(i) for i in layer_ids])
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes, label="rank load / mean")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
