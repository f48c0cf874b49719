"""ScanNet v2 3D detection metric, pure numpy: 3DETR's post-processing, axis-aligned 3D IoU, VOC AP, mAP@0.25/0.5.

Protocol (3DETR's evaluation, ``engine.evaluate`` with ``APCalculator(exact_eval=True)``, which is VoteNet's):

1. Post-processing per scene (``utils/ap_calculator.py: parse_predictions`` with ``get_ap_config_dict``'s
   defaults, ``remove_empty_box=True``): a box with fewer than 5 of the scene's input points inside (bounds
   inclusive) is dropped; if that drops every box, the one of highest objectness stays. The rest go through
   same-class 3D NMS (``utils/nms.py: nms_3d_faster_samecls``): the class is the argmax of ``sem_cls_prob``,
   the NMS score is ``objectness_prob`` alone, a box is suppressed when its IoU with a kept box of its class
   is > 0.25 (``use_old_type_nms=False``: true IoU). Then ``per_class_proposal``: every kept box with
   objectness > 0.05 becomes one detection per class, scored ``sem_cls_prob[c] * objectness_prob``. The
   threshold comes after NMS, so low-objectness boxes still take part in it.
2. Matching per class over the whole split (``utils/eval_det.py: eval_det_cls``, VoteNet's and py-faster-rcnn's
   ``voc_eval``): detections are sorted by score; each is compared to the ground truth of its scene, takes the
   box of highest IoU (matched or not) and is a true positive when that IoU is > the threshold (strictly) and
   the box is not yet matched; otherwise (a duplicate, or no overlap) it is a false positive.
3. AP (``voc_ap``, ``use_07_metric=False``): the area under the precision envelope (precision made
   non-increasing from the right) over every recall step, with sentinels (0, 0) and (1, 0); not 11-point.
4. mAP@0.25 and mAP@0.5: the mean of the per-class APs; reported in percent. Recall per class is the recall
   after the last detection; AR is its mean.

What differs from 3DETR, and why:

- Classes with no ground-truth box in the split get AP ``None`` and are left out of the means. 3DETR gives such
  a class AP 0 and counts it as soon as it has a detection, which ``per_class_proposal`` always makes, and
  leaves it out only when it has neither. On ScanNet val every one of the 18 classes has ground truth, so the
  numbers agree there; on a subset ours is the mean over the classes that can be scored.
- IoU is the closed-form axis-aligned one; 3DETR clips polygons of the 8 box corners (``box3d_iou``), which
  gives the same value for axis-aligned boxes up to float rounding. Points-in-box is a bounds test rather than
  a Delaunay hull test, the same set for axis-aligned boxes up to points on a face.
- Ties (equal scores) are broken deterministically with stable sorts: in NMS the later index wins, in matching
  the earlier detection (scenes in the order given) comes first. 3DETR uses numpy's default (unstable) sort.
- 3DETR's "old type" NMS overlap is intersection / volume of the lower-scored box (no +1 volume, unlike
  py-faster-rcnn's pixel boxes); it is available here (``use_old_type_nms``) but, as in 3DETR's evaluation,
  off.
- Only 3DETR's evaluation branch is built: 3D NMS (not bird's-eye 2D NMS, ``use_3d_nms=True``); with
  ``per_class_proposal=False`` a box is one detection of its argmax class scored by objectness (3DETR's last
  branch).
- Each class is scored on its own; 3DETR's ``eval_det_multiprocessing`` pairs results to classes by position,
  which would misalign them if a class with ground truth had no detection (never under ``per_class_proposal``).
- Predictions and ground truth must cover the same scenes (DataError otherwise): rescoring a subset against
  the full split would silently count the missing scenes as misses.
- Class 13 is spelled "showercurtain" (3DETR: "showercurtrain"); the order is 3DETR's.

Inputs from 3DETR: ``boxes`` are the min and max over each query's ``box_corners`` (ScanNet boxes are
axis-aligned; 3DETR's camera-frame axis flip does not change IoU), ``points`` the cloud the model was given.

Boxes are ``[xmin, ymin, zmin, xmax, ymax, zmax]`` in metres in the scene's axis-aligned frame. Predictions
are saved as ``predictions.json`` (``predictions_json`` / ``read_predictions``) so anyone can rescore them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pkd.common.errors import ConfigError, DataError
from pkd.common.scannet_annotations import DET_CLASSES

SCANNET_DETECTION_CLASSES = DET_CLASSES  # 3DETR/VoteNet order and spelling (pkd.common.scannet_annotations)

Predictions = dict[str, dict[str, np.ndarray]]
"""``{scene: {"boxes": (K, 6), "scores": (K,), "labels": (K,)}}``."""

GroundTruth = Mapping[str, Mapping[str, np.ndarray]]
"""``{scene: {"boxes": (M, 6), "labels": (M,)}}``."""


@dataclass(frozen=True)
class PostprocessSettings:
    """3DETR's evaluation settings for ``parse_predictions`` (``get_ap_config_dict`` with ``exact_eval=True``)."""

    remove_empty_box: bool = True
    min_points_in_box: int = 5
    nms_iou: float = 0.25
    cls_nms: bool = True
    use_old_type_nms: bool = False
    per_class_proposal: bool = True
    conf_thresh: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"nms_iou is {self.nms_iou}; give an IoU in (0, 1] (3DETR uses 0.25).")
        if not 0.0 <= self.conf_thresh < 1.0:
            raise ConfigError(f"conf_thresh is {self.conf_thresh}; give a probability in [0, 1) (3DETR uses 0.05).")
        if self.min_points_in_box < 1:
            raise ConfigError(f"min_points_in_box is {self.min_points_in_box}; give at least 1 (3DETR uses 5).")


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    """``boxes`` as a float64 (N, 6) array; ValueError for another shape (a caller's bug, not a user's input)."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 6:
        raise ValueError(f"boxes must be (N, 6) [xmin, ymin, zmin, xmax, ymax, zmax], got shape {array.shape}")
    return array


def box_volume(boxes: np.ndarray) -> np.ndarray:
    """(N,) volumes of axis-aligned boxes; an inverted extent counts as 0."""
    boxes = _as_boxes(boxes)
    return np.prod(np.clip(boxes[:, 3:] - boxes[:, :3], 0.0, None), axis=1)


def box_intersection_3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection volumes of axis-aligned boxes ``a`` (N, 6) and ``b`` (M, 6)."""
    a, b = _as_boxes(a), _as_boxes(b)
    low = np.maximum(a[:, None, :3], b[None, :, :3])
    high = np.minimum(a[:, None, 3:], b[None, :, 3:])
    return np.prod(np.clip(high - low, 0.0, None), axis=2)


