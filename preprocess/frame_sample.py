"""One posed RGB-D frame to one store sample: decode once, back-project, sample, color, teacher image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pkd.common import geometry
from pkd.common.config import at_least, option
from pkd.common.errors import ConfigError
from pkd.preprocess.frames import Camera, FrameDecodeError, RawFrame, decode_color, decode_depth

MAX_POINTS = 65536  # points per sample: bounds memory (points × shard size) and stays below a depth frame's pixels
SAMPLINGS = ("fps", "random")


@dataclass(frozen=True, kw_only=True)
class GeometryConfig:
    """Every parameter that shapes a sample's points; recorded in the store's ``prep`` attrs.

    ``fps`` draws ``fps_candidates`` valid depth pixels uniformly, then keeps ``num_points`` of them by
    farthest-point sampling (even coverage instead of the perspective's near-field bias); ``random``
    keeps ``num_points`` valid pixels uniformly. Only the kept pixels are ever back-projected.
    """

    num_points: int = option(4096, "Points per sample.")
    sampling: str = option("fps", "fps (farthest point) | random.")
    fps_candidates: int = 8192
    min_depth: float = 0.1
    max_depth: float = 10.0
    min_valid_pixels: int = 4096
    teacher_image_size: int = 224

    def __post_init__(self) -> None:
        at_least(1, num_points=self.num_points)
        if self.num_points > MAX_POINTS:
            raise ConfigError(
                f"--num-points {self.num_points} is above {MAX_POINTS}: a sample needs that many valid "
                "depth pixels (a ScanNet depth frame has 307,200) and memory grows with --num-points × "
                f"--shard-size. Pass at most {MAX_POINTS} (the paper uses 4096)."
            )
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"--sampling {self.sampling!r}: choose 'fps' or 'random'.")


class SkipFrame(Exception):
    """A frame that cannot become a sample; ``reason`` is one of store.SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class FrameSample:
    """The geometry arrays of one sample plus the decoded color image for the teacher."""

    points: np.ndarray
    colors: np.ndarray
    pixels: np.ndarray
    in_view: np.ndarray
    pose: np.ndarray
    image: np.ndarray


def make_sample(raw: RawFrame, camera: Camera, cfg: GeometryConfig, seed: int) -> FrameSample:
    """Turn a raw frame into a sample; raises SkipFrame for frames that must be skipped and counted."""
    problem = geometry.pose_problem(raw.pose)
    if problem:
        raise SkipFrame(problem)
    try:
        depth = decode_depth(raw, camera)
        image = decode_color(raw)
    except FrameDecodeError as exc:
        raise SkipFrame("undecodable") from exc
    valid = geometry.valid_pixels(depth, camera.depth_shift, cfg.min_depth, cfg.max_depth)
    if len(valid) < max(cfg.min_valid_pixels, cfg.num_points):
        raise SkipFrame("too_few_depth")
    pool = geometry.subsample(
        valid, cfg.fps_candidates if cfg.sampling == "fps" else cfg.num_points, np.random.default_rng(seed)
    )
    cam_points = geometry.backproject(depth, pool, camera.depth_intrinsic, camera.depth_shift)
    if cfg.sampling == "fps":
        cam_points = cam_points[geometry.farthest_points(cam_points, cfg.num_points)]
    uv = geometry.project(geometry.transform(cam_points, camera.depth_to_color), camera.color_intrinsic)
    height, width = image.shape[:2]
    on_image = geometry.inside(uv, (0.0, 0.0, float(width), float(height)))
    box = geometry.teacher_crop_box(width, height, cfg.teacher_image_size)
    pixels = np.rint(np.nan_to_num(uv, posinf=0.0, neginf=0.0)).astype(np.int64)
    pixels[:, 0] = np.clip(pixels[:, 0], 0, width - 1)
    pixels[:, 1] = np.clip(pixels[:, 1], 0, height - 1)
    colors = np.where(on_image[:, None], image[pixels[:, 1], pixels[:, 0]], 0).astype(np.uint8)
    pose = np.asarray(raw.pose, dtype=np.float32)
    return FrameSample(
        points=geometry.transform(cam_points, pose),
        colors=colors,
        pixels=pixels.astype(np.uint16),
        in_view=on_image & geometry.inside(uv, box),
        pose=pose,
        image=image,
    )
