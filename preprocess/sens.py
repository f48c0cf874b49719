"""Streaming reader and writer for ScanNet's ``.sens`` files (SensorData version 4, little-endian).

Layout (ScanNet's SensReader/sensorData.h)::

    header  uint32 version (4) | uint64 strlen | sensor name | 4 x float32[4][4] intrinsic_color,
            extrinsic_color, intrinsic_depth, extrinsic_depth | int32 color_compression_type,
            depth_compression_type | uint32 color_width, color_height, depth_width, depth_height |
            float32 depth_shift | uint64 num_frames
    frame   float32[4][4] camera_to_world | uint64 timestamp_color, timestamp_depth, color_size_bytes,
            depth_size_bytes (96 bytes in all) | color bytes | depth bytes
    trailer uint64 num_imu_frames | num_imu_frames x 128-byte IMU records (absent in some exports)

A scan is several GB, so the reader never loads it: the file is opened unbuffered, a header walk
(one 96-byte read and a seek per frame) indexes offsets and poses once, and ``read`` fetches exactly the
payload bytes of the frames asked for. Memory stays flat whatever the file size.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pkd.common.errors import DataError
from pkd.preprocess.frames import Camera, RawFrame, decode_depth

VERSION = 4
COLOR_TYPES = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_TYPES = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
SUPPORTED_COLOR = ("png", "jpeg")
SUPPORTED_DEPTH = ("raw_ushort", "zlib_ushort")
FRAME_HEADER = struct.Struct("<16f4Q")
CALIBRATION = struct.Struct("<64f2i4If")
IMU_RECORD_BYTES = 128
MAX_SENSOR_NAME = 4096
_FIX = "re-download or re-export the scan"


@dataclass(frozen=True)
class _Index:
    """Where each frame lives: payload offset, stored pose and payload sizes."""

    offsets: np.ndarray
    poses: np.ndarray
    color_sizes: np.ndarray
    depth_sizes: np.ndarray


class SensReader:
    """Reader of one ``.sens`` scan; ``frame_numbers``, ``pose`` and ``read`` follow ``SceneReader``.

    ``bytes_read`` counts every byte read from the file, so callers can check that skipped frames cost
    nothing but their 96-byte header.
    """

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.bytes_read = 0
        self.missing: list[int] = []  # a .sens file holds every frame it indexes
        self._index: _Index | None = None
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open for seeks; close() ends it)
        except OSError as exc:
            raise DataError(f"cannot open {self.path} ({exc.strerror}); check the path to the ScanNet scan.") from exc
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _pread(self, size: int, offset: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (fewer only at end of file)."""
        chunks, got = [], 0
        while got < size:
            chunk = os.pread(self._file.fileno(), size - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        self.bytes_read += got
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _exact(self, size: int, offset: int, what: str) -> bytes:
        if offset + size > self._size:
            raise DataError(
                f"{self.path} is truncated: its {what} needs bytes {offset}..{offset + size} but the "
                f"file has {self._size}; {_FIX}."
            )
        data = self._pread(size, offset)
        if len(data) != size:
            raise DataError(f"{self.path}: short read of the {what} (file changed while reading?); {_FIX}.")
        return data

    def _read_header(self) -> None:
        """Parse and check the file header: sets sensor_name, camera, depth_codec and the frame count."""
        (version,) = struct.unpack("<I", self._exact(4, 0, "header"))
        if version != VERSION:
            raise DataError(
                f"{self.path} is a .sens file of version {version}; pkd reads ScanNet v2's version "
                f"{VERSION}. Convert it with ScanNet's SensReader or {_FIX}."
            )
        (strlen,) = struct.unpack("<Q", self._exact(8, 4, "header"))
        if strlen > MAX_SENSOR_NAME:
            raise DataError(
                f"{self.path}: header claims a {strlen}-byte sensor name, so the header is corrupt; {_FIX}."
            )
        sensor_name = self._exact(strlen, 12, "header").decode("utf-8", "replace")
        offset = 12 + strlen
        values = CALIBRATION.unpack(self._exact(CALIBRATION.size, offset, "header"))
        offset += CALIBRATION.size
        (num_frames,) = struct.unpack("<Q", self._exact(8, offset, "header"))
        offset += 8
        matrices = np.asarray(values[:64], dtype=np.float32).reshape(4, 4, 4).astype(np.float64)
        color_type = COLOR_TYPES.get(values[64], str(values[64]))
        depth_type = DEPTH_TYPES.get(values[65], str(values[65]))
        if color_type not in SUPPORTED_COLOR:
            raise DataError(
                f"{self.path}: color compression {color_type!r} is not supported (pkd reads "
                f"{' or '.join(SUPPORTED_COLOR)}); re-export the scan with ScanNet's tools."
            )
        if depth_type not in SUPPORTED_DEPTH:
            raise DataError(
                f"{self.path}: depth compression {depth_type!r} is not supported (pkd reads "
                f"{' or '.join(SUPPORTED_DEPTH)}); re-export the scan with ScanNet's tools."
            )
        color_w, color_h, depth_w, depth_h = values[66:70]
        depth_shift = float(values[70])
        if min(color_w, color_h, depth_w, depth_h) == 0 or not np.isfinite(depth_shift) or depth_shift <= 0:
            raise DataError(
                f"{self.path}: header has image sizes color {color_w}x{color_h}, depth "
                f"{depth_w}x{depth_h} and depth shift {depth_shift}, so it is corrupt; {_FIX}."
            )
        if not np.isfinite(matrices).all():
            raise DataError(f"{self.path}: header calibration matrices hold non-finite values; {_FIX}.")
        if num_frames == 0 or num_frames * FRAME_HEADER.size > self._size - offset:
            raise DataError(
                f"{self.path}: header says {num_frames} frames, which the file's {self._size} bytes "
                f"cannot hold; the file is truncated or corrupt, {_FIX}."
            )
        try:
            depth_to_color = np.linalg.inv(matrices[1]) @ matrices[3]
        except np.linalg.LinAlgError as exc:
            raise DataError(f"{self.path}: color extrinsic matrix is singular; {_FIX}.") from exc
        self.sensor_name, self.depth_codec = sensor_name, depth_type
        self._num_frames, self._data_start = int(num_frames), offset
        self.camera = Camera(
            color_intrinsic=matrices[0, :3, :3].copy(),
            depth_intrinsic=matrices[2, :3, :3].copy(),
            depth_to_color=depth_to_color,
            color_size=(int(color_w), int(color_h)),
            depth_size=(int(depth_w), int(depth_h)),
            depth_shift=depth_shift,
        )

    def _frames(self) -> _Index:
        """Walk the frame chain once (96-byte reads and seeks), checking every size against the file."""
        if self._index is not None:
            return self._index
        n = self._num_frames
        offsets = np.empty(n, dtype=np.int64)
        poses = np.empty((n, 4, 4), dtype=np.float32)
        color_sizes = np.empty(n, dtype=np.int64)
        depth_sizes = np.empty(n, dtype=np.int64)
        offset = self._data_start
        for i in range(n):
            values = FRAME_HEADER.unpack(self._exact(FRAME_HEADER.size, offset, f"frame {i} header"))
            color_size, depth_size = values[18], values[19]
            payload = offset + FRAME_HEADER.size
            if color_size + depth_size > self._size - payload:
                raise DataError(
                    f"{self.path} is truncated or corrupt: frame {i} of {n} claims {color_size} color "
                    f"and {depth_size} depth bytes at byte {payload}, past the end of the "
                    f"{self._size}-byte file; {_FIX}."
                )
            poses[i] = np.asarray(values[:16], dtype=np.float32).reshape(4, 4)
            offsets[i], color_sizes[i], depth_sizes[i] = payload, color_size, depth_size
            offset = payload + color_size + depth_size
        self._check_trailer(offset)
        self._index = _Index(offsets, poses, color_sizes, depth_sizes)
        return self._index

    def _check_trailer(self, end: int) -> None:
        """After the last frame only the IMU block may follow; anything else means num_frames is wrong."""
        rest = self._size - end
        if rest == 0:
            return
        if rest >= 8:
            (num_imu,) = struct.unpack("<Q", self._exact(8, end, "IMU block"))
            if rest == 8 + num_imu * IMU_RECORD_BYTES:
                return
        raise DataError(
            f"{self.path}: header says {self._num_frames} frames, but {rest} bytes after the last one "
            f"are not an IMU block, so num_frames does not match the file; {_FIX}."
        )

    def frame_numbers(self) -> list[int]:
        """All frames of the scan: 0 .. num_frames-1."""
        return list(range(len(self._frames().offsets)))

    def pose(self, frame: int) -> np.ndarray:
        """Stored camera-to-world pose of a frame (float32; -inf where tracking was lost)."""
        return self._frames().poses[self._position(frame)].copy()

    def _position(self, frame: int) -> int:
        if not 0 <= frame < self._num_frames:
            raise IndexError(f"{self.path} has frames 0..{self._num_frames - 1}, not {frame}")
        return frame

    def read(self, frames: Sequence[int]) -> Iterator[RawFrame]:
        """Yield the given frames in the given order, reading only their payloads."""
        index = self._frames()
        for frame in frames:
            i = self._position(frame)
            offset, color_size = int(index.offsets[i]), int(index.color_sizes[i])
            color = self._exact(color_size, offset, f"frame {i} color")
            depth = self._exact(int(index.depth_sizes[i]), offset + color_size, f"frame {i} depth")
            yield RawFrame(frame=i, pose=index.poses[i].copy(), color=color, depth=depth, depth_codec=self.depth_codec)

    def close(self) -> None:
        """Close the file; the reader cannot be used afterwards."""
        self._file.close()

    def __enter__(self) -> SensReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_sens(
    path: str | Path,
    camera: Camera,
    frames: Iterable[RawFrame | tuple[np.ndarray, bytes, np.ndarray]],
    sensor_name: str = "pkd",
) -> Path:
    """Write a version-4 ``.sens`` (JPEG color, zlib_ushort depth) atomically: temp file, then rename.

    ``frames`` yields ``RawFrame``s (depth in any codec of ``frames.DEPTH_CODECS``) or
    ``(pose, jpeg_bytes, depth_uint16_array)`` tuples; color must already be JPEG-encoded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(_header(camera, sensor_name, 0))
            count = 0
            for item in frames:
                pose, color, depth = _frame_parts(item, camera)
                out.write(FRAME_HEADER.pack(*pose.ravel().tolist(), 0, 0, len(color), len(depth)))
                out.write(color)
                out.write(depth)
                count += 1
            out.write(struct.pack("<Q", 0))  # no IMU frames
            out.seek(0)
            out.write(_header(camera, sensor_name, count))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _header(camera: Camera, sensor_name: str, num_frames: int) -> bytes:
    def mat4(intrinsic: np.ndarray) -> list[float]:
        m = np.eye(4)
        m[:3, :3] = np.asarray(intrinsic)[:3, :3]
        return m.ravel().tolist()

    name = sensor_name.encode()
    matrices = mat4(camera.color_intrinsic) + np.eye(4).ravel().tolist() + mat4(camera.depth_intrinsic)
    matrices += np.asarray(camera.depth_to_color, dtype=np.float64).ravel().tolist()
    calibration = CALIBRATION.pack(*matrices, 2, 1, *camera.color_size, *camera.depth_size, camera.depth_shift)
    return struct.pack("<IQ", VERSION, len(name)) + name + calibration + struct.pack("<Q", num_frames)


def _frame_parts(item: RawFrame | tuple, camera: Camera) -> tuple[np.ndarray, bytes, bytes]:
    """(pose, jpeg, zlib depth) of one frame to write, whatever form it came in."""
    if isinstance(item, RawFrame):
        pose, color = item.pose, item.color
        depth = item.depth if item.depth_codec == "zlib_ushort" else decode_depth(item, camera)
    else:
        pose, color, depth = item
    if bytes(color[:2]) != b"\xff\xd8":
        raise ValueError("write_sens: color payloads must be JPEG-encoded bytes")
    if isinstance(depth, np.ndarray):
        width, height = camera.depth_size
        if depth.dtype != np.uint16 or depth.shape != (height, width):
            raise ValueError(
                f"write_sens: depth must be uint16 of shape {(height, width)}, got {depth.dtype} {depth.shape}"
            )
        depth = zlib.compress(depth.astype("<u2").tobytes(), 6)
    return np.asarray(pose, dtype=np.float32).reshape(4, 4), bytes(color), bytes(depth)