def box_iou_3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of axis-aligned boxes ``a`` (N, 6) and ``b`` (M, 6); 0 where the union is empty."""
    inter = box_intersection_3d(a, b)
    union = box_volume(a)[:, None] + box_volume(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms_3d(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | None, iou: float, old_type: bool = False
) -> np.ndarray:
    """Indices of the boxes greedy 3D NMS keeps, highest score first (3DETR/VoteNet ``nms_3d_faster``).

    The best remaining box is kept and every other remaining box whose overlap with it is > ``iou`` is dropped;
    with ``classes`` only boxes of the same class suppress each other (``nms_3d_faster_samecls``). The overlap
    is the IoU, or with ``old_type`` the intersection over the other box's volume (no +1 volume).
    """
    boxes = _as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes) or (classes is not None and len(classes) != len(boxes)):
        raise ValueError(f"nms_3d: {len(boxes)} boxes, {len(scores)} scores, classes of another length")
    labels = None if classes is None else np.asarray(classes).reshape(-1)
    remaining = np.argsort(scores, kind="stable")
    volumes = box_volume(boxes)
    keep: list[int] = []
    while remaining.size:
        best, rest = int(remaining[-1]), remaining[:-1]
        keep.append(best)
        inter = box_intersection_3d(boxes[best : best + 1], boxes[rest])[0]
        union = volumes[rest] if old_type else volumes[best] + volumes[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        if labels is not None:
            overlap = overlap * (labels[rest] == labels[best])
        remaining = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(K,) number of ``points`` (N, 3+) inside each box (bounds inclusive).

    Points are sorted by x once, so each box tests only those in its x range rather than the whole cloud.
    """
    boxes = _as_boxes(boxes)
    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    xyz = xyz[np.argsort(xyz[:, 0], kind="stable")]
    first = np.searchsorted(xyz[:, 0], boxes[:, 0], side="left")
    last = np.searchsorted(xyz[:, 0], boxes[:, 3], side="right")
    counts = np.zeros(len(boxes), dtype=np.int64)
    for k, (start, stop) in enumerate(zip(first, last)):
        near = xyz[start:stop, 1:]
        counts[k] = np.count_nonzero(((near >= boxes[k, 1:3]) & (near <= boxes[k, 4:6])).all(axis=1))
    return counts


