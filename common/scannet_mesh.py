"""ScanNet's labelled meshes: per-vertex xyz, colour and 20-class benchmark label of one scene.

Each scan folder holds ``<scene>_vh_clean_2.ply`` (binary little-endian; vertex x, y, z float, red, green,
blue, alpha uchar; triangle faces) and ``<scene>_vh_clean_2.labels.ply`` (the same vertices with a ushort
``label``, the NYU40 id; 0 = unannotated). Files are read with plyfile. The ScanNet benchmark scores 20 of the
40 NYU40 classes (``CLASS_IDS``, as in ScanNet's ``evaluate_semantic_label.py``); every other id and the
unannotated vertices get ``IGNORE``. Class names come from ``scannetv2-labels.combined.tsv`` (shipped in
``pkd.data_manifests``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement, PlyParseError

from pkd.common.errors import DataError

CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
NUM_CLASSES = len(CLASS_IDS)
IGNORE = 255
MESH_SUFFIX, LABELS_SUFFIX = "_vh_clean_2.ply", "_vh_clean_2.labels.ply"
LABELS_TSV = "scannetv2-labels.combined.tsv"
DOWNLOAD_HINT = "fetch it with ScanNet's download script: --type _vh_clean_2.ply --type _vh_clean_2.labels.ply"
# ScanNet faces are triangles; telling plyfile so lets it read the face lists at memmap speed.
_TRIANGLES = {"face": {"vertex_indices": 3}}
_VERTEX = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]


@dataclass(frozen=True)
class SceneMesh:
    """One scene's vertices: ``xyz`` (V, 3) float32 metres, ``rgb`` (V, 3) uint8, ``label`` (V,) uint8 class
    index in 0..19 or IGNORE."""

    xyz: np.ndarray
    rgb: np.ndarray
    label: np.ndarray


@cache
def label_rows() -> tuple[dict[str, str], ...]:
    """The rows of the shipped ``scannetv2-labels.combined.tsv`` (raw_category, nyu40id, nyu40class, ...) that
    carry an NYU40 id."""
    text = resources.files("pkd.data_manifests").joinpath(LABELS_TSV).read_text()
    return tuple(row for row in csv.DictReader(text.splitlines(), delimiter="\t") if row["nyu40id"].strip())


@cache
def class_names() -> tuple[str, ...]:
    """Names of the 20 benchmark classes (nyu40class of each id in CLASS_IDS), from the shipped tsv."""
    names = {int(row["nyu40id"]): row["nyu40class"] for row in label_rows()}
    return tuple(names[i] for i in CLASS_IDS)


def map_labels(nyu40: np.ndarray) -> np.ndarray:
    """NYU40 ids → class index 0..19, IGNORE for every id outside the benchmark's 20 (0 included)."""
    lookup = np.full(max(CLASS_IDS) + 1, IGNORE, dtype=np.uint8)
    lookup[list(CLASS_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)
    nyu40 = np.asarray(nyu40, dtype=np.int64)
    inside = (nyu40 >= 0) & (nyu40 < lookup.size)
    return np.where(inside, lookup[np.clip(nyu40, 0, lookup.size - 1)], IGNORE).astype(np.uint8)


def scene_files(folder: Path) -> tuple[Path, Path]:
    """The (mesh, labels) PLY paths of the scan folder ``folder`` (named after its scene)."""
    return folder / f"{folder.name}{MESH_SUFFIX}", folder / f"{folder.name}{LABELS_SUFFIX}"


def read_ply_vertices(path: Path, fields: tuple[str, ...]) -> np.ndarray:
    """The vertex element of a PLY as a structured array; DataError naming the file when it is unreadable,
    truncated or lacks one of ``fields``."""
    try:
        ply = PlyData.read(str(path), known_list_len=_TRIANGLES)
    except (PlyParseError, ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot read {path} as a PLY mesh ({exc}); the file is truncated or damaged. "
            f"Download it again ({DOWNLOAD_HINT})."
        ) from exc
    if "vertex" not in ply:
        raise DataError(f"{path} has no vertex element; it is not a ScanNet mesh. Download it again ({DOWNLOAD_HINT}).")
    data: np.ndarray = ply["vertex"].data
    missing = [f for f in fields if f not in (data.dtype.names or ())]
    if missing:
        raise DataError(
            f"{path} has no vertex propert{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)} "
            f"(it has {', '.join(data.dtype.names or ())}); expected ScanNet's layout. Download it "
            f"again ({DOWNLOAD_HINT})."
        )
    return data


def write_mesh_ply(
    path: Path, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray, label: np.ndarray | None = None
) -> Path:
    """Write a triangle mesh in ScanNet's binary little-endian layout (``_vh_clean_2.ply``; with ``label``, the
    NYU40 ids as a ushort vertex property, ``_vh_clean_2.labels.ply``): the one PLY writer of the demo and tests."""
    table = np.empty(len(xyz), dtype=_VERTEX + ([("label", "<u2")] if label is not None else []))
    for i, axis in enumerate("xyz"):
        table[axis] = xyz[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        table[channel] = rgb[:, i]
    table["alpha"] = 255
    if label is not None:
        table["label"] = label
    face = np.empty(len(faces), dtype=[("vertex_indices", "<i4", (3,))])
    face["vertex_indices"] = faces
    elements = [
        PlyElement.describe(table, "vertex"),
        PlyElement.describe(face, "face", len_types={"vertex_indices": "u1"}),
    ]
    PlyData(elements, text=False, byte_order="<").write(str(path))
    return path


def read_scene(mesh: Path, labels: Path) -> SceneMesh:
    """Vertices, colours and benchmark labels of one scene from its two PLY files; DataError naming the file
    for a missing/damaged file, a missing property or vertex counts that differ between the two."""
    for path in (mesh, labels):
        if not path.is_file():
            raise DataError(f"{path} does not exist; {DOWNLOAD_HINT}, or pass --allow-missing to skip the scene.")
    vertices = read_ply_vertices(mesh, ("x", "y", "z", "red", "green", "blue"))
    labelled = read_ply_vertices(labels, ("label",))
    if len(labelled) != len(vertices):
        raise DataError(
            f"{labels} has {len(labelled)} vertices but {mesh} has {len(vertices)}; the two files "
            f"belong to different versions of the scan. Download both again ({DOWNLOAD_HINT})."
        )
    xyz = np.stack([vertices[c] for c in "xyz"], axis=1).astype(np.float32)
    if not np.isfinite(xyz).all():
        raise DataError(f"{mesh} holds NaN or infinite vertex coordinates; download it again ({DOWNLOAD_HINT}).")
    rgb = np.stack([vertices[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)
    return SceneMesh(xyz, rgb, map_labels(labelled["label"]))


def split_scenes(split: str, splits: Path | None = None) -> list[str]:
    """Scene names of the official ``scannetv2_<split>.txt`` list (from ``splits`` or ``pkd.data_manifests``)."""
    name = f"scannetv2_{split}.txt"
    if splits is None:
        return resources.files("pkd.data_manifests").joinpath(name).read_text().split()
    path = Path(splits) / name
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; --splits must be a folder holding scannetv2_train.txt and "
            "scannetv2_val.txt (or leave it out to use the official lists)."
        )
    return path.read_text().split()


def find_scan_folder(root: Path, scene: str) -> Path | None:
    """The folder of ``scene`` under a ScanNet tree (``root/scans/<scene>``, ``root/<scene>``, or root itself)."""
    for folder in (root / "scans" / scene, root / scene, root):
        if folder.name == scene and folder.is_dir():
            return folder
    return None
