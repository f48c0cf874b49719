"""Reader for ScanNet scans already exported to files (ScanNet's SensReader export, as Pointcept/OpenScene
use them)::

    <scene>/color/N.jpg   depth/N.png (uint16 mm)   pose/N.txt (4x4 camera-to-world)
            intrinsic/intrinsic_color.txt, intrinsic_depth.txt, [extrinsic_color.txt, extrinsic_depth.txt]
            [<scene>.txt with colorWidth/colorHeight/depthWidth/depthHeight]

Frame numbers are the file stems (ScanNet does not zero-pad them; padded names are read too). Only
frames with all three files count; the others are listed in ``missing``. Frames from another sensor
use the same layout; ``depth_scale`` gives their depth units per metre (1000: millimetres, as ScanNet).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pkd.common.errors import DataError
from pkd.preprocess.frames import Camera, RawFrame

DEPTH_SHIFT = 1000.0
_PARTS = (("color", ".jpg"), ("depth", ".png"), ("pose", ".txt"))


class ExportedReader:
    """Reader of one exported scene folder; follows ``SceneReader``.

    A pose file that exists but cannot be parsed does not stop the scan: ``pose()`` returns a matrix
    of NaN for that frame, so the planner counts it as an invalid pose like ScanNet's -inf poses.
    """

    def __init__(self, scene_dir: str | Path, name: str | None = None, depth_scale: float = DEPTH_SHIFT):
        if not depth_scale > 0:
            raise DataError(
                f"depth scale {depth_scale} of {scene_dir} must be positive (depth units per metre: "
                "1000 for millimetres)."
            )
        self.depth_scale = float(depth_scale)
        self.path = Path(scene_dir)
        self.name = name or self.path.name
        self.bytes_read = 0
        if not self.path.is_dir():
            raise DataError(f"{self.path} is not a directory; pass an exported ScanNet scene folder.")
        for part, _ in _PARTS:
            if not (self.path / part).is_dir():
                raise DataError(
                    f"{self.path} has no {part}/ folder; an exported scene needs color/, depth/, pose/ "
                    "and intrinsic/ (re-export the scan with ScanNet's SensReader)."
                )
        files = [_numbered_files(self.path / part, suffix) for part, suffix in _PARTS]
        complete = set(files[0]).intersection(*files[1:])
        if not complete:
            raise DataError(
                f"{self.path}: no frame has all of color/N.jpg, depth/N.png and pose/N.txt "
                f"({', '.join(f'{len(f)} {p}' for f, (p, _) in zip(files, _PARTS))} files); "
                "re-export the scan."
            )
        self._frames = sorted(complete)
        color, depth, pose = files
        self._files = {frame: (color[frame], depth[frame], pose[frame]) for frame in self._frames}
        self.missing: list[int] = sorted(set().union(*files) - complete)
        self.camera = self._read_camera()

    def _read_camera(self) -> Camera:
        folder = self.path / "intrinsic"
        if not folder.is_dir():
            raise DataError(
                f"{self.path} has no intrinsic/ folder with intrinsic_color.txt and intrinsic_depth.txt; "
                "re-export the scan with ScanNet's SensReader."
            )
        color_k = _matrix(folder / "intrinsic_color.txt")[:3, :3]
        depth_k = _matrix(folder / "intrinsic_depth.txt")[:3, :3]
        extrinsics = [_matrix(folder / f"extrinsic_{s}.txt", optional=True) for s in ("color", "depth")]
        try:
            depth_to_color = np.linalg.inv(extrinsics[0]) @ extrinsics[1]
        except np.linalg.LinAlgError as exc:
            raise DataError(f"{folder / 'extrinsic_color.txt'} is singular; re-export the scan.") from exc
        meta = self._meta()
        first_color, first_depth, _ = self._files[self._frames[0]]
        return Camera(
            color_intrinsic=color_k,
            depth_intrinsic=depth_k,
            depth_to_color=depth_to_color,
            color_size=_size(meta, "color", first_color),
            depth_size=_size(meta, "depth", first_depth),
            depth_shift=self.depth_scale,
        )

    def _meta(self) -> dict[str, str]:
        """``key = value`` lines of ``<scene>.txt`` (ScanNet's scan metadata), empty when absent."""
        meta_file = self.path / f"{self.name}.txt"
        if not meta_file.is_file():
            return {}
        pairs = (line.split("=", 1) for line in meta_file.read_text(errors="replace").splitlines() if "=" in line)
        return {key.strip(): value.strip() for key, value in pairs}

    def frame_numbers(self) -> list[int]:
        """Frames that have color, depth and pose files, ascending."""
        return list(self._frames)

    def pose(self, frame: int) -> np.ndarray:
        """Camera-to-world pose from ``pose/N.txt`` as float32; all NaN when the file is unreadable."""
        pose_file = self._paths(frame)[2]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pose = np.loadtxt(pose_file, dtype=np.float64, ndmin=2)
        except (OSError, ValueError):
            return np.full((4, 4), np.nan, dtype=np.float32)
        if pose.shape != (4, 4):
            return np.full((4, 4), np.nan, dtype=np.float32)
        return pose.astype(np.float32)

    def read(self, frames: Sequence[int]) -> Iterator[RawFrame]:
        """Yield the given frames in order; an unreadable image file gives an empty (undecodable) payload."""
        for frame in frames:
            color_file, depth_file, _ = self._paths(frame)
            color, depth = self._bytes(color_file), self._bytes(depth_file)
            yield RawFrame(frame=frame, pose=self.pose(frame), color=color, depth=depth, depth_codec="png")

    def _bytes(self, file: Path) -> bytes:
        try:
            data = file.read_bytes()
        except OSError:
            return b""
        self.bytes_read += len(data)
        return data

    def _paths(self, frame: int) -> tuple[Path, Path, Path]:
        try:
            return self._files[frame]
        except KeyError:
            raise IndexError(f"{self.path} has no complete frame {frame}") from None

    def close(self) -> None:
        """Nothing to release: files are opened per frame."""

    def __enter__(self) -> ExportedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numbered_files(folder: Path, suffix: str) -> dict[int, Path]:
    """Files named <frame number><suffix> in a folder, by frame number."""
    return {int(p.stem): p for p in folder.iterdir() if p.suffix == suffix and p.stem.isdigit()}


def _matrix(file: Path, optional: bool = False) -> np.ndarray:
    """A 4x4 (or 3x3, padded) matrix from a whitespace-separated text file."""
    if optional and not file.exists():
        return np.eye(4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = np.loadtxt(file, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read a matrix from {file} ({exc}); re-export the scan's intrinsic/ folder.") from exc
    if m.shape == (3, 3):
        m = np.pad(m, ((0, 1), (0, 1)))
        m[3, 3] = 1.0
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise DataError(
            f"{file} must hold a finite 4x4 matrix, it holds shape {m.shape}; re-export the scan's intrinsic/ folder."
        )
    return m


def _size(meta: dict[str, str], kind: str, first_image: Path) -> tuple[int, int]:
    """(width, height) of the color or depth images: from the scan metadata, else the first image's header."""
    try:
        return int(meta[f"{kind}Width"]), int(meta[f"{kind}Height"])
    except (KeyError, ValueError):
        pass
    try:
        with Image.open(first_image) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read the {kind} image size from {first_image} ({exc}); re-export the scan.") from exc
