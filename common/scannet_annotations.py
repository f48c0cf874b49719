"""ScanNet's instance annotations of one scan, as 3D detection boxes (VoteNet's and 3DETR's ScanNet v2 data).

A scan folder ``<root>/scans/<scene>/`` holds four annotation files:

    <scene>_vh_clean_2.ply                 the mesh: vertex x, y, z, red, green, blue (scannet_mesh's layout)
    <scene>_vh_clean_2.0.010000.segs.json  ``segIndices``: the over-segmentation's segment id of every vertex
    <scene>.aggregation.json               ``segGroups``: one {objectId, label (raw category), segments} per object
    <scene>.txt                            scan metadata, with ``axisAlignment = a00 a01 ... a33`` (row-major 4x4)

As VoteNet's ``scannet/load_scannet_data.py`` does, vertices are axis-aligned (``[xyz, 1] @ A.T``), every vertex
of an object's segments gets instance id objectId + 1 (0: no object) and the NYU40 id of the object's raw
category (``scannetv2-labels.combined.tsv``; 0: unannotated or a category the tsv lacks), and each object of one
of the 18 detection classes (``DET_CLASSES``, in VoteNet/3DETR order) gets the axis-aligned box of its aligned
vertices, in objectId order. Where objects share a segment, the later one wins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from pkd.common.errors import DataError
from pkd.common.scannet_mesh import LABELS_TSV, MESH_SUFFIX, label_rows, read_ply_vertices, write_mesh_ply

log = logging.getLogger(__name__)

DET_CLASSES = (
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "desk",
    "curtain",
    "refrigerator",
    "showercurtrain",
    "toilet",
    "sink",
    "bathtub",
    "garbagebin",
)
DET_NYU40_IDS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SEGS_SUFFIX, AGGREGATION_SUFFIX, META_SUFFIX = "_vh_clean_2.0.010000.segs.json", ".aggregation.json", ".txt"
ANNOTATION_HINT = (
    "fetch the scan's annotations with ScanNet's download script (--type _vh_clean_2.ply "
    "--type _vh_clean_2.0.010000.segs.json --type .aggregation.json --type .txt)"
)
SKIP_HINT = "or pass --allow-missing to skip scenes without annotation files"


@dataclass(frozen=True)
class DetectionScene:
    """One annotated scan: ``xyz`` (N, 3) float32 axis-aligned metres, ``rgb`` (N, 3) uint8, ``instance`` (N,)
    int32 (objectId + 1, 0 = none), ``semantic`` (N,) int16 NYU40 id (0 = unannotated), ``boxes`` (M, 6)
    float32 [xmin, ymin, zmin, xmax, ymax, zmax] and ``box_classes`` (M,) int64 indices into DET_CLASSES."""

    xyz: np.ndarray
    rgb: np.ndarray
    instance: np.ndarray
    semantic: np.ndarray
    boxes: np.ndarray
    box_classes: np.ndarray


@cache
def nyu40_of_category() -> dict[str, int]:
    """raw_category -> nyu40id of the shipped ``scannetv2-labels.combined.tsv``."""
    return {row["raw_category"]: int(row["nyu40id"]) for row in label_rows()}


def annotation_files(folder: Path) -> tuple[Path, Path, Path, Path]:
    """The (mesh, segs.json, aggregation.json, .txt) paths of the scan folder ``folder`` (named after its scene)."""
    mesh, segs, aggregation, meta = (
        folder / f"{folder.name}{suffix}" for suffix in (MESH_SUFFIX, SEGS_SUFFIX, AGGREGATION_SUFFIX, META_SUFFIX)
    )
    return mesh, segs, aggregation, meta


def require_annotation_files(folder: Path) -> tuple[Path, Path, Path, Path]:
    """``annotation_files(folder)``; DataError naming the first that does not exist."""
    files = annotation_files(folder)
    for path in files:
        if not path.is_file():
            raise DataError(f"{path} does not exist; {ANNOTATION_HINT}, {SKIP_HINT}.")
    return files


def _json(path: Path, key: str) -> Any:
    """``key`` of the JSON object in ``path``; DataError naming the file when it is malformed or lacks it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"cannot read {path} as JSON ({exc}); the file is truncated or damaged: {ANNOTATION_HINT}."
        ) from exc
    if not isinstance(data, dict) or key not in data:
        raise DataError(f"{path} has no {key!r} entry; it is not a ScanNet annotation file: {ANNOTATION_HINT}.")
    return data[key]


def read_alignment(path: Path) -> np.ndarray:
    """The 4x4 ``axisAlignment`` of a scan's ``<scene>.txt``; DataError naming the file when it is absent or is not
    16 finite numbers (ScanNet's test scans have none: they carry no annotations either)."""
    lines = [
        line for line in path.read_text(errors="replace").splitlines() if line.split("=")[0].strip() == "axisAlignment"
    ]
    try:
        matrix = np.array(lines[0].split("=", 1)[1].split(), dtype=np.float64) if lines else np.zeros(0)
    except ValueError:
        matrix = np.zeros(0)
    if matrix.shape != (16,) or not np.isfinite(matrix).all():
        raise DataError(
            f"{path} has no line 'axisAlignment = ' followed by 16 finite numbers; the scan's metadata is damaged "
            f"or of a test scan without annotations: {ANNOTATION_HINT}, {SKIP_HINT}."
        )
    return matrix.reshape(4, 4)