def postprocess(
    boxes: np.ndarray,
    sem_cls_prob: np.ndarray,
    objectness_prob: np.ndarray,
    points: np.ndarray | None,
    settings: PostprocessSettings = PostprocessSettings(),
) -> dict[str, np.ndarray]:
    """One scene's detections from 3DETR's outputs, as ``parse_predictions`` makes them for evaluation.

    ``boxes`` (Q, 6) are the query boxes, ``sem_cls_prob`` (Q, C) 3DETR's ``sem_cls_prob`` (softmax without the
    no-object class), ``objectness_prob`` (Q,) its ``objectness_prob``, ``points`` the scene's input cloud (N, 3+)
    for the empty-box test (None skips it). Returns ``{"boxes": (K, 6), "scores": (K,), "labels": (K,)}``.
    """
    boxes = _as_boxes(boxes)
    sem_cls_prob = np.asarray(sem_cls_prob, dtype=np.float64)
    objectness_prob = np.asarray(objectness_prob, dtype=np.float64).reshape(-1)
    if sem_cls_prob.ndim != 2 or not len(boxes) == len(sem_cls_prob) == len(objectness_prob):
        raise ValueError(
            f"postprocess: {len(boxes)} boxes, sem_cls_prob of shape {sem_cls_prob.shape}, "
            f"{len(objectness_prob)} objectness values"
        )
    candidates = np.arange(len(boxes))
    if settings.remove_empty_box and points is not None and len(boxes):
        nonempty = points_in_boxes(points, boxes) >= settings.min_points_in_box
        candidates = candidates[nonempty] if nonempty.any() else np.array([int(objectness_prob.argmax())])
    top_class = sem_cls_prob.argmax(axis=1)
    nms_classes = top_class[candidates] if settings.cls_nms else None
    picked = nms_3d(
        boxes[candidates], objectness_prob[candidates], nms_classes, settings.nms_iou, settings.use_old_type_nms
    )
    kept = candidates[picked]
    kept = np.sort(kept[objectness_prob[kept] > settings.conf_thresh])
    if settings.per_class_proposal:
        num_classes = sem_cls_prob.shape[1]
        box_index = np.tile(kept, num_classes)
        labels = np.repeat(np.arange(num_classes), len(kept))
        scores = sem_cls_prob[box_index, labels] * objectness_prob[box_index]
    else:
        box_index, labels, scores = kept, top_class[kept], objectness_prob[kept]
    return {"boxes": boxes[box_index], "scores": scores, "labels": labels.astype(np.int64)}


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC AP (all points, not 11-point): area under the non-increasing envelope of precision over recall."""
    recall_ = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    envelope = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(recall_[1:] != recall_[:-1])
    return float(np.sum((recall_[steps + 1] - recall_[steps]) * envelope[steps + 1]))


def eval_class(
    preds: Mapping[str, Sequence[tuple[np.ndarray, float]]],
    gts: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Recall, precision (per detection, score-sorted) and AP of one class (VoteNet's ``eval_det_cls``).

    ``preds`` maps a scene to its ``(box, score)`` detections, ``gts`` a scene to its ground-truth boxes. Each
    detection takes its scene's box of highest IoU; it is a true positive when that IoU is > ``iou_threshold``
    and the box is still unmatched, else a false positive (duplicates included). With no ground truth at all the
    recall is 0 and the AP 0, as in 3DETR.
    """
    scenes = list(preds)
    scene_of = np.asarray([index for index, scene in enumerate(scenes) for _ in preds[scene]], dtype=np.int64)
    boxes = np.asarray([box for scene in scenes for box, _ in preds[scene]], dtype=np.float64).reshape(-1, 6)
    scores = np.asarray([score for scene in scenes for _, score in preds[scene]], dtype=np.float64)
    best_gt = np.full(len(boxes), -1)
    best_iou = np.zeros(len(boxes))
    for index, scene in enumerate(scenes):
        gt_boxes = np.asarray(gts.get(scene, []), dtype=np.float64).reshape(-1, 6)
        rows = np.flatnonzero(scene_of == index)
        if len(gt_boxes) and len(rows):
            ious = box_iou_3d(boxes[rows], gt_boxes)
            best_gt[rows], best_iou[rows] = ious.argmax(axis=1), ious.max(axis=1)
    matched: set[tuple[int, int]] = set()
    true_positive = np.zeros(len(boxes))
    for rank, det in enumerate(np.argsort(-scores, kind="stable")):
        key = (int(scene_of[det]), int(best_gt[det]))
        if best_iou[det] > iou_threshold and key not in matched:
            matched.add(key)
            true_positive[rank] = 1.0
    num_gt = sum(len(np.asarray(boxes_, dtype=np.float64).reshape(-1, 6)) for boxes_ in gts.values())
    tp = np.cumsum(true_positive)
    fp = np.cumsum(1.0 - true_positive)
    recall = tp / num_gt if num_gt else np.zeros_like(tp)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, voc_ap(recall, precision)


