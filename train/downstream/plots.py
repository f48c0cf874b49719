"""Result figures (matplotlib Agg, written atomically): fine-tuning curves, confusion matrix, ShapeNetPart IoU
bars. Scores are in percent; figures are saved with a tight bounding box so no title is clipped."""

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
        ax_score.plot([h["epoch"] + 1 for h in voted], [h["vote_score"] for h in voted], marker=".",
                      label="test, voted")
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
