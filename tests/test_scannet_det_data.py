"""ScanNet detection data: annotation files -> aligned vertices, instance/NYU40 labels and boxes (hand-built scenes
and the demo room), the errors naming their file, and the source-keyed detection cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pkd.common import det_cache
from pkd.common.errors import DataError, StoreError
from pkd.common.scannet_annotations import (
    DET_CLASSES,
    DET_NYU40_IDS,
    annotation_files,
    read_detection_scene,
    write_annotation_files,
)
from pkd.common.scannet_mesh import read_ply_vertices, scene_files
from pkd.preprocess.demo import BOXES, write_demo_scene
from pkd.preprocess.demo_mesh import ALIGNMENT

SCENE = "scene0000_00"
# A rotation by 90 degrees about z, then a shift: catches [xyz, 1] @ A (instead of A.T) and a missed translation.
TURN = np.array([[0, -1, 0, 1.5], [1, 0, 0, -2.0], [0, 0, 1, 0.25], [0, 0, 0, 1]], dtype=np.float64)
# (raw category, segment ids, points per segment): ids are sparse, as ScanNet's (vertex indices) are.
OBJECTS = (
    ("wall", (7,), 5),  # NYU40 1: annotated, no box
    ("chair", (42, 10), 4),  # NYU40 5 -> class 2; two segments
    ("no such category", (99,), 3),  # not in the tsv -> unannotated, no box
    ("table", (500,), 6),  # NYU40 7 -> class 4
)
LOOSE = 11  # a segment no object names


def hand_scene(folder: Path, alignment: np.ndarray = TURN, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a small annotated scan; returns what read_detection_scene must give back."""
    rng = np.random.default_rng(seed)
    parts = [(segment, count) for _, segments, count in OBJECTS for segment in segments] + [(LOOSE, 3)]
    segments = np.concatenate([np.full(count, segment) for segment, count in parts])
    order = rng.permutation(len(segments))  # interleave the objects' vertices
    segments = segments[order]
    xyz = rng.uniform(-3, 3, size=(len(segments), 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(len(segments), 3), dtype=np.uint8)
    faces = np.arange(len(segments) - len(segments) % 3).reshape(-1, 3)
    write_annotation_files(
        folder, xyz, rgb, faces, segments, [(label, segs) for label, segs, _ in OBJECTS], alignment, ["sceneType = X"]
    )
    aligned = (np.c_[xyz.astype(np.float64), np.ones(len(xyz))] @ alignment.T)[:, :3].astype(np.float32)
    instance = np.zeros(len(xyz), dtype=np.int32)
    semantic = np.zeros(len(xyz), dtype=np.int16)
    for object_id, (_, segs, _) in enumerate(OBJECTS):
        instance[np.isin(segments, segs)] = object_id + 1
    semantic[instance == 1], semantic[instance == 2], semantic[instance == 4] = 1, 5, 7
    boxes = [np.r_[aligned[instance == i].min(0), aligned[instance == i].max(0)] for i in (2, 4)]
    return {"xyz": aligned, "rgb": rgb, "instance": instance, "semantic": semantic, "boxes": np.array(boxes)}


def test_class_list_is_votenets():
    assert len(DET_CLASSES) == len(DET_NYU40_IDS) == 18
    assert DET_CLASSES[:3] == ("cabinet", "bed", "chair") and DET_CLASSES[-1] == "garbagebin"
    assert dict(zip(DET_CLASSES, DET_NYU40_IDS))["showercurtrain"] == 28


def test_boxes_labels_and_alignment_equal_what_was_written(tmp_path, caplog):
    folder = tmp_path / "scans" / SCENE
    expected = hand_scene(folder)
    assert [p.name for p in annotation_files(folder)] == [
        f"{SCENE}_vh_clean_2.ply",
        f"{SCENE}_vh_clean_2.0.010000.segs.json",
        f"{SCENE}.aggregation.json",
        f"{SCENE}.txt",
    ]
    with caplog.at_level(logging.DEBUG, logger="pkd.common.scannet_annotations"):
        scene = read_detection_scene(folder)
    np.testing.assert_allclose(scene.xyz, expected["xyz"], atol=1e-6)
    np.testing.assert_array_equal(scene.rgb, expected["rgb"])
    np.testing.assert_array_equal(scene.instance, expected["instance"])
    np.testing.assert_array_equal(scene.semantic, expected["semantic"])
    np.testing.assert_allclose(scene.boxes, expected["boxes"], atol=1e-6)
    assert [DET_CLASSES[c] for c in scene.box_classes] == ["chair", "table"]
    assert (scene.xyz.dtype, scene.rgb.dtype, scene.instance.dtype, scene.semantic.dtype) == (
        np.float32,
        np.uint8,
        np.int32,
        np.int16,
    )
    assert (scene.boxes.dtype, scene.box_classes.dtype, scene.boxes.shape) == (np.float32, np.int64, (2, 6))
    unknown = [r for r in caplog.records if "no such category" in r.getMessage()]
    assert len(unknown) == 1 and unknown[0].levelno == logging.DEBUG and SCENE in unknown[0].getMessage()


def _fault(folder: Path, fault: str) -> Path:
    """Break one annotation file of ``folder``; returns the file the error must name."""
    mesh, segs, aggregation, meta = annotation_files(folder)
    if fault.startswith("missing"):
        target = {"missing_mesh": mesh, "missing_segs": segs, "missing_agg": aggregation, "missing_txt": meta}[fault]
        target.unlink()
        return target
    if fault == "truncated_ply":
        mesh.write_bytes(mesh.read_bytes()[:-40])
        return mesh
    if fault == "seg_count":
        data = json.loads(segs.read_text())
        segs.write_text(json.dumps({**data, "segIndices": data["segIndices"][:-1]}))
        return segs
    if fault == "unknown_segment":
        data = json.loads(aggregation.read_text())
        data["segGroups"][1]["segments"].append(12345)
        aggregation.write_text(json.dumps(data))
        return aggregation
    if fault in ("no_alignment", "short_alignment", "nan_alignment"):
        text = {"no_alignment": "sceneType = X\n", "short_alignment": "axisAlignment = " + "1 " * 15}
        meta.write_text(text.get(fault, "axisAlignment = " + "nan " * 16))
        return meta
    target = segs if fault == "bad_json_segs" else aggregation
    target.write_text(target.read_text()[:-3])
    return target


FAULTS = {
    "missing_mesh": "--allow-missing",
    "missing_segs": "--allow-missing",
    "missing_agg": "--allow-missing",
    "missing_txt": "--allow-missing",
    "truncated_ply": "truncated or damaged",
    "seg_count": "segIndices but",
    "unknown_segment": r"segment ids \[12345\]",
    "no_alignment": "axisAlignment",
    "short_alignment": "16 finite numbers",
    "nan_alignment": "16 finite numbers",
    "bad_json_segs": "as JSON",
    "bad_json_agg": "as JSON",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_broken_file_is_a_data_error_naming_it(tmp_path, fault):
    folder = tmp_path / "scans" / SCENE
    hand_scene(folder)
    target = _fault(folder, fault)
    with pytest.raises(DataError, match=FAULTS[fault]) as err:
        read_detection_scene(folder)
    assert str(target) in str(err.value)


# sha256 (first 16 hex) of `write_demo_scene(out, num_frames=2, layout="both")` from main at 73c09b0, before
# the annotation files: they must not change. <scene>.txt only gains its axisAlignment line (first, as ScanNet's).
DEMO_HASHES = {
    "scans/scene9000_00/color/0.jpg": "709f5f6655db5444",
    "scans/scene9000_00/color/1.jpg": "0168d74591017969",
    "scans/scene9000_00/depth/0.png": "0c4c87d3efb6a112",
    "scans/scene9000_00/depth/1.png": "18a064c7bbbfed9a",
    "scans/scene9000_00/intrinsic/extrinsic_color.txt": "1c4be9d5554a7fa6",
    "scans/scene9000_00/intrinsic/extrinsic_depth.txt": "1c4be9d5554a7fa6",
    "scans/scene9000_00/intrinsic/intrinsic_color.txt": "4493eceb23062135",
    "scans/scene9000_00/intrinsic/intrinsic_depth.txt": "6013e420085b34c6",
    "scans/scene9000_00/pose/0.txt": "082c8d91071d6577",
    "scans/scene9000_00/pose/1.txt": "d50ea1c347d3cbbe",
    "scans/scene9000_00/scene9000_00.sens": "e873cb55ae392a41",
    "scans/scene9000_00/scene9000_00_vh_clean_2.labels.ply": "6c56d6273a23653c",
    "scans/scene9000_00/scene9000_00_vh_clean_2.ply": "a309f03296bda726",
    "splits/scannetv2_train.txt": "ef11bb9822bb07fe",
    "splits/scannetv2_val.txt": "ef11bb9822bb07fe",
}
DEMO_TXT_BEFORE = "4f2e64c5e83f4ebe"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def test_demo_scene_gains_annotations_and_keeps_its_other_files(tmp_path):
    folder = write_demo_scene(tmp_path, num_frames=2, layout="both")
    written = {str(p.relative_to(tmp_path)): p for p in tmp_path.rglob("*") if p.is_file()}
    new = {name for name in written if name not in DEMO_HASHES}
    assert new == {f"scans/scene9000_00/{p.name}" for p in annotation_files(folder)[1:]}
    assert {name: _sha(written[name].read_bytes()) for name in DEMO_HASHES} == DEMO_HASHES
    first, rest = annotation_files(folder)[3].read_text().split("\n", 1)
    assert first.startswith("axisAlignment = ") and _sha(rest.encode()) == DEMO_TXT_BEFORE

    scene = read_detection_scene(folder)
    aligned = [np.r_[lo, hi] + np.tile(ALIGNMENT[:3, 3], 2) for lo, hi in BOXES]
    assert ALIGNMENT[:3, 3].any()  # the alignment is exercised
    np.testing.assert_allclose(scene.boxes, aligned, atol=1e-5)
    assert [DET_CLASSES[c] for c in scene.box_classes] == ["table", "bed", "cabinet"]
    np.testing.assert_array_equal(scene.semantic, read_ply_vertices(scene_files(folder)[1], ("label",))["label"])
    assert len(np.unique(scene.instance)) == 10 and (scene.instance > 0).all()  # 4 walls, floor, ceiling, 3 boxes, ball


# ---- the detection cache ------------------------------------------------------------------------------------


def _tree(root: Path, scenes: tuple[str, ...] = (SCENE, "scene0001_00")) -> Path:
    for i, scene in enumerate(scenes):
        hand_scene(root / "scans" / scene, seed=i)
    return root


def _build(data: Path, cache_dir: Path, scenes: list[str], allow_missing: bool = False) -> det_cache.DetCacheReport:
    return det_cache.build_det_cache(data, cache_dir, scenes, allow_missing=allow_missing, progress=False)


def _assert_same(a, b) -> None:
    for field in ("xyz", "rgb", "instance", "semantic", "boxes", "box_classes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_cache_builds_reuses_and_serves_the_parsed_scenes(tmp_path):
    data, cache_dir = _tree(tmp_path / "scannet"), tmp_path / "cache"
    scenes = [SCENE, "scene0001_00"]
    report = _build(data, cache_dir, scenes)
    assert (report.built, report.reused, report.rebuilt, report.missing) == (2, 0, 0, ())
    assert report.path == det_cache.det_cache_path(data, cache_dir)
    assert report.path.parent == cache_dir and report.path.name.startswith("scannet_det-")
    again = _build(data, cache_dir, scenes)
    assert (again.built, again.reused, again.rebuilt) == (0, 2, 0)
    root = det_cache.open_det_cache(report.path, "r")
    attrs = det_cache.DetCacheAttrs.from_dict(dict(root.attrs))
    assert attrs.data_root == str(data.resolve()) and attrs.classes == DET_CLASSES
    scene_attrs = det_cache.DetSceneAttrs.from_dict(dict(root[SCENE].attrs))
    assert [Path(s.path).name for s in scene_attrs.sources] == [
        p.name for p in annotation_files(data / "scans" / SCENE)
    ]
    for scene in scenes:
        _assert_same(det_cache.load_det_scene(root, scene), read_detection_scene(data / "scans" / scene))
    assert det_cache.verify_det_cache(report.path) == []


def test_cache_rebuilds_a_scene_whose_files_changed(tmp_path, caplog):
    data, cache_dir = _tree(tmp_path / "scannet"), tmp_path / "cache"
    path = _build(data, cache_dir, [SCENE, "scene0001_00"]).path
    folder = data / "scans" / SCENE
    meta = annotation_files(folder)[3]
    stat = meta.stat()
    os.utime(meta, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch: same bytes, new mtime
    with caplog.at_level(logging.INFO, logger="pkd.common.det_cache"):
        report = _build(data, cache_dir, [SCENE, "scene0001_00"])
    assert (report.built, report.reused, report.rebuilt) == (0, 1, 1)
    assert [r.getMessage() for r in caplog.records] == [f"{SCENE}: annotation files changed since cached; re-reading"]

    caplog.clear()
    shifted = TURN.copy()
    shifted[0, 3] += 1.0  # new content (a new alignment) of the same size
    expected = hand_scene(folder, shifted)
    os.utime(meta, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    root = det_cache.open_det_cache(path, "r")
    with caplog.at_level(logging.INFO, logger="pkd.common.det_cache"):
        fresh = det_cache.load_det_scene(root, SCENE)  # read-only: served fresh, not written back
        writable = det_cache.open_det_cache(path, "a")
        np.testing.assert_allclose(det_cache.load_det_scene(writable, SCENE).boxes, expected["boxes"], atol=1e-6)
        det_cache.load_det_scene(writable, SCENE)  # now cached again: no line
    np.testing.assert_allclose(fresh.boxes, expected["boxes"], atol=1e-6)
    assert len(caplog.records) == 2 and all("changed since cached" in r.getMessage() for r in caplog.records)
    assert (_build(data, cache_dir, [SCENE]).reused, det_cache.verify_det_cache(path)) == (1, [])


def test_another_root_gets_another_cache(tmp_path):
    data, cache_dir = _tree(tmp_path / "a"), tmp_path / "cache"
    other = tmp_path / "b"
    shutil.copytree(data, other)
    first = _build(data, cache_dir, [SCENE])
    second = _build(other, cache_dir, [SCENE])
    assert first.path != second.path and second.built == 1
    with pytest.raises(StoreError, match="caches the ScanNet tree"):
        det_cache.open_det_cache(first.path, "a", other)
    root = det_cache.open_det_cache(second.path, "r")
    assert all(
        Path(s.path).is_relative_to(other.resolve())
        for s in det_cache.DetSceneAttrs.from_dict(dict(root[SCENE].attrs)).sources
    )


def test_corrupt_chunk_is_a_store_error_naming_the_scene(tmp_path):
    data, cache_dir = _tree(tmp_path / "scannet"), tmp_path / "cache"
    path = _build(data, cache_dir, [SCENE, "scene0001_00"]).path
    chunk = next(p for p in (path / SCENE / "xyz").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=f"{SCENE} is corrupt"):
        det_cache.load_det_scene(det_cache.open_det_cache(path, "r"), SCENE)
    problems = det_cache.verify_det_cache(path)
    assert len(problems) == 1 and problems[0].startswith(f"{SCENE}: unreadable")


def test_missing_scenes_are_errors_or_counted(tmp_path):
    data, cache_dir = _tree(tmp_path / "scannet"), tmp_path / "cache"
    aggregation = annotation_files(data / "scans" / "scene0001_00")[2]
    aggregation.unlink()
    with pytest.raises(DataError, match="--allow-missing") as err:
        _build(data, cache_dir, [SCENE, "scene0001_00"])
    assert str(aggregation) in str(err.value)
    with pytest.raises(DataError, match="scene0002_00"):
        _build(data, cache_dir, ["scene0002_00"])
    report = _build(data, cache_dir, [SCENE, "scene0001_00", "scene0002_00"], allow_missing=True)
    assert (report.built, report.missing) == (1, ("scene0001_00", "scene0002_00"))
    with pytest.raises(StoreError, match="not cached"):
        det_cache.load_det_scene(det_cache.open_det_cache(report.path, "r"), "scene0001_00")