def _threshold_key(prefix: str, threshold: float) -> str:
    """``map25`` for 0.25, ``map50`` for 0.5."""
    return f"{prefix}{round(threshold * 100)}"


def _mean_percent(values: Mapping[str, float | None]) -> float | None:
    """Mean of the non-None values, or None when there are none."""
    scored = [value for value in values.values() if value is not None]
    return float(np.mean(scored)) if scored else None


def _of_class(entry: Mapping[str, np.ndarray], label: int, *fields: str) -> list[np.ndarray]:
    """The boxes of one scene's entry with class ``label``, followed by the same rows of each of ``fields``."""
    mask = np.asarray(entry["labels"]).reshape(-1) == label
    return [_as_boxes(np.asarray(entry["boxes"]).reshape(-1, 6))[mask]] + [np.asarray(entry[f])[mask] for f in fields]


def _check_scenes(predictions: Mapping[str, Any], ground_truth: GroundTruth, num_classes: int) -> None:
    """DataError unless predictions and ground truth cover the same scenes with labels in [0, num_classes)."""
    extra = sorted(set(predictions) - set(ground_truth))
    missing = sorted(set(ground_truth) - set(predictions))
    if extra or missing:
        raise DataError(
            f"predictions and ground truth cover different scenes ({len(extra)} without ground truth, first "
            f"{extra[:3]}; {len(missing)} without predictions, first {missing[:3]}); score predictions of the "
            "split they were made on (a scene with no detection still needs an empty entry)."
        )
    for source, table in (("predictions", predictions), ("ground truth", ground_truth)):
        for scene, entry in table.items():
            labels = np.asarray(entry["labels"]).reshape(-1)
            wrong = labels[(labels < 0) | (labels >= num_classes)]
            if wrong.size:
                raise DataError(
                    f"{source} of scene {scene} has label {wrong[0]} outside [0, {num_classes}); labels index the "
                    f"{num_classes} class names given, so pass the class list the labels were made with."
                )


def average_precision(
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    ground_truth: GroundTruth,
    class_names: Sequence[str] = SCANNET_DETECTION_CLASSES,
    thresholds: Sequence[float] = (0.25, 0.5),
) -> dict[str, Any]:
    """mAP, per-class AP and recall in percent at each IoU threshold, over the scenes of ``ground_truth``.

    Returns ``{"map25": %, "map50": %, "per_class": {"map25": {class: % or None}, ...}, "recall": {"ar25": %,
    ..., "per_class": {"ar25": {class: % or None}, ...}}}``. A class with no ground-truth box in the split is
    None and left out of the means (3DETR would count it as 0; see the module docstring).
    """
    _check_scenes(predictions, ground_truth, len(class_names))
    result: dict[str, Any] = {"per_class": {}, "recall": {"per_class": {}}}
    for threshold in thresholds:
        ap_key, ar_key = _threshold_key("map", threshold), _threshold_key("ar", threshold)
        aps: dict[str, float | None] = {}
        recalls: dict[str, float | None] = {}
        for label, name in enumerate(class_names):
            gts = {scene: _of_class(entry, label)[0] for scene, entry in ground_truth.items()}
            if not any(len(boxes) for boxes in gts.values()):
                aps[name] = recalls[name] = None
                continue
            preds = {}
            for scene, entry in predictions.items():
                boxes, scores = _of_class(entry, label, "scores")
                preds[scene] = list(zip(boxes, scores))
            recall, _, ap = eval_class(preds, gts, threshold)
            aps[name] = 100.0 * ap
            recalls[name] = 100.0 * float(recall[-1]) if len(recall) else 0.0
        result[ap_key] = _mean_percent(aps)
        result["per_class"][ap_key] = aps
        result["recall"][ar_key] = _mean_percent(recalls)
        result["recall"]["per_class"][ar_key] = recalls
    return result


