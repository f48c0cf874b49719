"""The ScanNet detection metric against hand-computed cases: IoU, NMS, VOC AP, matching, mAP, 3DETR's
post-processing and the predictions.json format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pkd.common.errors import ConfigError, DataError
from pkd.train.downstream.detection_metric import (
    SCANNET_DETECTION_CLASSES,
    PostprocessSettings,
    average_precision,
    box_iou_3d,
    eval_class,
    nms_3d,
    postprocess,
    predictions_json,
    read_predictions,
    voc_ap,
)

UNIT = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def shifted(box: np.ndarray, dx: float) -> np.ndarray:
    """``box`` moved by ``dx`` along x."""
    return box + np.array([dx, 0, 0, dx, 0, 0])


def test_iou_of_hand_built_pairs() -> None:
    a = np.stack([UNIT, UNIT, UNIT, np.array([0.0, 0, 0, 2, 2, 2])])
    b = np.stack([UNIT, shifted(UNIT, 0.5), shifted(UNIT, 3.0), UNIT])
    iou = box_iou_3d(a, b)
    assert iou.shape == (4, 4)
    # identical 1; half overlap: 0.5 / (1 + 1 - 0.5); disjoint 0; a unit cube nested in a 2-cube: 1 / 8
    np.testing.assert_allclose(np.diag(iou), [1.0, 1.0 / 3.0, 0.0, 1.0 / 8.0])
    assert box_iou_3d(UNIT[None], shifted(UNIT, 1.0)[None])[0, 0] == 0.0  # touching faces
    np.testing.assert_allclose(box_iou_3d(b, a), iou.T)


def test_nms_keeps_the_higher_scored_box_and_both_classes_with_same_class_nms() -> None:
    boxes = np.stack([UNIT, shifted(UNIT, 0.1), shifted(UNIT, 5.0)])
    scores = np.array([0.6, 0.9, 0.3])
    np.testing.assert_array_equal(nms_3d(boxes, scores, None, 0.25), [1, 2])
    np.testing.assert_array_equal(nms_3d(boxes, scores, np.array([0, 1, 0]), 0.25), [1, 0, 2])
    np.testing.assert_array_equal(nms_3d(boxes, scores, np.array([1, 1, 1]), 0.25), [1, 2])
    # IoU 1/3 of a half overlap: suppressed at 0.25, kept at 0.5 (suppression needs IoU > threshold)
    half = np.stack([UNIT, shifted(UNIT, 0.5)])
    np.testing.assert_array_equal(nms_3d(half, np.array([0.9, 0.8]), None, 0.25), [0])
    np.testing.assert_array_equal(nms_3d(half, np.array([0.9, 0.8]), None, 0.5), [0, 1])
    # old type: intersection over the lower-scored box's volume; a unit cube inside a 2-cube overlaps it by 1
    nested = np.stack([np.array([0.0, 0, 0, 2, 2, 2]), UNIT])
    np.testing.assert_array_equal(nms_3d(nested, np.array([0.9, 0.8]), None, 0.25), [0, 1])
    np.testing.assert_array_equal(nms_3d(nested, np.array([0.9, 0.8]), None, 0.25, old_type=True), [0])


def test_voc_ap_is_the_area_under_the_precision_envelope() -> None:
    # envelope over recall 0.5 is max(1, 0.5, 2/3) = 1, over recall 1 it is 2/3: AP = 0.5 * 1 + 0.5 * 2/3
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2.0 / 3.0])) == pytest.approx(5.0 / 6.0)
    # recall never reaching 1 leaves the rest of the area out; no detections give 0
    assert voc_ap(np.array([0.25, 0.5]), np.array([1.0, 1.0])) == pytest.approx(0.5)
    assert voc_ap(np.array([]), np.array([])) == 0.0


def test_eval_class_counts_a_duplicate_as_false_positive_and_a_miss_in_recall() -> None:
    g1, g2, g3 = UNIT, shifted(UNIT, 3.0), UNIT
    preds = {
        "a": [(g1, 0.9), (shifted(g1, 0.05), 0.8)],  # a hit and its duplicate; g2 is missed
        "b": [(shifted(g3, 0.1), 0.7), (shifted(g3, 10.0), 0.6)],  # a hit (IoU 0.9 / 1.1) and a miss
    }
    recall, precision, ap = eval_class(preds, {"a": [g1, g2], "b": [g3]}, 0.25)
    # sorted TP, FP, TP, FP of 3 ground-truth boxes
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(precision, [1.0, 1 / 2, 2 / 3, 1 / 2])
    # envelope 1 over recall (0, 1/3], 2/3 over (1/3, 2/3], nothing beyond: 1/3 + 2/9
    assert ap == pytest.approx(5.0 / 9.0)
    # at IoU 0.85 the shifted hit in b (IoU 0.818) no longer counts: TP, FP, FP, FP -> AP 1/3
    assert eval_class(preds, {"a": [g1, g2], "b": [g3]}, 0.85)[2] == pytest.approx(1.0 / 3.0)


def scene(boxes: list[np.ndarray], labels: list[int], scores: list[float] | None = None) -> dict[str, np.ndarray]:
    """One scene's entry in the predictions or ground-truth layout."""
    entry = {"boxes": np.asarray(boxes, dtype=float).reshape(-1, 6), "labels": np.asarray(labels, dtype=np.int64)}
    if scores is not None:
        entry["scores"] = np.asarray(scores, dtype=float)
    return entry


