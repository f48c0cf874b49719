"""Downstream metrics, pure numpy: classification accuracies (plain and voted), the ShapeNetPart IoUs, the
scene segmentation IoUs, and the mean ± std of repeated scores. They return fractions; reports convert to percent.

The part-segmentation IoUs follow the protocol every ShapeNetPart paper (PointNet++, Point-MAE) reports:
a shape's IoU is the mean over the parts of its category, a part absent from both prediction and label
counts as 1; instance mIoU averages shapes, class mIoU averages the per-category means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def overall_accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    """Fraction of samples whose prediction equals the label."""
    pred, label = np.asarray(pred), np.asarray(label)
    return float((pred == label).mean()) if label.size else 0.0


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(label, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return matrix


def mean_class_accuracy(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in ``label`` of each class's accuracy (classes never seen are skipped)."""
    matrix = confusion_matrix(pred, label, num_classes)
    seen = matrix.sum(axis=1)
    present = seen > 0
    return float((np.diag(matrix)[present] / seen[present]).mean()) if present.any() else 0.0


def part_ious(pred: np.ndarray, label: np.ndarray, parts: Sequence[int]) -> np.ndarray:
    """IoU of each part in ``parts`` for one shape; a part absent from both pred and label scores 1."""
    pred, label = np.asarray(pred), np.asarray(label)
    ious = np.ones(len(parts))
    for i, part in enumerate(parts):
        union = np.sum((pred == part) | (label == part))
        if union:
            ious[i] = np.sum((pred == part) & (label == part)) / union
    return ious


def shape_iou(pred: np.ndarray, label: np.ndarray, parts: Sequence[int]) -> float:
    """One shape's IoU: the mean of its category's part IoUs."""
    return float(part_ious(pred, label, parts).mean())


def instance_miou(shape_ious: Sequence[float]) -> float:
    """Mean IoU over shapes."""
    return float(np.mean(shape_ious)) if len(shape_ious) else 0.0


def category_mious(shape_ious: Sequence[float], categories: Sequence[str]) -> dict[str, float]:
    """Mean shape IoU per category present (category name → mIoU), in sorted order."""
    ious, cats = np.asarray(shape_ious, dtype=float), np.asarray(categories)
    return {str(c): float(ious[cats == c].mean()) for c in sorted(set(cats.tolist()))}


def class_miou(shape_ious: Sequence[float], categories: Sequence[str]) -> float:
    """Mean over the categories present of their mean shape IoU."""
    per_category = category_mious(shape_ious, categories)
    return float(np.mean(list(per_category.values()))) if per_category else 0.0


def vote_accuracy(logits: np.ndarray, label: np.ndarray) -> float:
    """Accuracy of the mean of (votes, N, classes) logits, as Point-MAE's ``validate_vote`` averages them."""
    return overall_accuracy(np.asarray(logits).mean(axis=0).argmax(axis=-1), label)


def mean_std_best(values: Sequence[float]) -> dict[str, float]:
    """Mean, population standard deviation (ddof 0), best and count of repeated scores (vote passes, folds, seeds)."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std()), "best": float(array.max()), "n": int(array.size)}


def scene_confusion(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """Confusion matrix (row = true class) of the points whose label is not ``ignore``: an ignored point's
    prediction counts nowhere, as in ScanNet's ``evaluate_semantic_label.py``."""
    keep = np.asarray(label) != ignore
    return confusion_matrix(np.asarray(pred)[keep], np.asarray(label)[keep], num_classes)


def class_ious(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU TP / (TP + FP + FN) of a confusion matrix; NaN for a class absent from both labels and
    predictions (it has no IoU)."""
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    return np.divide(tp, union, out=np.full(len(tp), np.nan), where=union > 0)


def mean_iou(ious: np.ndarray) -> float:
    """Mean of the defined per-class IoUs (classes without an IoU are left out); 0 when none is defined."""
    defined = ious[~np.isnan(ious)]
    return float(defined.mean()) if defined.size else 0.0
