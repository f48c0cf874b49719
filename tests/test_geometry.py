"""Geometry: pose checks, back-projection, projection, teacher crop, seeds and sampling."""

import cv2
import numpy as np
import pytest

from pkd.common import geometry

K = np.array([[500.0, 0, 320.0], [0, 500.0, 240.0], [0, 0, 1]])


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_pose_problem_reasons():
    good = np.eye(4)
    good[:3, :3] = rotation_z(0.3)
    good[:3, 3] = [1, 2, 3]
    assert geometry.pose_problem(good) is None
    assert geometry.pose_problem(np.full((4, 4), -np.inf)) == "invalid_pose"
    assert geometry.pose_problem(np.zeros((4, 4))) == "invalid_pose"
    nan = good.copy()
    nan[0, 3] = np.nan
    assert geometry.pose_problem(nan) == "invalid_pose"
    scaled = good.copy()
    scaled[:3, :3] *= 1.1
    assert geometry.pose_problem(scaled) == "non_rigid_pose"
    mirrored = good.copy()
    mirrored[:3, 0] *= -1
    assert geometry.pose_problem(mirrored) == "non_rigid_pose"


def test_backproject_then_project_returns_the_pixels():
    rng = np.random.default_rng(0)
    depth = rng.integers(500, 4000, size=(480, 640)).astype(np.uint16)
    depth[:10] = 0
    valid = geometry.valid_pixels(depth, 1000.0, 0.1, 10.0)
    assert len(valid) == 470 * 640
    points = geometry.backproject(depth, valid, K, 1000.0)
    rows, cols = np.divmod(valid, 640)
    np.testing.assert_allclose(points[:, 2], depth[rows, cols] / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(geometry.project(points, K), np.stack([cols, rows], 1), atol=1e-3)


def test_depth_range_is_applied():
    depth = np.array([[0, 50, 100, 1000, 10000, 10001]], dtype=np.uint16)
    assert geometry.valid_pixels(depth, 1000.0, 0.1, 10.0).tolist() == [2, 3, 4]


def test_transform_applies_rotation_and_translation():
    pose = np.eye(4)
    pose[:3, :3] = rotation_z(np.pi / 2)
    pose[:3, 3] = [1, 0, 0]
    out = geometry.transform(np.array([[1.0, 0, 0]], dtype=np.float32), pose)
    np.testing.assert_allclose(out, [[1, 1, 0]], atol=1e-6)
    assert out.dtype == np.float32


def test_teacher_crop_box_of_scannet_color():
    u0, v0, u1, v1 = geometry.teacher_crop_box(1296, 968)
    assert (v0, v1) == (0.0, 968.0)
    assert u1 - u0 == pytest.approx(968 * 1296 / 968 * 224 / 299, rel=1e-6)
    assert (u0 + u1) / 2 == pytest.approx(648, abs=3)
    assert geometry.teacher_crop_box(480, 640) == pytest.approx((0.0, 80.0, 480.0, 560.0), abs=1)


def test_teacher_crop_box_matches_the_clip_transform():
    from PIL import Image

    from pkd.preprocess.torchvision_compat import import_open_clip

    open_clip = import_open_clip()
    transform = open_clip.image_transform(224, is_train=False)
    width, height = 1296, 968
    u0, v0, u1, v1 = geometry.teacher_crop_box(width, height)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : int(u0) - 2] = 255
    image[:, int(np.ceil(u1)) + 2 :] = 255
    seen = transform(Image.fromarray(image)).numpy()
    assert np.abs(seen[:, :, 1:-1] - seen[:, 112:113, 112:113]).max() < 1e-5
    image[:, int(u0) + 3 : int(u0) + 6] = 255
    assert np.abs(transform(Image.fromarray(image)).numpy() - seen).max() > 0.5


def test_derive_seed_is_stable_and_distinct():
    assert geometry.derive_seed(0, "scene0000_00", 25) == geometry.derive_seed(0, "scene0000_00", 25)
    seeds = {geometry.derive_seed(s, sc, f) for s in (0, 1) for sc in ("a", "b") for f in (0, 25)}
    assert len(seeds) == 8
    # a changed derivation would silently change every store written before it: pin it
    assert geometry.derive_seed(0, "scene0000_00", 0) == 0xBC27D04BCBB9A962


def test_subsample_is_seeded_ordered_and_unique():
    indices = np.arange(0, 40000, 2)
    a = geometry.subsample(indices, 512, np.random.default_rng(7))
    assert len(np.unique(a)) == 512 and np.all(np.diff(a) > 0) and np.isin(a, indices).all()
    np.testing.assert_array_equal(a, geometry.subsample(indices, 512, np.random.default_rng(7)))
    assert not np.array_equal(a, geometry.subsample(indices, 512, np.random.default_rng(8)))
    np.testing.assert_array_equal(geometry.subsample(indices[:100], 512, np.random.default_rng(0)), indices[:100])


def test_farthest_points_is_deterministic_and_covers_space_better_than_random():
    points = np.random.default_rng(2).random((20000, 3)).astype(np.float32)
    points[:15000] *= 0.1

    def coverage(idx):
        return np.linalg.norm(points[::50, None] - points[idx][None], axis=2).min(1).max()

    fps = geometry.farthest_points(points, 256)
    assert len(np.unique(fps)) == 256
    np.testing.assert_array_equal(fps, geometry.farthest_points(points, 256))
    rnd = np.random.default_rng(0).choice(len(points), 256, replace=False)
    assert coverage(fps) < 0.7 * coverage(rnd)
    with pytest.raises(ValueError):
        geometry.farthest_points(points[:100], 256)


def test_real_scannet_frames_reproject_consistently(scannet_scene):
    intrinsic = np.loadtxt(scannet_scene / "intrinsic" / "intrinsic_depth.txt")[:3, :3]
    depth = {i: cv2.imread(str(scannet_scene / "depth" / f"{i}.png"), cv2.IMREAD_UNCHANGED) for i in (0, 2)}
    pose = {i: np.loadtxt(scannet_scene / "pose" / f"{i}.txt") for i in (0, 2)}
    points = geometry.backproject(depth[2], geometry.valid_pixels(depth[2], 1000.0, 0.1, 10.0), intrinsic, 1000.0)
    world = geometry.transform(points, pose[2])
    in_0 = geometry.transform(world, np.linalg.inv(pose[0]))
    uv = np.rint(geometry.project(in_0, intrinsic)).astype(int)
    ok = (uv[:, 0] >= 0) & (uv[:, 0] < 640) & (uv[:, 1] >= 0) & (uv[:, 1] < 480)
    observed = depth[0][uv[ok, 1], uv[ok, 0]] / 1000.0
    has = observed > 0
    diff = np.abs(observed[has] - in_0[ok][has, 2])
    assert has.sum() > 50000
    assert np.median(diff) < 0.015
