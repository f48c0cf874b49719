"""What every ScanNet reader yields: the camera of a scene, raw (still encoded) frames, and their decoding.

Readers never decode: they hand out encoded payloads so that a frame the planner skipped costs nothing,
and so decoding can run in worker threads. ``decode_color``/``decode_depth`` turn a payload into pixels
and raise ``FrameDecodeError`` for a single bad frame, which the caller counts as a skip.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from pkd.common.errors import DataError

DEPTH_CODECS = ("zlib_ushort", "raw_ushort", "png")


@dataclass(frozen=True)
class Camera:
    """Calibration of one scan: intrinsics of both sensors, depth-to-color transform, image sizes."""

    color_intrinsic: np.ndarray
    depth_intrinsic: np.ndarray
    depth_to_color: np.ndarray
    color_size: tuple[int, int]
    depth_size: tuple[int, int]
    depth_shift: float


@dataclass(frozen=True)
class RawFrame:
    """One frame as stored: its number, camera-to-world pose (may hold -inf: lost tracking), payloads."""

    frame: int
    pose: np.ndarray
    color: bytes
    depth: bytes
    depth_codec: str


class FrameDecodeError(DataError):
    """A single frame's payload cannot be decoded; the frame is skipped and counted, the run goes on."""


@runtime_checkable
class SceneReader(Protocol):
    """A posed RGB-D sequence: cheap poses, and payloads read only for the frames asked for."""

    name: str
    path: Path
    camera: Camera
    missing: list[int]  # frame numbers whose files are incomplete (exported layout); counted, never read

    def frame_numbers(self) -> list[int]: ...

    def pose(self, frame: int) -> np.ndarray: ...

    def read(self, frames: Sequence[int]) -> Iterator[RawFrame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> SceneReader: ...

    def __exit__(self, *exc: object) -> None: ...


def decode_color(frame: RawFrame) -> np.ndarray:
    """Decode the color payload (JPEG or PNG) to an (H, W, 3) uint8 RGB image."""
    buffer = np.frombuffer(frame.color, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise FrameDecodeError(
            f"frame {frame.frame}: color payload ({len(frame.color)} bytes) is not a decodable image"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_depth(frame: RawFrame, camera: Camera) -> np.ndarray:
    """Decode the depth payload to an (H, W) uint16 image in raw units (``camera.depth_shift`` per metre)."""
    width, height = camera.depth_size
    expected = width * height * 2
    if frame.depth_codec == "zlib_ushort":
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(frame.depth, expected + 1)
        except zlib.error as exc:
            raise FrameDecodeError(f"frame {frame.frame}: depth payload is not valid zlib data ({exc})") from exc
        depth = _ushort(frame, data, expected, width, height)
    elif frame.depth_codec == "raw_ushort":
        depth = _ushort(frame, frame.depth, expected, width, height)
    elif frame.depth_codec == "png":
        buffer = np.frombuffer(frame.depth, dtype=np.uint8)
        decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
        if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 2:
            raise FrameDecodeError(f"frame {frame.frame}: depth payload is not a 16-bit single-channel PNG")
        depth = decoded
    else:
        raise FrameDecodeError(
            f"frame {frame.frame}: unknown depth codec {frame.depth_codec!r} (expected one of {DEPTH_CODECS})"
        )
    if depth.shape != (height, width):
        raise FrameDecodeError(
            f"frame {frame.frame}: depth is {depth.shape[1]}x{depth.shape[0]}, the scan says {width}x{height}"
        )
    return depth


def _ushort(frame: RawFrame, data: bytes, expected: int, width: int, height: int) -> np.ndarray:
    if len(data) != expected:
        raise FrameDecodeError(
            f"frame {frame.frame}: depth holds {len(data)} bytes, a {width}x{height} uint16 image needs {expected}"
        )
    return np.frombuffer(data, dtype="<u2").reshape(height, width).astype(np.uint16)