def predictions_json(predictions: Mapping[str, Mapping[str, np.ndarray]], class_names: Sequence[str]) -> dict:
    """The ``predictions.json`` document: ``{"classes": [...], "scenes": {scene: {"boxes", "scores", "labels"}}}``."""
    return {
        "classes": list(class_names),
        "scenes": {
            scene: {
                "boxes": np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 6).tolist(),
                "scores": np.asarray(entry["scores"], dtype=np.float64).reshape(-1).tolist(),
                "labels": np.asarray(entry["labels"], dtype=np.int64).reshape(-1).tolist(),
            }
            for scene, entry in predictions.items()
        },
    }


def _bad(path: Path, what: str) -> DataError:
    """The DataError for a malformed predictions file."""
    return DataError(
        f"{path}: {what}. A predictions.json holds {{'classes': [names], 'scenes': {{scene: {{'boxes': "
        "[[xmin, ymin, zmin, xmax, ymax, zmax], ...], 'scores': [...], 'labels': [class index, ...]}}}}; "
        "re-export it with the detection evaluation."
    )


def _scene_arrays(path: Path, scene: str, entry: Any, num_classes: int) -> dict[str, np.ndarray]:
    """One scene's validated arrays from its predictions.json entry."""
    if not isinstance(entry, dict) or set(entry) != {"boxes", "scores", "labels"}:
        raise _bad(path, f"scene {scene} must be an object with exactly 'boxes', 'scores' and 'labels'")
    try:
        boxes = np.asarray(entry["boxes"], dtype=np.float64)
        scores = np.asarray(entry["scores"], dtype=np.float64)
        labels = np.asarray(entry["labels"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _bad(path, f"scene {scene} has a non-numeric or ragged entry ({exc})") from exc
    boxes = boxes.reshape(0, 6) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 6 or scores.ndim != 1 or labels.ndim != 1:
        raise _bad(path, f"scene {scene}: boxes must be rows of 6 numbers, scores and labels flat lists")
    if not len(boxes) == len(scores) == len(labels):
        raise _bad(path, f"scene {scene} has {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    for name, values in (("box", boxes), ("score", scores), ("label", labels)):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=tuple(range(1, values.ndim))))
        if bad.size:
            raise _bad(path, f"scene {scene} {name} {bad[0]} is not finite ({values[bad[0]].tolist()})")
    inverted = np.flatnonzero((boxes[:, :3] > boxes[:, 3:]).any(axis=1))
    if inverted.size:
        raise _bad(path, f"scene {scene} box {inverted[0]} has a min above its max ({boxes[inverted[0]].tolist()})")
    wrong = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels >= num_classes))
    if wrong.size:
        raise _bad(
            path, f"scene {scene} label {wrong[0]} is {labels[wrong[0]]}, not a class index in [0, {num_classes})"
        )
    return {"boxes": boxes, "scores": scores, "labels": labels.astype(np.int64)}


def read_predictions(path: str | Path, class_names: Sequence[str] = SCANNET_DETECTION_CLASSES) -> Predictions:
    """Predictions from a ``predictions.json``, validated; DataError naming the file and the first bad entry."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"cannot be read as JSON ({exc})") from exc
    if not isinstance(document, dict) or not isinstance(document.get("scenes"), dict):
        raise _bad(path, "the top level must be an object with 'classes' and 'scenes' objects")
    if document.get("classes") != list(class_names):
        raise _bad(path, f"classes are {document.get('classes')}, expected {list(class_names)}")
    return {
        str(scene): _scene_arrays(path, str(scene), entry, len(class_names))
        for scene, entry in document["scenes"].items()
    }
