"""Result figures (matplotlib Agg, written atomically): ModelNet40 confusion matrix, ShapeNetPart IoU bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (true class per row) as a heat map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.25 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.set_yticklabels(classes, fontsize=7)
    return _save(fig, path)


def plot_category_iou(per_category: dict[str, float], path: Path, title: str) -> Path:
    """One bar per category: its mean shape IoU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(per_category)), 3.5))
    ax.bar(list(per_category), list(per_category.values()))
    ax.set(ylim=(0.0, 1.0), ylabel="mIoU", title=title)
    ax.tick_params(axis="x", rotation=60)
    return _save(fig, path)
