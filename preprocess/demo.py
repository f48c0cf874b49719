"""A small synthetic scene in real ScanNet formats, so the whole pipeline runs without the dataset.

A textured room (floor, ceiling, four walls, a table with a ball on it, a bed and a cabinet) is ray-cast
in numpy along a smooth camera loop. World frame is z-up like ScanNet; cameras follow OpenCV (x right,
y down, z forward). Color and depth are rendered separately through their own intrinsics, both
640x480, from the same camera centre (depth-to-color is the identity, as in ScanNet). One frame (see
``lost_tracking_frame``) carries ScanNet's lost-tracking pose, all -inf, so the skip path is exercised.
``write_demo_scenes`` adds a second capture of the room (``VAL_SCENE``, another seed: colours, texture and
camera path) under a name in the official val list, so a prep of the tree has a held-out split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from pkd.common.errors import ConfigError
from pkd.preprocess.demo_mesh import write_demo_mesh, write_demo_splits
from pkd.preprocess.frames import Camera
from pkd.preprocess.sens import write_sens

WIDTH, HEIGHT = 640, 480
MAX_DEPTH_MM = 10_000
LAYOUTS = ("both", "sens", "exported")
# ScanNet-like intrinsics at 640x480, chosen exactly representable in float32 and in "%f" text, so the
# .sens and exported copies of the scene carry identical numbers.
DEPTH_K = np.array([[577.875, 0.0, 319.5], [0.0, 577.875, 239.5], [0.0, 0.0, 1.0]])
COLOR_K = np.array([[578.5, 0.0, 319.75], [0.0, 580.25, 239.875], [0.0, 0.0, 1.0]])
ROOM = (np.array([0.0, 0.0, 0.0]), np.array([6.0, 5.0, 2.7]))
BOXES = (  # table, bed, cabinet: (min corner, max corner)
    (np.array([2.55, 2.1, 0.0]), np.array([3.45, 2.9, 0.75])),
    (np.array([0.15, 0.3, 0.0]), np.array([1.15, 2.2, 0.55])),
    (np.array([4.85, 3.4, 0.0]), np.array([5.85, 4.85, 1.9])),
)
SPHERE = (np.array([3.0, 2.5, 1.0]), 0.25)
SPHERE_ID = 6 + len(BOXES)  # surface ids: 0-5 room faces (2 * axis + side), then boxes, then the sphere
LIGHT = np.array([0.3, 0.5, 0.81])
SCENE = "scene9000_00"  # in no official list: prep puts it in train
VAL_SCENE = "scene0011_00"  # the first scene of the official val list (data_manifests/scannetv2_val.txt)


def demo_camera() -> Camera:
    """The calibration of the demo scene."""
    return Camera(
        color_intrinsic=COLOR_K.copy(),
        depth_intrinsic=DEPTH_K.copy(),
        depth_to_color=np.eye(4),
        color_size=(WIDTH, HEIGHT),
        depth_size=(WIDTH, HEIGHT),
        depth_shift=1000.0,
    )


def lost_tracking_frame(num_frames: int) -> int | None:
    """The frame whose stored pose is all -inf: 100, or the last multiple of 25 in shorter scenes."""
    frame = min(100, 25 * ((num_frames - 1) // 25))
    return frame if frame > 0 else None


def write_demo_scenes(out: str | Path, num_frames: int = 250, layout: str = "both", seed: int = 0) -> list[Path]:
    """The demo scene (``write_demo_scene``, exactly as alone) and its held-out capture ``VAL_SCENE`` (seed
    ``seed + 1``, no split lists of its own: ``out/splits/`` keep naming the first scene, as the segmentation
    and detection demos read them); returns both scene folders."""
    first = write_demo_scene(out, num_frames, layout, seed)
    return [first, write_demo_scene(out, num_frames, layout, seed + 1, VAL_SCENE, splits=False)]


def write_demo_scene(
    out: str | Path,
    num_frames: int = 250,
    layout: str = "both",
    seed: int = 0,
    name: str = SCENE,
    splits: bool = True,
) -> Path:
    """Write the synthetic scene under ``out/scans/<name>/`` as a .sens and/or the exported layout, plus its
    labelled mesh (``<name>_vh_clean_2[.labels].ply``), instance annotations (segs.json, aggregation.json,
    ``<name>.txt`` with axisAlignment) and (``splits``) ``out/splits/`` lists naming it; returns the scene
    folder. Deterministic given ``seed``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not a demo layout; choose one of {', '.join(LAYOUTS)}.")
    if num_frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {num_frames}.")
    scene = Path(out) / "scans" / name
    for part in ("color", "depth", "pose", "intrinsic"):
        shutil.rmtree(scene / part, ignore_errors=True)
    (scene / f"{name}.sens").unlink(missing_ok=True)
    scene.mkdir(parents=True, exist_ok=True)
    renderer = _Renderer(np.random.default_rng(seed))
    camera = demo_camera()
    lost = lost_tracking_frame(num_frames)
    exported = layout in ("both", "exported")
    if exported:
        _write_exported_meta(scene, camera)

    def frames():
        for i, pose in enumerate(renderer.path(num_frames)):
            color, depth = renderer.render(pose)
            jpeg = cv2.imencode(".jpg", cv2.cvtColor(color, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
            stored = np.full((4, 4), -np.inf, dtype=np.float32) if i == lost else pose.astype(np.float32)
            if exported:
                (scene / "color" / f"{i}.jpg").write_bytes(jpeg.tobytes())
                cv2.imwrite(str(scene / "depth" / f"{i}.png"), depth)
                np.savetxt(scene / "pose" / f"{i}.txt", stored, fmt="%.9g")
            yield stored, jpeg.tobytes(), depth

    if layout in ("both", "sens"):
        write_sens(scene / f"{name}.sens", camera, frames(), sensor_name="pkd-demo")
    else:
        for _ in frames():
            pass
    write_demo_mesh(scene, ROOM, BOXES, SPHERE, seed, meta=_scan_meta(camera, num_frames))
    if splits:
        write_demo_splits(Path(out), name)
    return scene


def _write_exported_meta(scene: Path, camera: Camera) -> None:
    for part in ("color", "depth", "pose", "intrinsic"):
        (scene / part).mkdir()
    for label, k in (("color", camera.color_intrinsic), ("depth", camera.depth_intrinsic)):
        k4 = np.eye(4)
        k4[:3, :3] = k
        np.savetxt(scene / "intrinsic" / f"intrinsic_{label}.txt", k4, fmt="%f")
        np.savetxt(scene / "intrinsic" / f"extrinsic_{label}.txt", np.eye(4), fmt="%f")


def _scan_meta(camera: Camera, num_frames: int) -> list[str]:
    """The ``key = value`` lines of ``<scene>.txt`` after its axisAlignment (ScanNet writes them for every scan)."""
    return [
        f"colorHeight = {camera.color_size[1]}",
        f"colorWidth = {camera.color_size[0]}",
        f"depthHeight = {camera.depth_size[1]}",
        f"depthWidth = {camera.depth_size[0]}",
        f"numColorFrames = {num_frames}",
        f"numDepthFrames = {num_frames}",
        "sceneType = Demo",
    ]


class _Renderer:
    """Vectorised ray caster of the demo room; the seed picks colors, texture noise and the path phase.

    Rays are (3, H, W) directions with camera z = 1, so a hit's ray parameter is its z-depth. Every ray
    meets the room; furniture is tested only on the pixels its projected bounding box covers.
    """

    def __init__(self, rng: np.random.Generator):
        self.base_colors = rng.uniform(0.35, 0.95, size=(SPHERE_ID + 1, 3)).astype(np.float32)
        self.noise = rng.random(32**3, dtype=np.float32)
        self.phase = float(rng.uniform(0, 2 * np.pi))
        u, v = np.meshgrid(np.arange(WIDTH, dtype=np.float64), np.arange(HEIGHT, dtype=np.float64))
        pixels = np.stack([u, v, np.ones_like(u)])
        self.intrinsics = {"color": COLOR_K, "depth": DEPTH_K}
        self.rays = {
            name: np.einsum("ij,jhw->ihw", np.linalg.inv(k), pixels).astype(np.float32)
            for name, k in self.intrinsics.items()
        }

    def path(self, num_frames: int) -> list[np.ndarray]:
        """Camera-to-world poses along an ellipse around the table, looking inwards and slightly down."""
        poses = []
        for i in range(num_frames):
            angle = self.phase + 2 * np.pi * i / max(num_frames, 100)
            centre = np.array([3.0 + 1.8 * np.cos(angle), 2.5 + 1.4 * np.sin(angle), 1.45 + 0.1 * np.sin(3 * angle)])
            yaw = angle + np.pi + 0.35 * np.sin(2 * angle)
            pitch = -0.25 + 0.08 * np.cos(angle)
            forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
            right = np.cross(forward, [0.0, 0.0, 1.0])
            right /= np.linalg.norm(right)
            pose = np.eye(4)
            pose[:3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
            pose[:3, 3] = centre
            poses.append(pose)
        return poses

    def render(self, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(color (H, W, 3) uint8 RGB, depth (H, W) uint16 mm) seen from a camera-to-world pose."""
        t, _, _ = self._cast(pose, "depth", shading=False)
        depth_mm = np.rint(t * 1000.0)
        depth = np.where((depth_mm > 0) & (depth_mm <= MAX_DEPTH_MM), depth_mm, 0).astype(np.uint16)
        t, surface, normal = self._cast(pose, "color", shading=True)
        directions = np.einsum("ij,jhw->ihw", pose[:3, :3].astype(np.float32), self.rays["color"])
        points = pose[:3, 3].astype(np.float32)[:, None, None] + t * directions
        return self._shade(points, surface, normal), depth

    def _cast(self, pose: np.ndarray, camera: str, shading: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest hit per pixel: z-depth t and, when shading, surface id and normal as a signed axis code
        (+-1..3; 0 on the sphere)."""
        origin = pose[:3, 3].astype(np.float32)
        d = np.einsum("ij,jhw->ihw", pose[:3, :3].astype(np.float32), self.rays[camera])
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            # Inside the room one slab distance is negative and the other the exit: take the larger.
            exits = [
                np.maximum(np.float32(lo - o) * inv_k, np.float32(hi - o) * inv_k)
                for lo, hi, o, inv_k in zip(ROOM[0], ROOM[1], origin, inv)
            ]
            t = np.minimum(np.minimum(exits[0], exits[1]), exits[2])
            surface, normal = np.zeros(t.shape, dtype=np.int8), np.zeros(t.shape, dtype=np.int8)
            if shading:
                axis = np.where(exits[1] == t, 1, 0).astype(np.int8)
                axis[exits[2] == t] = 2
                forward = np.take_along_axis(d, axis[None].astype(np.intp), axis=0)[0] > 0
                surface = 2 * axis + forward
                normal = np.where(forward, -1, 1).astype(np.int8) * (axis + 1)
            for b, (bmin, bmax) in enumerate(BOXES):
                window = self._window(pose, camera, bmin, bmax)
                if window is not None:
                    rays = (slice(None), *window)
                    self._hit_box(
                        origin,
                        d[rays],
                        inv[rays],
                        bmin,
                        bmax,
                        6 + b,
                        t[window],
                        surface[window],
                        normal[window],
                        shading,
                    )
            centre, radius = SPHERE
            window = self._window(pose, camera, centre - radius, centre + radius)
            if window is not None:
                rays = (slice(None), *window)
                self._hit_sphere(origin, d[rays], t[window], surface[window], normal[window], shading)
        return t, surface, normal

    def _window(self, pose: np.ndarray, camera: str, bmin: np.ndarray, bmax: np.ndarray) -> tuple[slice, slice] | None:
        """Pixel rectangle covering a world box's projection; None when it lies behind the camera."""
        corners = np.array(np.meshgrid(*zip(bmin, bmax))).reshape(3, -1).T
        cam = (corners - pose[:3, 3]) @ pose[:3, :3]
        if (cam[:, 2] <= 0).all():
            return None
        if (cam[:, 2] <= 0.05).any():
            return slice(None), slice(None)
        uv = cam @ self.intrinsics[camera].T
        uv = uv[:, :2] / uv[:, 2:]
        u0, v0 = np.floor(uv.min(axis=0)).astype(int) - 1
        u1, v1 = np.ceil(uv.max(axis=0)).astype(int) + 2
        if u1 <= 0 or v1 <= 0 or u0 >= WIDTH or v0 >= HEIGHT:
            return None
        return slice(max(v0, 0), min(v1, HEIGHT)), slice(max(u0, 0), min(u1, WIDTH))

    @staticmethod
    def _hit_box(origin, d, inv, bmin, bmax, surface_id, t, surface, normal, shading) -> None:
        """Slab test of an axis-aligned box; updates the (view) arrays t, surface, normal where it is nearer."""
        near, far = [], []
        for k in range(3):
            t1 = np.float32(bmin[k] - origin[k]) * inv[k]
            t2 = np.float32(bmax[k] - origin[k]) * inv[k]
            near.append(np.minimum(t1, t2))
            far.append(np.maximum(t1, t2))
        t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
        hit = (t_near <= np.minimum(np.minimum(far[0], far[1]), far[2])) & (t_near > 0) & (t_near < t)
        t[hit] = t_near[hit]
        if shading:
            axis = np.where(near[1] == t_near, 1, 0)
            axis[near[2] == t_near] = 2
            axis = axis[hit]
            forward = d[(axis,) + np.nonzero(hit)] > 0
            surface[hit] = surface_id
            normal[hit] = np.where(forward, -1, 1) * (axis + 1)

    @staticmethod
    def _hit_sphere(origin, d, t, surface, normal, shading) -> None:
        centre, radius = SPHERE
        oc = (origin - centre).astype(np.float32)
        a = (d * d).sum(axis=0)
        half_b = np.einsum("i,ihw->hw", oc, d)
        disc = half_b * half_b - a * np.float32(oc @ oc - radius * radius)
        t_sphere = (-half_b - np.sqrt(disc)) / a
        hit = (disc > 0) & (t_sphere > 0) & (t_sphere < t)
        t[hit] = t_sphere[hit]
        if shading:
            surface[hit], normal[hit] = SPHERE_ID, 0

    def _shade(self, points: np.ndarray, surface: np.ndarray, normal: np.ndarray) -> np.ndarray:
        """Per-surface base color x blocky 3D noise texture x checker x Lambert shading, as (H, W, 3) uint8.

        Texture cells (1/12 m) and checker squares (1/2 m) are offset so no surface plane lies on a boundary."""
        cells = np.floor(points * 12.0 + 0.5).astype(np.int32)
        texture = np.take(self.noise, ((cells[0] & 31) * 32 + (cells[1] & 31)) * 32 + (cells[2] & 31))
        checker = ((cells // 6).sum(axis=0, dtype=np.int32) & 1).astype(np.float32)
        light = LIGHT.astype(np.float32)
        lambert = np.abs(light)[np.abs(normal) - 1]
        sphere = surface == SPHERE_ID
        centre, radius = SPHERE
        lambert[sphere] = np.abs(light @ (points[:, sphere] - centre[:, None].astype(np.float32))) / radius
        shade = (0.55 + 0.35 * texture + 0.1 * checker) * (0.45 + 0.55 * lambert) * 255.0
        return (self.base_colors[surface] * shade[..., None]).astype(np.uint8)
