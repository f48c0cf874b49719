"""Look at one stored sample: the color frame with the teacher's crop, the crop itself, the points.

The store keeps no images (they would dwarf the targets), so the color frame is read again from the
dataset path recorded in the store; if the dataset moved, the picture says so and shows the points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pkd.common import geometry, store  # noqa: E402
from pkd.common.errors import DataError, StoreError  # noqa: E402
from pkd.preprocess.frames import decode_color  # noqa: E402
from pkd.preprocess.scenes import find_scenes, open_scene  # noqa: E402

log = logging.getLogger(__name__)
FIGSIZE, DPI = (15.0, 5.0), 100


@dataclass
class StoredSample:
    """One sample's arrays and where it came from."""

    split: str
    index: int
    scene: str
    frame: int
    points: np.ndarray
    colors: np.ndarray
    in_view: np.ndarray
    prefix: np.ndarray
    pose: np.ndarray
    random_teacher: bool


def load_sample(path: str, split: str, index: int) -> StoredSample:
    """Read sample ``index`` of a split; refuses out-of-range and invalid (undecodable) samples."""
    group = store.open_split(path, split)
    attrs = store.split_attrs(group)
    n = attrs.num_samples
    if not 0 <= index < n:
        raise StoreError(f"{path}/{split} has {n} samples; --index must be in 0..{n - 1}, got {index}.")
    if not store.read_shard(group, "valid", index, index + 1)[0]:
        raise StoreError(
            f"{path}/{split} sample {index} is marked invalid (its frame could not be decoded); pick another --index."
        )
    sample = {
        name: store.read_shard(group, name, index, index + 1)[0]
        for name in ("scene", "frame", "points", "colors", "in_view", "prefix", "pose")
    }
    return StoredSample(
        split=split,
        index=index,
        scene=attrs.scenes[int(sample["scene"])],
        frame=int(sample["frame"]),
        points=sample["points"],
        colors=sample["colors"],
        in_view=sample["in_view"],
        prefix=sample["prefix"],
        pose=sample["pose"],
        random_teacher=store.root_attrs(store.open_store(path)).teacher.random,
    )


def color_frame(path: str, sample: StoredSample) -> np.ndarray | None:
    """The sample's color frame read again from the recorded dataset, or None if it is not reachable."""
    prep = store.root_attrs(store.open_store(path)).prep
    try:
        (entry,) = find_scenes(Path(prep["root"]), "all", [sample.scene], prep["source"])
        with open_scene(entry) as reader:
            (raw,) = reader.read([sample.frame])
        return decode_color(raw)
    except DataError as exc:
        log.warning("color frame unavailable: %s", exc)
        return None


def render(sample: StoredSample, image: np.ndarray | None, out: Path, caption: str | None = None) -> Path:
    """Write a 1500x500 PNG: color frame with crop box, the teacher's crop, and the colored points."""
    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    grid = fig.add_gridspec(1, 3, width_ratios=(1.0, 0.85, 1.15))
    frame_ax, crop_ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    if image is not None:
        u0, v0, u1, v1 = geometry.teacher_crop_box(image.shape[1], image.shape[0])
        frame_ax.imshow(image)
        frame_ax.add_patch(plt.Rectangle((u0, v0), u1 - u0, v1 - v0, fill=False, color="yellow", lw=2))
        crop_ax.imshow(image[int(v0) : int(np.ceil(v1)), int(u0) : int(np.ceil(u1))])
    else:
        frame_ax.text(0.5, 0.5, "color frame unavailable\n(dataset not at the recorded path)", ha="center")
    frame_ax.set_title(f"{sample.scene} frame {sample.frame} (teacher crop in yellow)")
    crop_ax.set_title("what the teacher sees")
    for ax in (frame_ax, crop_ax):
        ax.axis("off")
    draw_points(fig.add_subplot(grid[2], projection="3d"), sample)
    title = f"caption: {caption}" if caption else f"{sample.split}[{sample.index}]"
    if sample.random_teacher:
        title += "   (RANDOM teacher: targets are meaningless)"
    fig.suptitle(title)
    fig.subplots_adjust(top=0.8, bottom=0.08, left=0.02, right=0.97)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def camera_points(sample: StoredSample) -> np.ndarray:
    """The sample's world points in its camera's frame (x right, y down, z forward, metres)."""
    rotation, centre = sample.pose[:3, :3].astype(np.float64), sample.pose[:3, 3].astype(np.float64)
    return (sample.points - centre) @ rotation


def draw_points(ax, sample: StoredSample) -> None:
    """Points in the camera's frame, seen from just behind and above the camera, equal axes: the view reads
    like the photo. Points inside the teacher's crop keep their color; the others are grey and smaller."""
    cam = camera_points(sample)
    right, forward, up = cam[:, 0], cam[:, 2], -cam[:, 1]
    inside = sample.in_view
    ax.scatter(right[~inside], forward[~inside], up[~inside], c="0.65", s=0.8, depthshade=False)
    ax.scatter(right[inside], forward[inside], up[inside], c=sample.colors[inside] / 255.0, s=2.5, depthshade=False)
    ax.scatter([0.0], [0.0], [0.0], c="red", marker="^", s=30)
    low, high = np.minimum(cam.min(0), 0.0), np.maximum(cam.max(0), 0.0)
    middle, span = (low + high) / 2, (high - low).max() / 2
    ax.set_xlim(middle[0] - span, middle[0] + span)
    ax.set_ylim(middle[2] - span, middle[2] + span)
    ax.set_zlim(-middle[1] - span, -middle[1] + span)
    ax.set_box_aspect((1, 1, 1), zoom=1.15)
    ax.set_proj_type("persp")
    ax.view_init(elev=12, azim=-90)
    ax.set_title(
        f"{len(cam)} points seen from behind the camera (red)\nin color: {int(inside.sum())} inside the "
        f"teacher crop; grey: {int((~inside).sum())} outside"
    )
    ax.set_xlabel("right (m)")
    ax.set_ylabel("forward (m)")
    ax.set_zlabel("up (m)")


def write_ply(sample: StoredSample, out: Path) -> Path:
    """The sample's colored points as a PLY file for any point-cloud viewer."""
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(sample.points.astype(np.float64)))
    cloud.colors = o3d.utility.Vector3dVector(sample.colors.astype(np.float64) / 255.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not o3d.io.write_point_cloud(out, cloud):
        raise DataError(f"could not write {out}; check the folder is writable.")
    return out
