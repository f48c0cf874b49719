"""One ScanNet detection input as 3DETR's ``ScannetDetectionDataset.__getitem__`` builds it, and a collate.

facebookresearch/3detr ``datasets/scannet.py`` (defaults there; ``datasets/__init__.py`` turns ``augment`` on
for training and off for evaluation), ``utils/pc_util.py`` and ``utils/random_cuboid.py``, in 3DETR's order:

1. colour (``use_color``, off): (rgb − MEAN_COLOR_RGB) / 256 appended; height (``use_height``, off): z minus
   the 0.99th percentile of z appended; both computed on the whole scene.
2. training only, ``use_random_cuboid`` (on): RandomCuboid — up to 100 tries of a crop of U(0.5, 1) of the
   scene's extent per axis (some pair of axes with aspect ≥ 0.8) centred on a random point, kept if it holds
   at least ``random_cuboid_min_points`` (30000) points and the centre of at least one box (boxes whose
   centre leaves the crop's points' min/max are dropped); else the whole scene.
3. ``num_points`` (40000) points drawn at random, with replacement only when the scene has fewer.
4. training only: flip x with probability 1/2, flip y with probability 1/2 (box centres follow), rotation
   about z by U(−5°, 5°); each box becomes the axis-aligned box of its rotated footprint
   (``rotate_aligned_boxes``), its height kept.
5. ``point_cloud_dims_min/max``: the min/max xyz of the sampled, augmented points.

Every draw comes from the ``numpy.random.Generator`` passed in, so a seeded caller gets the same sample.
Boxes are [min xyz, max xyz] here (3DETR stores centre + size; the transforms are the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pkd.train.downstream.detection_loss import MAX_NUM_OBJ, build_targets

MEAN_COLOR_RGB = np.array([109.8, 97.2, 83.8])
ROTATION = np.pi / 36  # ±5°


@dataclass(frozen=True)
class SampleConfig:
    """3DETR's ScanNet dataset options (``ScannetDetectionDataset.__init__`` defaults)."""

    num_points: int = 40000
    use_color: bool = False
    use_height: bool = False
    use_random_cuboid: bool = True
    random_cuboid_min_points: int = 30000


def random_cuboid(
    xyz: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, min_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """3DETR's ``RandomCuboid`` (aspect 0.8, crop 0.5–1, box filter "center"): kept point indices and the
    boolean mask of kept boxes; all points and boxes when 100 tries fail."""
    extent = xyz.max(axis=0) - xyz.min(axis=0)
    centers = (boxes[:, :3] + boxes[:, 3:]) / 2
    for _ in range(100):
        crop = 0.5 + rng.random(3) * 0.5
        aspects = [min(crop[i], crop[j]) / max(crop[i], crop[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        if max(aspects) < 0.8:
            continue
        centre = xyz[rng.integers(len(xyz))]
        half = extent * crop / 2
        inside = np.all((xyz <= centre + half) & (xyz >= centre - half), axis=1)
        if inside.sum() < min_points:
            continue
        keep = np.ones(len(boxes), dtype=bool)
        if len(boxes):
            lo, hi = xyz[inside].min(axis=0), xyz[inside].max(axis=0)
            keep = np.all((centers >= lo) & (centers <= hi), axis=1)
            if not keep.any():
                continue
        return np.flatnonzero(inside), keep
    return np.arange(len(xyz)), np.ones(len(boxes), dtype=bool)


def rotz(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotate_aligned_boxes(boxes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """3DETR's ``rotate_aligned_boxes``: centres rotated, x/y extents those of the rotated footprint."""
    centers, half = (boxes[:, :3] + boxes[:, 3:]) / 2 @ rot.T, (boxes[:, 3:] - boxes[:, :3]) / 2
    footprint = np.abs(rot[:2, :2]) @ half[:, :2].T  # half extents of the rotated rectangle
    new_half = np.concatenate([footprint.T, half[:, 2:]], axis=1)
    return np.concatenate([centers - new_half, centers + new_half], axis=1)


def scene_sample(
    xyz: np.ndarray,
    rgb: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    rng: np.random.Generator,
    augment: bool,
    cfg: SampleConfig = SampleConfig(),
) -> dict[str, np.ndarray]:
    """One scene's input: point_clouds (num_points, 3 [+3 colour] [+1 height]) float32, boxes (M', 6),
    classes (M',), point_cloud_dims_min/max (3,) float32."""
    cloud = [xyz.astype(np.float32)]
    if cfg.use_color:
        cloud.append(((rgb.astype(np.float64) - MEAN_COLOR_RGB) / 256.0).astype(np.float32))
    if cfg.use_height:
        cloud.append((xyz[:, 2:3] - np.percentile(xyz[:, 2], 0.99)).astype(np.float32))
    points = np.concatenate(cloud, axis=1)
    boxes, classes = boxes.astype(np.float32).reshape(-1, 6), np.asarray(classes, dtype=np.int64)
    if augment and cfg.use_random_cuboid:
        inside, keep = random_cuboid(points[:, :3], boxes, rng, cfg.random_cuboid_min_points)
        points, boxes, classes = points[inside], boxes[keep], classes[keep]
    points = points[rng.choice(len(points), cfg.num_points, replace=len(points) < cfg.num_points)]
    if augment:
        for axis in (0, 1):
            if rng.random() > 0.5:
                points[:, axis] *= -1
                boxes[:, [axis, axis + 3]] = -boxes[:, [axis + 3, axis]]
        rot = rotz(rng.random() * 2 * ROTATION - ROTATION)
        points[:, :3] = points[:, :3] @ rot.T
        boxes = rotate_aligned_boxes(boxes, rot).astype(np.float32)
    return {
        "point_clouds": points,
        "boxes": boxes,
        "classes": classes,
        "point_cloud_dims_min": points[:, :3].min(axis=0),
        "point_cloud_dims_max": points[:, :3].max(axis=0),
    }


def collate(
    samples: Sequence[dict[str, np.ndarray]],
    device: str | torch.device = "cpu",
    max_num_obj: int = MAX_NUM_OBJ,
    names: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scene samples → model inputs (point_clouds (B, N, C), point_cloud_dims_min/max (B, 3)) and the
    ``build_targets`` dict, on ``device``."""
    inputs = {
        key: torch.from_numpy(np.stack([s[key] for s in samples])).to(device)
        for key in ("point_clouds", "point_cloud_dims_min", "point_cloud_dims_max")
    }
    targets = build_targets(
        [s["boxes"] for s in samples],
        [s["classes"] for s in samples],
        inputs["point_cloud_dims_min"],
        inputs["point_cloud_dims_max"],
        max_num_obj,
        names,
    )
    return inputs, targets
