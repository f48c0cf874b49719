"""ScanNet detection (the metric itself: test_detection_metric.py): `finetune scannet-det` → `test scannet-det` end to
end through the console script, re-deriving mAP from predictions.json and hand-built ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pkd.common.scannet_annotations import DET_CLASSES, write_annotation_files
from pkd.train.downstream.detection_metric import average_precision, read_predictions

from _cli import flags, run_script

# ---- end to end ---------------------------------------------------------------------------------------------

TINY = flags(
    device="cpu", dim=32, depth=2, heads=2, num_points=1024, num_group=64, group_size=16, num_queries=16,
    dec_layers=2, dec_dim=32, batch_size=2, epochs=2, warmup_epochs=1, eval_every=1,
)  # fmt: skip
ROOMS = {  # scene -> [(raw category, box min, box max)]
    "scene0000_00": [("chair", (0.5, 0.5, 0.0), (1.0, 1.0, 0.8)), ("table", (2.0, 1.0, 0.0), (3.0, 2.0, 0.7))],
    "scene0001_00": [("bed", (0.5, 1.0, 0.0), (2.5, 2.5, 0.5))],
    "scene0002_00": [("chair", (1.0, 2.0, 0.0), (1.5, 2.5, 0.9)), ("cabinet", (3.0, 0.2, 0.0), (3.5, 1.0, 1.2))],
}


def write_room(root: Path, scene: str, seed: int) -> dict[str, np.ndarray]:
    """A floor with solid box objects, in ScanNet's annotation files; returns the boxes (axis-aligned frame)."""
    rng = np.random.default_rng(seed)
    parts, segments, objects = [rng.uniform([0, 0, 0], [4, 3, 0.01], (600, 3))], [np.zeros(600)], [("floor", [0])]
    boxes, labels = [], []
    for i, (label, low, high) in enumerate(ROOMS[scene], start=1):
        cloud = rng.uniform(low, high, (300, 3))
        cloud[:8] = [
            [(low, high)[a][0], (low, high)[b][1], (low, high)[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)
        ]
        parts.append(cloud)
        segments.append(np.full(300, i))
        objects.append((label, [i]))
        boxes.append([*low, *high])
        labels.append(DET_CLASSES.index(label))
    xyz = np.concatenate(parts).astype(np.float32)
    shift = np.eye(4)
    shift[:3, 3] = [1.0, -2.0, 0.5]  # files hold the unaligned scan: the reader must undo this
    unaligned = xyz - shift[:3, 3].astype(np.float32)
    rgb = rng.integers(0, 256, (len(xyz), 3), dtype=np.uint8)
    faces = np.arange(len(xyz) - len(xyz) % 3).reshape(-1, 3)
    write_annotation_files(root / "scans" / scene, unaligned, rgb, faces, np.concatenate(segments), objects, shift)
    return {"boxes": np.array(boxes, dtype=np.float32), "labels": np.array(labels)}


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scannet")
    truth = {scene: write_room(root, scene, seed) for seed, scene in enumerate(ROOMS)}
    splits = root / "splits"
    splits.mkdir()
    (splits / "scannetv2_train.txt").write_text("scene0000_00\nscene0001_00\n")
    (splits / "scannetv2_val.txt").write_text("scene0002_00\nscene0000_00\n")
    run = root / "run"
    done = run_script(
        "pkd-train", "--no-progress", "finetune", "scannet-det", "--data", root, "--splits", splits, "--init",
        "scratch", "--run-dir", run, "--cache-dir", root / "cache", *TINY, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root, splits, run, truth


def test_finetune_then_test_scores_what_predictions_json_holds(detection_run):
    root, splits, run, truth = detection_run
    done = run_script("pkd-train", "--no-progress", "test", "scannet-det", run, "--device", "cpu", cwd=root)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "test" / "results.json").read_text())
    assert {r["metric"] for r in results["records"]} == {"map25", "map50"}
    predictions = read_predictions(run / "test" / "predictions.json", DET_CLASSES)
    assert set(predictions) == {"scene0002_00", "scene0000_00"}
    rescored = average_precision(predictions, {s: truth[s] for s in predictions}, DET_CLASSES)
    for record in results["records"]:
        assert record["value"] == pytest.approx(rescored[record["metric"]], abs=1e-3)
    per_class = results["test"]["per_class"]["map25"]
    assert per_class["sofa"] is None and per_class["chair"] is not None  # no sofa in the val scenes
    assert results["test"]["per_class"]["map25"] == pytest.approx(rescored["per_class"]["map25"], abs=1e-3)
    table = root / "compare" / "table.md"
    done = run_script("pkd-train", "compare", run, "--out", table, cwd=root)
    assert done.returncode == 0, done.stderr
    chair = next(line for line in table.read_text().splitlines() if line.startswith("| chair |"))
    assert chair.count("|") == 4  # Table 9: one column per results file (the run's and its test's)


def test_a_segs_file_of_another_mesh_is_refused_naming_it(detection_run, tmp_path):
    root, splits, _, _ = detection_run
    bad = tmp_path / "data"
    (bad / "scans").mkdir(parents=True)
    for scene in ROOMS:
        (bad / "scans" / scene).symlink_to(root / "scans" / scene, target_is_directory=True)
    (bad / "scans" / "scene0001_00").unlink()
    copy = bad / "scans" / "scene0001_00"
    copy.mkdir()
    for f in (root / "scans" / "scene0001_00").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    segs = copy / "scene0001_00_vh_clean_2.0.010000.segs.json"
    content = json.loads(segs.read_text())
    segs.write_text(json.dumps({**content, "segIndices": content["segIndices"][:-5]}))
    done = run_script(
        "pkd-train", "finetune", "scannet-det", "--data", bad, "--splits", splits, "--init", "scratch",
        "--run-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache", *TINY, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert str(segs) in done.stderr
