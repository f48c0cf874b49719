"""ScanNet detection metric: 3DETR's post-processing and VOC-style AP over axis-aligned 3D boxes (numpy only).

* ``postprocess`` is 3DETR's ``utils/ap_calculator.py`` ``parse_predictions`` with the evaluation settings of its
  ``main.py`` (``remove_empty_box``, ``use_3d_nms``, ``nms_iou`` 0.25, ``cls_nms``, ``per_class_proposal``,
  ``conf_thresh`` 0.05, ``use_old_type_nms`` False): boxes holding fewer than 5 of the scene's points are dropped,
  then same-class 3D NMS on the objectness score (``utils/nms.py`` ``nms_3d_faster_samecls``, IoU by volumes
  without the old +1), and every kept box is proposed once per class with score p(class) · p(object), if
  p(object) > ``conf_thresh``.
* ``average_precision`` is VoteNet's / 3DETR's ``utils/eval_det.py`` ``eval_det_cls``: per class, detections of
  all scenes sorted by score, each compared with the ground-truth box of its scene of highest IoU; a true
  positive when that IoU exceeds the threshold (``ovmax > ovthresh``) and the box is not matched yet, else a
  false positive. AP is the area under the monotone precision envelope over all recall points (``voc_ap``,
  ``use_07_metric=False``). Classes without ground truth in the split are ``None`` and left out of the mean
  (3DETR would count them as 0 AP; on ScanNet val every class has ground truth, so the means agree).
* ``predictions.json`` (``predictions_json``, ``read_predictions``): the post-processed boxes of every scene in the
  axis-aligned frame, metres, so anyone can rescore a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pkd.common.errors import DataError

Boxes = dict[str, dict[str, np.ndarray]]  # scene -> {"boxes" (K, 6), "scores" (K,), "labels" (K,)}
THRESHOLDS = {"map25": 0.25, "map50": 0.5}


@dataclass(frozen=True)
class PostprocessSettings:
    """3DETR's evaluation ``ap_config_dict`` (``main.py``)."""

    remove_empty_box: bool = True
    min_points: int = 5
    nms_iou: float = 0.25
    conf_thresh: float = 0.05