def test_average_precision_leaves_classes_without_ground_truth_out_of_the_mean() -> None:
    # class a: an exact hit; class b: a half overlap (IoU 1/3, a hit at 0.25, a miss at 0.5);
    # class c: a detection but no ground truth anywhere (None; 3DETR would count it as AP 0)
    predictions = {
        "s1": scene([UNIT, shifted(UNIT, 5.5)], [0, 1], [0.9, 0.8]),
        "s2": scene([shifted(UNIT, 9.0)], [2], [0.7]),
    }
    ground_truth = {"s1": scene([UNIT, shifted(UNIT, 5.0)], [0, 1]), "s2": scene([], [])}
    result = average_precision(predictions, ground_truth, ["a", "b", "c"])
    assert result["per_class"]["map25"] == pytest.approx({"a": 100.0, "b": 100.0, "c": None})
    assert result["per_class"]["map50"] == pytest.approx({"a": 100.0, "b": 0.0, "c": None})
    assert result["map25"] == pytest.approx(100.0)
    assert result["map50"] == pytest.approx(50.0)
    assert result["recall"]["per_class"]["ar50"] == pytest.approx({"a": 100.0, "b": 0.0, "c": None})
    assert result["recall"]["ar25"] == pytest.approx(100.0)
    # a class with ground truth but no detection scores 0 and counts
    del predictions["s1"]["boxes"], predictions["s1"]["scores"], predictions["s1"]["labels"]
    predictions["s1"].update(scene([UNIT], [0], [0.9]))
    assert average_precision(predictions, ground_truth, ["a", "b", "c"])["map25"] == pytest.approx(50.0)


def test_average_precision_rejects_other_scenes_and_labels() -> None:
    ground_truth = {"s1": scene([UNIT], [0])}
    with pytest.raises(DataError, match="different scenes"):
        average_precision({"s2": scene([UNIT], [0], [0.5])}, ground_truth, ["a"])
    with pytest.raises(DataError, match="label 3 outside"):
        average_precision({"s1": scene([UNIT], [3], [0.5])}, ground_truth, ["a"])


