"""The demo room as an annotated ScanNet mesh: ``<scene>_vh_clean_2.ply`` and ``.labels.ply``, and the
instance annotations (``_vh_clean_2.0.010000.segs.json``, ``.aggregation.json``, ``<scene>.txt``).

The geometry is passed in by ``demo.write_demo_scene`` (its ROOM, BOXES, SPHERE), each surface a grid of
vertices ``spacing`` apart, triangulated, in ScanNet's binary little-endian layout (vertex x, y, z float,
red, green, blue, alpha uchar; faces as uchar-counted int lists; the labels file adds a ushort NYU40
``label``). Labels: walls 1, floor 2, cabinet 3, bed 4, table 7 (benchmark classes) and ceiling 22, ball
40 (outside the benchmark's 20, so ignored). Colours come from their own seeded generator, so the rendered
frames stay exactly as before. Every surface is one segment (named, as ScanNet's are, by a vertex index: its
first); the objects are the four walls, floor, ceiling, the three boxes (five segments each: table, bed and
cabinet are detection classes) and the ball. ``ALIGNMENT`` (a translation putting the room's centre at the
origin) is the scan's axisAlignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pkd.common.scannet_annotations import write_annotation_files
from pkd.common.scannet_mesh import write_mesh_ply

WALL, FLOOR, CABINET, BED, TABLE, CEILING, OTHERPROP = 1, 2, 3, 4, 7, 22, 40
BOX_LABELS = (TABLE, BED, CABINET)  # the order of demo.BOXES
RAW_CATEGORIES = {
    WALL: "wall",
    FLOOR: "floor",
    CABINET: "cabinet",
    BED: "bed",
    TABLE: "table",
    CEILING: "ceiling",
    OTHERPROP: "ball",
}
ALIGNMENT = np.array([[1, 0, 0, -3.0], [0, 1, 0, -2.5], [0, 0, 1, 0], [0, 0, 0, 1]])
Box = tuple[np.ndarray, np.ndarray]
SPLIT_LISTS = ("train", "val")


def _grid(origin: np.ndarray, u: np.ndarray, v: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (n, 3) of the rectangle origin + [0,1]u + [0,1]v at about ``spacing``, and its triangles (m, 3)."""
    nu = max(2, int(round(np.linalg.norm(u) / spacing)) + 1)
    nv = max(2, int(round(np.linalg.norm(v) / spacing)) + 1)
    a, b = np.meshgrid(np.linspace(0, 1, nu), np.linspace(0, 1, nv), indexing="ij")
    vertices = origin + a.reshape(-1, 1) * u + b.reshape(-1, 1) * v
    corner = (np.arange(nu - 1)[:, None] * nv + np.arange(nv - 1)[None]).reshape(-1)
    faces = np.concatenate(
        [np.stack([corner, corner + nv, corner + 1], 1), np.stack([corner + 1, corner + nv, corner + nv + 1], 1)]
    )
    return vertices, faces


def _box_faces(bmin: np.ndarray, bmax: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(origin, u, v) of the five visible faces of a box standing on the floor (no bottom)."""
    size = bmax - bmin
    ex, ey, ez = np.diag(size)
    return [(bmin + ez, ex, ey), (bmin, ex, ez), (bmin + ey, ex, ez), (bmin, ey, ez), (bmin + ex, ey, ez)]


def _sphere(centre: np.ndarray, radius: float, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A UV sphere: vertices on the parallels/meridians about ``spacing`` apart, and its triangles."""
    rings = max(4, int(np.pi * radius / spacing))
    theta, phi = np.meshgrid(np.linspace(0, np.pi, rings + 1), np.linspace(0, 2 * np.pi, 2 * rings + 1), indexing="ij")
    unit = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1).reshape(-1, 3)
    _, faces = _grid(np.zeros(3), np.array([rings * spacing, 0, 0]), np.array([0, 2 * rings * spacing, 0]), spacing)
    return centre + radius * unit, faces


def demo_surfaces(
    room: Box, boxes: tuple[Box, ...], sphere: tuple[np.ndarray, float], spacing: float
) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """(vertices, faces, NYU40 label, object number) of every surface of the demo room: walls, floor, ceiling
    (one object each), the boxes (table, bed, cabinet; five surfaces each) and the ball."""
    lo, hi = room
    ex, ey, ez = np.diag(hi - lo)
    planes = [
        ((lo, ex, ey), FLOOR, 0),
        ((lo + ez, ex, ey), CEILING, 1),
        ((lo, ex, ez), WALL, 2),
        ((lo + ey, ex, ez), WALL, 3),
        ((lo, ey, ez), WALL, 4),
        ((lo + ex, ey, ez), WALL, 5),
    ]
    planes += [
        (face, label, 6 + b)
        for b, ((bmin, bmax), label) in enumerate(zip(boxes, BOX_LABELS))
        for face in _box_faces(bmin, bmax)
    ]
    surfaces = [(*_grid(*plane, spacing), label, number) for plane, label, number in planes]
    return surfaces + [(*_sphere(sphere[0], sphere[1], spacing / 2), OTHERPROP, 6 + len(boxes))]


def write_demo_mesh(
    scene: Path,
    room: Box,
    boxes: tuple[Box, ...],
    sphere: tuple[np.ndarray, float],
    seed: int = 0,
    spacing: float = 0.1,
    meta: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write the room's ``<scene>_vh_clean_2.ply`` and ``.labels.ply`` into the scan folder ``scene``, and its
    annotation files (``meta``: the other ``key = value`` lines of ``<scene>.txt``); returns the two PLYs."""
    rng = np.random.default_rng([seed, 2])
    vertices, faces, labels, colors, segments, offset = [], [], [], [], [], 0
    objects: dict[int, tuple[str, list[int]]] = {}
    for points, tris, label, number in demo_surfaces(room, boxes, sphere, spacing):
        base = rng.uniform(60, 230, size=3)
        colors.append(np.clip(base + rng.normal(0, 12, size=points.shape), 0, 255).astype(np.uint8))
        vertices.append(points)
        faces.append(tris + offset)
        labels.append(np.full(len(points), label, dtype=np.uint16))
        segments.append(np.full(len(points), offset))
        objects.setdefault(number, (RAW_CATEGORIES[label], []))[1].append(offset)
        offset += len(points)
    xyz, rgb, face = np.concatenate(vertices).astype(np.float32), np.concatenate(colors), np.concatenate(faces)
    mesh, *_ = write_annotation_files(
        scene, xyz, rgb, face, np.concatenate(segments), [objects[n] for n in sorted(objects)], ALIGNMENT, meta
    )
    labelled = write_mesh_ply(scene / f"{scene.name}_vh_clean_2.labels.ply", xyz, rgb, face, np.concatenate(labels))
    return mesh, labelled


def write_demo_splits(out: Path, scene: str) -> Path:
    """``out/splits/scannetv2_{train,val}.txt`` naming the demo scene (one scene: a smoke test, not a benchmark)."""
    folder = out / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_LISTS:
        (folder / f"scannetv2_{split}.txt").write_text(f"{scene}\n")
    return folder
