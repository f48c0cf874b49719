"""Geometry of posed RGB-D frames: pose checks, back-projection, projection, teacher crop, sampling.

Conventions: OpenCV pinhole cameras (x right, y down, z forward), 4x4 camera-to-world poses in metres,
pixel coordinates (u, v) = (column, row) with the pixel centre at integer values.
"""

from __future__ import annotations

import hashlib

import fpsample
import numpy as np

ROTATION_TOLERANCE = 1e-3


def pose_problem(pose: np.ndarray) -> str | None:
    """Why a camera-to-world pose is unusable ("invalid_pose" / "non_rigid_pose"), or None if it is fine.

    ScanNet marks frames where tracking was lost with a pose full of -inf; some exports write zeros.
    """
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4) or not np.isfinite(pose).all() or not pose[:3].any():
        return "invalid_pose"
    rotation = pose[:3, :3]
    rigid = (
        np.allclose(rotation.T @ rotation, np.eye(3), atol=ROTATION_TOLERANCE)
        and abs(np.linalg.det(rotation) - 1.0) < ROTATION_TOLERANCE
        and np.allclose(pose[3], [0.0, 0.0, 0.0, 1.0], atol=ROTATION_TOLERANCE)
    )
    return None if rigid else "non_rigid_pose"


def valid_pixels(depth: np.ndarray, depth_shift: float, min_depth: float, max_depth: float) -> np.ndarray:
    """Flat (row-major) indices of depth pixels whose depth in metres lies in [min_depth, max_depth].

    Compared in raw sensor units with one unsigned wrap-around test (values below ``low`` wrap to
    above the range), so no float image is built; 0 (no measurement) is always invalid.
    """
    low = max(1, int(np.ceil(min_depth * depth_shift)))
    high = int(np.floor(max_depth * depth_shift))
    flat = depth.reshape(-1)
    return np.flatnonzero((flat - flat.dtype.type(low)) <= (high - low))


def backproject(depth: np.ndarray, pixels: np.ndarray, intrinsic: np.ndarray, depth_shift: float) -> np.ndarray:
    """Camera-space points (M, 3) float32 of the depth pixels with flat indices ``pixels``."""
    rows, cols = np.divmod(pixels, depth.shape[1])
    z = depth.reshape(-1)[pixels].astype(np.float32) / np.float32(depth_shift)
    fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
    x = (cols.astype(np.float32) - np.float32(cx)) * z / np.float32(fx)
    y = (rows.astype(np.float32) - np.float32(cy)) * z / np.float32(fy)
    return np.stack([x, y, z], axis=1)


def transform(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform to (M, 3) points, keeping float32."""
    matrix = np.asarray(matrix, dtype=np.float32)
    return np.asarray(points @ matrix[:3, :3].T + matrix[:3, 3])


def project(points_cam: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
    """Pixel coordinates (M, 2) float32 of camera-space points; points behind the camera give inf."""
    z = points_cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intrinsic[0, 0] * points_cam[:, 0] / z + intrinsic[0, 2]
        v = intrinsic[1, 1] * points_cam[:, 1] / z + intrinsic[1, 2]
    uv = np.stack([u, v], axis=1).astype(np.float32)
    uv[z <= 0] = np.inf
    return uv


def teacher_crop_box(
    width: int, height: int, image_size: int = 224, crop: int | None = None
) -> tuple[float, float, float, float]:
    """Box (u0, v0, u1, v1) of the original image that the teacher sees.

    Mirrors open_clip's (and DINOv2's) eval transform: resize the shortest side to ``image_size``
    (torchvision's size rule), then a centre crop of ``crop`` squared (default ``image_size``; torchvision's
    rounding).
    """
    crop = image_size if crop is None else crop
    short, long = min(width, height), max(width, height)
    new_short, new_long = image_size, int(image_size * long / short)
    new_w, new_h = (new_long, new_short) if width >= height else (new_short, new_long)
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def inside(uv: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Mask of pixel coordinates lying inside a (u0, v0, u1, v1) box (pixel centres at integers)."""
    u0, v0, u1, v1 = box
    u, v = uv[:, 0] + 0.5, uv[:, 1] + 0.5
    return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def derive_seed(seed: int, scene: str, frame: int) -> int:
    """A 64-bit seed from (global seed, scene, frame): independent of worker order and resume point."""
    digest = hashlib.blake2b(f"{seed}/{scene}/{frame}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def subsample(indices: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n of ``indices``, drawn uniformly without replacement, kept in their original order."""
    if len(indices) <= n:
        return indices
    return indices[np.sort(rng.choice(len(indices), size=n, replace=False))]


def farthest_points(points: np.ndarray, n: int) -> np.ndarray:
    """Indices of n points chosen by farthest-point sampling (fpsample's QuickFPS, fixed start: deterministic)."""
    if len(points) < n:
        raise ValueError(f"farthest-point sampling needs at least {n} points, got {len(points)}")
    return np.asarray(fpsample.bucket_fps_kdline_sampling(points, n, h=5, start_idx=0), dtype=np.int64)