def test_postprocess_removes_empty_boxes_suppresses_and_applies_conf_thresh() -> None:
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(0.1, 0.9, (10, 3)), rng.uniform(0.1, 0.9, (10, 3)) + [5, 0, 0]])
    points = np.concatenate([points, [[20.2, 0.5, 0.5], [20.3, 0.5, 0.5]]])  # 2 points: box 2 is "empty"
    boxes = np.stack([UNIT, shifted(UNIT, 0.05), shifted(UNIT, 20.0), shifted(UNIT, 5.0), shifted(UNIT, 0.02)])
    sem = np.array([[0.8, 0.1], [0.7, 0.2], [0.9, 0.05], [0.6, 0.3], [0.1, 0.85]])
    objectness = np.array([0.9, 0.8, 0.95, 0.04, 0.5])
    out = postprocess(boxes, sem, objectness, points, PostprocessSettings())
    # box 1 is suppressed by box 0 (same class, IoU > 0.25), box 2 is empty, box 3 is below conf_thresh 0.05,
    # box 4 overlaps box 0 but is of the other class; each kept box is proposed once per class
    np.testing.assert_array_equal(out["labels"], [0, 0, 1, 1])
    np.testing.assert_allclose(out["boxes"], boxes[[0, 4, 0, 4]])
    np.testing.assert_allclose(out["scores"], [0.8 * 0.9, 0.1 * 0.5, 0.1 * 0.9, 0.85 * 0.5])
    # without points nothing is empty: box 2 comes back
    assert len(postprocess(boxes, sem, objectness, None, PostprocessSettings())["scores"]) == 6
    # with every box empty the one of highest objectness stays (3DETR's fallback)
    alone = postprocess(boxes, sem, objectness, points + 100.0, PostprocessSettings(per_class_proposal=False))
    np.testing.assert_allclose(alone["boxes"], boxes[[2]])
    assert alone["labels"].tolist() == [0] and alone["scores"].tolist() == [0.95]


def test_postprocess_settings_reject_bad_values() -> None:
    with pytest.raises(ConfigError, match="nms_iou"):
        PostprocessSettings(nms_iou=0.0)
    with pytest.raises(ConfigError, match="conf_thresh"):
        PostprocessSettings(conf_thresh=1.0)


def test_predictions_json_round_trip(tmp_path: Path) -> None:
    predictions = {
        "scene0011_00": scene([[0.0, 0.1, 0.2, 1.0, 1.1, 1.2]], [17], [0.25]),
        "scene0015_00": scene([], [], []),
    }
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(predictions_json(predictions, SCANNET_DETECTION_CLASSES)))
    back = read_predictions(path)
    assert list(back) == list(predictions)
    for name, entry in predictions.items():
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(back[name][key], entry[key])
    assert back["scene0015_00"]["boxes"].shape == (0, 6)


GOOD_SCENE = {"boxes": [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]], "scores": [0.5, 0.4], "labels": [0, 1]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": ["chair"]}, "classes are"),
        ({"scores": [0.5]}, "2 boxes, 1 scores and 2 labels"),
        ({"boxes": [[0, 0, 0, 1, 1, float("nan")], [2, 2, 2, 3, 3, 3]]}, "box 0 is not finite"),
        ({"scores": [0.5, float("inf")]}, "score 1 is not finite"),
        ({"boxes": [[0, 0, 0, 1, 1, 1], [2, 2, 4, 3, 3, 3]]}, "box 1 has a min above its max"),
        ({"labels": [0, 18]}, "label 1 is 18.0, not a class index"),
        ({"labels": [0.5, 1]}, "label 0 is 0.5"),
        ({"boxes": [[0, 0, 0, 1, 1], [2, 2, 2, 3, 3, 3]]}, "non-numeric or ragged"),
    ],
)
def test_read_predictions_names_the_file_and_the_first_bad_entry(tmp_path: Path, change: dict, message: str) -> None:
    entry = {key: value for key, value in {**GOOD_SCENE, **change}.items() if key != "classes"}
    document = {"classes": change.get("classes", list(SCANNET_DETECTION_CLASSES)), "scenes": {"scene0000_00": entry}}
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=message) as error:
        read_predictions(path)
    assert str(path) in str(error.value)
    if "classes" not in change:
        assert "scene0000_00" in str(error.value)


def test_read_predictions_rejects_what_is_not_a_predictions_file(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        read_predictions(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match="top level"):
        read_predictions(path)


def test_the_metric_does_not_import_torch() -> None:
    code = "import sys, pkd.train.downstream.detection_metric; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