def box_iou_3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of axis-aligned boxes [xmin, ymin, zmin, xmax, ymax, zmax]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 6), np.asarray(b, np.float64).reshape(-1, 6)
    low = np.maximum(a[:, None, :3], b[None, :, :3])
    high = np.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = np.clip(high - low, 0, None).prod(-1)
    vol_a, vol_b = (a[:, 3:] - a[:, :3]).prod(-1), (b[:, 3:] - b[:, :3]).prod(-1)
    union = vol_a[:, None] + vol_b[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms_3d(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | None, iou: float) -> np.ndarray:
    """Indices kept by greedy 3D NMS (highest score first); with ``classes`` only boxes of one class suppress
    each other (``nms_3d_faster_samecls``)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    overlap = box_iou_3d(boxes, boxes)
    same = np.ones_like(overlap, dtype=bool) if classes is None else classes[:, None] == classes[None]
    kept: list[int] = []
    alive = np.ones(len(order), dtype=bool)
    for i in order:
        if not alive[i]:
            continue
        kept.append(int(i))
        alive &= ~((overlap[i] > iou) & same[i])
    return np.asarray(kept, dtype=np.int64)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(K,) number of ``points`` (N, 3) inside each box."""
    inside = (points[None, :, :] >= boxes[:, None, :3]) & (points[None, :, :] <= boxes[:, None, 3:])
    return inside.all(-1).sum(-1)


def postprocess(
    boxes: np.ndarray,
    sem_cls_prob: np.ndarray,
    objectness_prob: np.ndarray,
    points: np.ndarray | None = None,
    settings: PostprocessSettings = PostprocessSettings(),
) -> dict[str, np.ndarray]:
    """One scene's final detections from Q query boxes (Q, 6), class probabilities (Q, C) and objectness (Q,)."""
    boxes, sem_cls_prob = np.asarray(boxes, np.float64), np.asarray(sem_cls_prob, np.float64)
    objectness = np.asarray(objectness_prob, np.float64)
    valid = np.ones(len(boxes), dtype=bool)
    if settings.remove_empty_box and points is not None:
        valid &= points_in_boxes(np.asarray(points)[:, :3], boxes) >= settings.min_points
    index = np.flatnonzero(valid)
    kept = index[nms_3d(boxes[index], objectness[index], sem_cls_prob[index].argmax(-1), settings.nms_iou)]
    kept = kept[objectness[kept] > settings.conf_thresh]
    classes = sem_cls_prob.shape[1]
    return {
        "boxes": np.repeat(boxes[kept], classes, axis=0).astype(np.float32),
        "scores": (sem_cls_prob[kept] * objectness[kept, None]).reshape(-1).astype(np.float32),
        "labels": np.tile(np.arange(classes), len(kept)).astype(np.int64),
    }


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the monotone precision envelope over every recall point (VOC 2010+, not 11-point)."""
    rec = np.concatenate([[0.0], recall, [1.0]])
    prec = np.concatenate([[0.0], precision, [0.0]])
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    steps = np.flatnonzero(rec[1:] != rec[:-1])
    return float(((rec[steps + 1] - rec[steps]) * prec[steps + 1]).sum())


def eval_class(
    preds: dict[str, list[tuple[np.ndarray, float]]], gts: dict[str, list[np.ndarray]], iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Recall, precision and AP of one class; AP is None when no scene has ground truth of it."""
    total = sum(len(v) for v in gts.values())
    detections = sorted(((score, scene, box) for scene, p in preds.items() for box, score in p), key=lambda d: -d[0])
    matched = {scene: np.zeros(len(boxes), dtype=bool) for scene, boxes in gts.items()}
    tp = np.zeros(len(detections))
    for i, (_, scene, box) in enumerate(detections):
        truth = gts.get(scene, [])
        if not len(truth):
            continue
        overlaps = box_iou_3d(box[None], np.stack(truth))[0]
        best = int(overlaps.argmax())
        if overlaps[best] > iou_threshold and not matched[scene][best]:
            tp[i], matched[scene][best] = 1, True
    if total == 0:
        return np.zeros(0), np.zeros(0), None
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(1 - tp)
    recall = tp_cum / total
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return recall, precision, voc_ap(recall, precision)


def average_precision(
    predictions: Boxes, ground_truth: dict[str, dict[str, np.ndarray]], class_names: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """mAP@0.25 / mAP@0.5 in percent over the classes with ground truth, per-class AP (None: no ground truth)
    and per-class recall at the last detection."""
    out: dict[str, Any] = {"per_class": {}, "recall": {}}
    for key, threshold in THRESHOLDS.items():
        per_class: dict[str, float | None] = {}
        recall: dict[str, float | None] = {}
        for c, name in enumerate(class_names):
            preds = {
                scene: [(p["boxes"][i], float(p["scores"][i])) for i in np.flatnonzero(p["labels"] == c)]
                for scene, p in predictions.items()
            }
            gts = {scene: list(g["boxes"][g["labels"] == c]) for scene, g in ground_truth.items()}
            rec, _, ap = eval_class(preds, gts, threshold)
            per_class[name] = None if ap is None else 100.0 * ap
            recall[name] = None if ap is None else 100.0 * float(rec[-1] if len(rec) else 0.0)
        scored = [v for v in per_class.values() if v is not None]
        out[key] = float(np.mean(scored)) if scored else 0.0
        out["per_class"][key], out["recall"][key] = per_class, recall
    return out


def predictions_json(predictions: Boxes, class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The ``predictions.json`` content."""
    return {
        "classes": list(class_names),
        "scenes": {
            scene: {
                "boxes": np.asarray(p["boxes"], np.float64).round(5).tolist(),
                "scores": np.asarray(p["scores"], np.float64).round(6).tolist(),
                "labels": np.asarray(p["labels"]).astype(int).tolist(),
            }
            for scene, p in sorted(predictions.items())
        },
    }


def read_predictions(path: Path, class_names: list[str] | tuple[str, ...]) -> Boxes:
    """The predictions of a ``predictions.json``; DataError naming the file and the first bad entry."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} as predictions.json ({exc}).") from exc
    if not isinstance(content, dict) or content.get("classes") != list(class_names):
        raise DataError(f"{path}: 'classes' must be the {len(class_names)} detection classes in order.")
    out: Boxes = {}
    for scene, entry in (content.get("scenes") or {}).items():
        try:
            boxes = np.asarray(entry["boxes"], np.float64).reshape(-1, 6)
            scores, labels = np.asarray(entry["scores"], np.float64), np.asarray(entry["labels"], np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: scene {scene} needs boxes (K×6), scores and labels ({exc}).") from exc
        if not len(boxes) == len(scores) == len(labels):
            raise DataError(
                f"{path}: scene {scene} has {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels."
            )
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise DataError(f"{path}: scene {scene} holds non-finite numbers.")
        if (boxes[:, :3] > boxes[:, 3:]).any():
            raise DataError(f"{path}: scene {scene} has a box whose min exceeds its max.")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"{path}: scene {scene} has a label outside 0–{len(class_names) - 1}.")
        out[scene] = {"boxes": boxes, "scores": scores, "labels": labels}
    return out
