"""Result figures (matplotlib Agg, written atomically): fine-tuning curves, confusion matrix, ShapeNetPart IoU
bars, ScanNet per-class IoU bars and a top view of a scene by prediction and by ground truth. Scores are in
percent; figures are saved with a tight bounding box so no title is clipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (true class per row) as a heat map."""
    plt = _pyplot()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.25 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.set_yticklabels(classes, fontsize=7)
    return _save(fig, path)


def plot_category_iou(per_category: dict[str, float], path: Path, title: str) -> Path:
    """One bar per category: its mean shape IoU in percent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(per_category)), 3.5))
    ax.bar(list(per_category), list(per_category.values()))
    ax.set(ylim=(0.0, 100.0), ylabel="mIoU (%)")
    ax.set_title(title, wrap=True)
    ax.tick_params(axis="x", rotation=60)
    return _save(fig, path)


def plot_curves(steps: list[dict[str, Any]], history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss per step and the test score (plain and voted, in percent) after every epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    losses = [r for r in steps if r.get("kind") == "step"]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([r["step"] for r in losses], [r["loss"] for r in losses])
    ax_loss.set(xlabel="step", ylabel="training loss")
    epochs = [h["epoch"] + 1 for h in history]
    ax_score.plot(epochs, [h["score"] for h in history], marker=".", label="test")
    voted = [h for h in history if "vote_score" in h]
    if voted:
        ax_score.plot(
            [h["epoch"] + 1 for h in voted], [h["vote_score"] for h in voted], marker=".", label="test, voted"
        )
    ax_score.set(xlabel="epoch", ylabel="test score (%)")
    ax_score.legend()
    for ax in (ax_loss, ax_score):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return _save(fig, path)


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> Path:
    """One horizontal bar per comparison row (benchmark, metric, init): mean with ± std error bar."""
    plt = _pyplot()
    labels = [f"{r['benchmark']} {r['metric']}\n{r['init']} (n={r['n']})" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.55 * len(rows)))
    ax.barh(range(len(rows)), [r["mean"] for r in rows], xerr=[r["std"] for r in rows], capsize=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="value (%)", title="pkd-train compare: mean ± std over seeds / folds")
    return _save(fig, path)


def class_iou_figure(ious: dict[str, float | None], title: str):
    """Bars of per-class IoUs given in percent ("n/a" where a class has none); the title is broken into lines
    that fit the figure's width, so the layout reserves room for all of them."""
    import textwrap

    plt = _pyplot()
    width = max(6.0, 0.5 * len(ious))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    values = [v if v is not None else 0.0 for v in ious.values()]
    bars = ax.bar(list(ious), values)
    for bar, value in zip(bars, ious.values()):
        label = "n/a" if value is None else f"{value:.0f}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set(ylim=(0.0, 105.0), ylabel="IoU (%)")
    ax.set_title(textwrap.fill(title, width=int(width * 9)))  # ~9 characters per inch at 12 pt
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    return fig


def plot_class_iou(ious: dict[str, float | None], path: Path, title: str) -> Path:
    """Write ``class_iou_figure`` to ``path``."""
    return _save(class_iou_figure(ious, title), path)


def plot_top_view(
    xyz: np.ndarray, pred: np.ndarray, label: np.ndarray, classes: list[str], ignore: int, path: Path, title: str
) -> Path:
    """Two top views of a scene's vertices, coloured by predicted and by true class; vertices whose label
    is ``ignore`` are grey in both (they are not scored) and drawn first, the rest from low to high z."""
    plt = _pyplot()
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
    axes[1].legend(
        handles=handles + [Patch(color=palette[-1], label="not scored")],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
    )
    fig.suptitle(title)
    return _save(fig, path)
