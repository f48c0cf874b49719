"""The demo room as a labelled ScanNet mesh: ``<scene>_vh_clean_2.ply`` and ``<scene>_vh_clean_2.labels.ply``.

The geometry is passed in by ``demo.write_demo_scene`` (its ROOM, BOXES, SPHERE), each surface a grid of
vertices ``spacing`` apart, triangulated, in ScanNet's binary little-endian layout (vertex x, y, z float,
red, green, blue, alpha uchar; faces as uchar-counted int lists; the labels file adds a ushort NYU40
``label``). Labels: walls 1, floor 2, cabinet 3, bed 4, table 7 (benchmark classes) and ceiling 22, ball
40 (outside the benchmark's 20, so ignored). Colours come from their own seeded generator, so the rendered
frames stay exactly as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

WALL, FLOOR, CABINET, BED, TABLE, CEILING, OTHERPROP = 1, 2, 3, 4, 7, 22, 40
BOX_LABELS = (TABLE, BED, CABINET)  # the order of demo.BOXES
Box = tuple[np.ndarray, np.ndarray]
VERTEX = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
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
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(vertices, faces, NYU40 label) of every surface of the demo room: walls, floor, ceiling, the boxes
    (table, bed, cabinet) and the ball."""
    lo, hi = room
    ex, ey, ez = np.diag(hi - lo)
    planes = [
        ((lo, ex, ey), FLOOR),
        ((lo + ez, ex, ey), CEILING),
        ((lo, ex, ez), WALL),
        ((lo + ey, ex, ez), WALL),
        ((lo, ey, ez), WALL),
        ((lo + ex, ey, ez), WALL),
    ]
    planes += [(face, label) for (bmin, bmax), label in zip(boxes, BOX_LABELS) for face in _box_faces(bmin, bmax)]
    surfaces = [(*_grid(*plane, spacing), label) for plane, label in planes]
    return surfaces + [(*_sphere(sphere[0], sphere[1], spacing / 2), OTHERPROP)]


def write_demo_mesh(
    scene: Path,
    room: Box,
    boxes: tuple[Box, ...],
    sphere: tuple[np.ndarray, float],
    seed: int = 0,
    spacing: float = 0.1,
) -> tuple[Path, Path]:
    """Write the room's ``<scene>_vh_clean_2.ply`` and ``.labels.ply`` into the scan folder ``scene``."""
    rng = np.random.default_rng([seed, 2])
    vertices, faces, labels, colors, offset = [], [], [], [], 0
    for points, tris, label in demo_surfaces(room, boxes, sphere, spacing):
        base = rng.uniform(60, 230, size=3)
        colors.append(np.clip(base + rng.normal(0, 12, size=points.shape), 0, 255).astype(np.uint8))
        vertices.append(points)
        faces.append(tris + offset)
        labels.append(np.full(len(points), label, dtype=np.uint16))
        offset += len(points)
    xyz, rgb = np.concatenate(vertices).astype(np.float32), np.concatenate(colors)
    face = np.empty(sum(len(f) for f in faces), dtype=[("vertex_indices", "<i4", (3,))])
    face["vertex_indices"] = np.concatenate(faces)
    name = scene.name
    mesh, labelled = scene / f"{name}_vh_clean_2.ply", scene / f"{name}_vh_clean_2.labels.ply"
    for path, extra in ((mesh, []), (labelled, [("label", "<u2")])):
        table = np.empty(len(xyz), dtype=VERTEX + extra)
        for i, axis in enumerate("xyz"):
            table[axis] = xyz[:, i]
        for i, channel in enumerate(("red", "green", "blue")):
            table[channel] = rgb[:, i]
        table["alpha"] = 255
        if extra:
            table["label"] = np.concatenate(labels)
        elements = [
            PlyElement.describe(table, "vertex"),
            PlyElement.describe(face, "face", len_types={"vertex_indices": "u1"}),
        ]
        PlyData(elements, text=False, byte_order="<").write(str(path))
    return mesh, labelled


def write_demo_splits(out: Path, scene: str) -> Path:
    """``out/splits/scannetv2_{train,val}.txt`` naming the demo scene (one scene: a smoke test, not a benchmark)."""
    folder = out / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_LISTS:
        (folder / f"scannetv2_{split}.txt").write_text(f"{scene}\n")
    return folder