def _objects(path: Path) -> list[tuple[int, str, np.ndarray]]:
    """(objectId, raw label, segment ids) of every segGroup of an aggregation file, in file order."""
    groups = _json(path, "segGroups")
    objects, seen = [], set()
    try:
        for group in groups:
            object_id, label = group["objectId"], group["label"]
            segments = np.asarray(group["segments"], dtype=np.int64).reshape(-1)
            if not isinstance(object_id, int) or object_id < 0 or object_id in seen or not isinstance(label, str):
                raise ValueError(f"objectId {object_id!r} is negative, repeated or not an integer, or label {label!r}")
            seen.add(object_id)
            objects.append((object_id, label, segments))
    except (TypeError, KeyError, ValueError) as exc:
        raise DataError(
            f"{path} has a malformed segGroups entry ({type(exc).__name__}: {exc}); each needs an integer "
            f"objectId, a label and a list of segment ids: {ANNOTATION_HINT}."
        ) from exc
    return objects


def read_detection_scene(folder: Path) -> DetectionScene:
    """Vertices, instance and NYU40 labels and detection boxes of the scan folder ``folder``; DataError naming the
    file for a missing or damaged file, a segmentation of another vertex count or segments it lacks."""
    mesh, segs, aggregation, meta = require_annotation_files(folder)
    vertices = read_ply_vertices(mesh, ("x", "y", "z", "red", "green", "blue"))
    try:
        seg_ids = np.asarray(_json(segs, "segIndices"), dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{segs}: segIndices is not a list of integers ({exc}); {ANNOTATION_HINT}.") from exc
    if len(seg_ids) != len(vertices):
        raise DataError(
            f"{segs} has {len(seg_ids)} segIndices but {mesh} has {len(vertices)} vertices; the two files belong "
            f"to different versions of the scan: {ANNOTATION_HINT}."
        )
    alignment = read_alignment(meta)
    xyz = np.stack([vertices[c] for c in "xyz"], axis=1).astype(np.float64)
    xyz = (np.concatenate([xyz, np.ones((len(xyz), 1))], axis=1) @ alignment.T)[:, :3].astype(np.float32)
    rgb = np.stack([vertices[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)

    segments, vertex_segment = np.unique(seg_ids, return_inverse=True)
    segment_instance = np.zeros(len(segments), dtype=np.int32)
    segment_semantic = np.zeros(len(segments), dtype=np.int16)
    objects, unknown = _objects(aggregation), set()
    nyu40 = nyu40_of_category()
    for object_id, label, object_segments in objects:
        where = np.searchsorted(segments, object_segments).clip(0, max(len(segments) - 1, 0))
        absent = object_segments[segments[where] != object_segments] if len(segments) else object_segments
        if len(absent):
            raise DataError(
                f"{aggregation}: object {object_id} ({label}) names segment ids {absent[:5].tolist()} that "
                f"{segs} does not hold; the files belong to different versions of the scan: {ANNOTATION_HINT}."
            )
        if label not in nyu40:
            unknown.add(label)
        segment_instance[where] = object_id + 1
        segment_semantic[where] = nyu40.get(label, 0)
    if unknown:
        log.debug(
            "%s: raw categories %s are not in %s; their vertices count as unannotated",
            folder.name,
            sorted(unknown),
            LABELS_TSV,
        )
    instance, semantic = segment_instance[vertex_segment], segment_semantic[vertex_segment]
    boxes, classes = _boxes(xyz, instance, semantic, sorted(object_id + 1 for object_id, _, _ in objects))
    return DetectionScene(xyz, rgb, instance, semantic, boxes, classes)


def _boxes(
    xyz: np.ndarray, instance: np.ndarray, semantic: np.ndarray, instances: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Min/max box and class index of every instance (in the given order) of a detection class with vertices."""
    order = np.argsort(instance, kind="stable")
    starts = np.searchsorted(instance[order], instances, side="left")
    stops = np.searchsorted(instance[order], instances, side="right")
    class_of = {nyu40: index for index, nyu40 in enumerate(DET_NYU40_IDS)}
    boxes, classes = [], []
    for start, stop in zip(starts, stops):
        members = order[start:stop]
        if len(members) and int(semantic[members[0]]) in class_of:
            points = xyz[members]
            boxes.append(np.concatenate([points.min(axis=0), points.max(axis=0)]))
            classes.append(class_of[int(semantic[members[0]])])
    return np.array(boxes, dtype=np.float32).reshape(-1, 6), np.array(classes, dtype=np.int64)


def write_annotation_files(
    folder: Path,
    xyz: np.ndarray,
    rgb: np.ndarray,
    faces: np.ndarray,
    segments: np.ndarray,
    objects: Sequence[tuple[str, Sequence[int]]],
    alignment: np.ndarray,
    meta: Sequence[str] = (),
) -> tuple[Path, Path, Path, Path]:
    """Write the four annotation files of the scan folder ``folder`` in ScanNet's formats (for the demo scene and
    tests): the mesh of vertices ``xyz`` (unaligned frame), colours ``rgb`` and triangles ``faces``; the vertices'
    segment ids; ``objects`` as (raw category, segment ids), objectId = position; and ``<scene>.txt`` with the
    4x4 ``alignment`` then the ``meta`` lines (``key = value``)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = folder.name
    mesh, segs, aggregation, meta_file = files = annotation_files(folder)
    write_mesh_ply(mesh, xyz, rgb, faces)
    segs.write_text(json.dumps({"sceneId": name, "segIndices": np.asarray(segments).astype(int).tolist()}))
    groups = [
        {"id": i, "objectId": i, "segments": [int(s) for s in segment_ids], "label": label}
        for i, (label, segment_ids) in enumerate(objects)
    ]
    aggregation.write_text(
        json.dumps({"sceneId": f"scannet.{name}", "segGroups": groups, "segmentsFile": f"scannet.{segs.name}"})
    )
    matrix = " ".join(f"{float(v):.9g}" for v in np.asarray(alignment, dtype=np.float64).reshape(16))
    meta_file.write_text("".join(f"{line}\n" for line in (f"axisAlignment = {matrix}", *meta)))
    return files
