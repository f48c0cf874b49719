"""Result figures (matplotlib Agg, written atomically): ModelNet40 confusion matrix, ShapeNetPart IoU bars,
ScanNet per-class IoU bars and a top view of a scene by prediction and by ground truth."""

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


def class_iou_figure(ious: dict[str, float | None], title: str):
    """Bars of per-class IoU in percent ("n/a" where a class has none); the title is broken into lines that fit
    the figure's width, so the layout reserves room for all of them."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(6.0, 0.5 * len(ious))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    values = [100.0 * v if v is not None else 0.0 for v in ious.values()]
    bars = ax.bar(list(ious), values)
    for bar, value in zip(bars, ious.values()):
        label = "n/a" if value is None else f"{100.0 * value:.0f}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)
    ax.set(ylim=(0.0, 105.0), ylabel="IoU (%)")
    ax.set_title(textwrap.fill(title, width=int(width * 9)))  # ~9 characters per inch at 12 pt
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    return fig


def plot_class_iou(ious: dict[str, float | None], path: Path, title: str) -> Path:
    """Write ``class_iou_figure`` to ``path``."""
    return _save(class_iou_figure(ious, title), path)


def plot_top_view(xyz: np.ndarray, pred: np.ndarray, label: np.ndarray, classes: list[str], ignore: int,
                  path: Path, title: str) -> Path:
    """Two top views of a scene's vertices, coloured by predicted and by true class; vertices whose label
    is ``ignore`` are grey in both (they are not scored) and drawn first, the rest from low to high z."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = np.vstack([plt.get_cmap("tab20")(np.arange(len(classes)) % 20), [[0.8, 0.8, 0.8, 1.0]]])
    scored = label != ignore
    order = np.lexsort((xyz[:, 2], scored))
    size = float(np.clip(3e5 / max(len(xyz), 1), 1.0, 20.0))  # dense scans: small dots; sparse: visible
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, values, name in ((axes[0], pred, "prediction"), (axes[1], label, "ground truth")):
        colour = np.where(scored, values, len(classes))[order]
        ax.scatter(xyz[order, 0], xyz[order, 1], c=palette[colour], s=size, marker=".", linewidths=0)
        ax.set(aspect="equal", title=name, xticks=[], yticks=[])
    present = sorted(set(pred[scored].tolist()) | set(label[scored].tolist()))
    handles = [Patch(color=palette[c], label=classes[c]) for c in present]
    axes[1].legend(handles=handles + [Patch(color=palette[-1], label="not scored")], loc="upper left",
                   bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
