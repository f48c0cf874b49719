"""ScanNet readers (.sens streaming, exported layout), scene discovery, the .sens writer and the demo scene."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pkd.common.errors import ConfigError, DataError
from pkd.preprocess.demo import lost_tracking_frame, write_demo_scene
from pkd.preprocess.exported import ExportedReader
from pkd.preprocess.frames import Camera, FrameDecodeError, RawFrame, SceneReader, decode_color, decode_depth
from pkd.preprocess.scenes import SceneEntry, find_scenes, open_scene
from pkd.preprocess.sens import FRAME_HEADER, SensReader, write_sens

from conftest import require_fixture

REAL_SCENE = "scannet_sample/scans_test/scene0707_00"
SMALL = (80, 60)


def _camera(size: tuple[int, int] = SMALL) -> Camera:
    k = np.array([[70.0, 0.0, size[0] / 2], [0.0, 70.0, size[1] / 2], [0.0, 0.0, 1.0]])
    return Camera(k, k.copy(), np.eye(4), size, size, 1000.0)


def _jpeg(rng: np.random.Generator, size: tuple[int, int] = SMALL) -> bytes:
    image = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def _frames(n: int, seed: int = 0, size: tuple[int, int] = SMALL) -> list[tuple[np.ndarray, bytes, np.ndarray]]:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        pose = np.eye(4, dtype=np.float32)
        pose[:3, 3] = (i, 2 * i, 0.5)
        depth = rng.integers(0, 5000, size=(size[1], size[0]), dtype=np.uint16)
        frames.append((pose, _jpeg(rng, size), depth))
    return frames


def _small_sens(path: Path, n: int = 3) -> Path:
    return write_sens(path, _camera(), _frames(n))


def _rchar() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- .sens --------------------------------------------------------------------------------------


def test_sens_round_trip_of_real_scannet_frames(tmp_path):
    scene = require_fixture(REAL_SCENE)
    k_color = np.loadtxt(scene / "intrinsic" / "intrinsic_color.txt")
    k_depth = np.loadtxt(scene / "intrinsic" / "intrinsic_depth.txt")
    frames, originals = [], []
    for i in range(3):
        jpeg = (scene / "color" / f"{i}.jpg").read_bytes()
        depth = cv2.imread(str(scene / "depth" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        pose = np.loadtxt(scene / "pose" / f"{i}.txt").astype(np.float32)
        frames.append((pose, jpeg, depth))
        originals.append((pose, jpeg, depth))
    color_size = cv2.imdecode(np.frombuffer(frames[0][1], np.uint8), cv2.IMREAD_COLOR).shape[1::-1]
    camera = Camera(k_color[:3, :3], k_depth[:3, :3], np.eye(4), tuple(color_size), (640, 480), 1000.0)
    path = write_sens(tmp_path / "scene0707_00.sens", camera, frames)

    with SensReader(path) as reader:
        assert isinstance(reader, SceneReader)
        assert reader.name == "scene0707_00"
        assert reader.frame_numbers() == [0, 1, 2]
        cam = reader.camera
        np.testing.assert_array_equal(cam.color_intrinsic, k_color[:3, :3].astype(np.float32))
        np.testing.assert_array_equal(cam.depth_intrinsic, k_depth[:3, :3].astype(np.float32))
        np.testing.assert_array_equal(cam.depth_to_color, np.eye(4))
        assert (cam.color_size, cam.depth_size, cam.depth_shift) == ((1296, 968), (640, 480), 1000.0)
        for i, (pose, _, _) in enumerate(originals):
            np.testing.assert_array_equal(reader.pose(i), pose)
        raws = list(reader.read([0, 1, 2]))
    for raw, (pose, jpeg, depth) in zip(raws, originals, strict=True):
        assert raw.color == jpeg
        assert raw.depth_codec == "zlib_ushort"
        np.testing.assert_array_equal(raw.pose, pose)
        decoded = decode_depth(raw, camera)
        assert decoded.dtype == np.uint16
        np.testing.assert_array_equal(decoded, depth)
        rgb = decode_color(raw)
        assert rgb.shape == (968, 1296, 3)
        np.testing.assert_array_equal(rgb, cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])


def test_sens_reads_only_the_requested_frames(tmp_path):
    frames = _frames(60)
    path = write_sens(tmp_path / "seq.sens", _camera(), frames)
    wanted = [50, 0, 25]
    rchar = _rchar()
    with SensReader(path) as reader:
        raws = list(reader.read(wanted))
        used = reader.bytes_read
        header = reader._data_start
    rchar_used = None if rchar is None else _rchar() - rchar
    assert [r.frame for r in raws] == wanted
    for raw in raws:
        pose, jpeg, depth = frames[raw.frame]
        assert raw.color == jpeg
        np.testing.assert_array_equal(decode_depth(raw, _camera()), depth)
    payloads = sum(len(r.color) + len(r.depth) for r in raws)
    expected = header + 60 * FRAME_HEADER.size + payloads + 8  # + the IMU count after the last frame
    assert used == expected
    assert path.stat().st_size > 8 * expected  # the bound below would catch reading skipped payloads
    if rchar_used is not None:
        assert rchar_used <= expected + 4096, f"read {rchar_used} bytes, the frames asked for need {expected}"


def test_sens_memory_stays_flat(tmp_path):
    frames = _frames(40, size=(160, 120))
    path = write_sens(tmp_path / "seq.sens", _camera((160, 120)), frames)
    largest = max(len(jpeg) + depth.nbytes for _, jpeg, depth in frames)
    with SensReader(path) as reader:
        reader.frame_numbers()
        tracemalloc.start()
        for raw in reader.read(reader.frame_numbers()):
            del raw
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert path.stat().st_size > 10 * largest
    assert peak < 3 * largest


def test_sens_keeps_lost_tracking_poses(tmp_path):
    frames = _frames(3)
    frames[1] = (np.full((4, 4), -np.inf, dtype=np.float32), *frames[1][1:])
    with SensReader(write_sens(tmp_path / "s.sens", _camera(), frames)) as reader:
        assert np.isneginf(reader.pose(1)).all()
        assert np.isneginf(next(reader.read([1])).pose).all()
        with pytest.raises(IndexError):
            reader.pose(3)


def test_sens_writer_accepts_raw_frames_in_any_depth_codec(tmp_path):
    ((pose, jpeg, depth),) = _frames(1)
    png = cv2.imencode(".png", depth)[1].tobytes()
    raws = [RawFrame(0, pose, jpeg, png, "png"), RawFrame(1, pose, jpeg, depth.tobytes(), "raw_ushort")]
    with SensReader(write_sens(tmp_path / "s.sens", _camera(), raws)) as reader:
        for raw in reader.read([0, 1]):
            np.testing.assert_array_equal(decode_depth(raw, reader.camera), depth)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="JPEG"):
        write_sens(tmp_path / "bad.sens", _camera(), [(pose, png, depth)])
    assert not (tmp_path / "bad.sens").exists() and not list(tmp_path.glob(".*.tmp"))


def test_sens_accepts_an_imu_block(tmp_path):
    path = _small_sens(tmp_path / "s.sens")
    data = bytearray(path.read_bytes())
    data[-8:] = struct.pack("<Q", 2)
    path.write_bytes(bytes(data) + bytes(2 * 128))
    with SensReader(path) as reader:
        assert reader.frame_numbers() == [0, 1, 2]


def _layout(path: Path) -> dict[str, int]:
    """Byte offsets of fields in a file written by write_sens (sensor name "pkd")."""
    calibration = 4 + 8 + 3
    with SensReader(path) as reader:
        index = reader._frames()
        start = reader._data_start
    return {
        "color_type": calibration + 256,
        "depth_type": calibration + 260,
        "num_frames": start - 8,
        "data": start,
        "frame1": int(index.offsets[1]) - FRAME_HEADER.size,
        "frame2_payload": int(index.offsets[2]),
        "size": path.stat().st_size,
    }


def _patch(path: Path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p, at: _patch(p, 0, "<I", 3), "version 3"),
        (lambda p, at: _patch(p, at["color_type"], "<i", -1), "color compression 'unknown'"),
        (lambda p, at: _patch(p, at["color_type"], "<i", 0), "color compression 'raw'"),
        (lambda p, at: _patch(p, at["depth_type"], "<i", 2), "depth compression 'occi_ushort'"),
        (lambda p, at: _patch(p, at["depth_type"], "<i", 7), "depth compression '7'"),
        (lambda p, at: _truncate(p, 2), "truncated"),
        (lambda p, at: _truncate(p, 100), "truncated"),
        (lambda p, at: _truncate(p, at["data"] - 4), "truncated"),
        (lambda p, at: _patch(p, at["num_frames"], "<Q", 10**12), "says 1000000000000 frames"),
        (lambda p, at: _patch(p, 4, "<Q", 2**40), "sensor name"),
    ],
    ids=[
        "version",
        "color-unknown",
        "color-raw",
        "depth-occi",
        "depth-bogus",
        "tiny",
        "in-calibration",
        "in-num-frames",
        "num-frames-huge",
        "sensor-name-huge",
    ],
)
def test_sens_header_errors(tmp_path, corrupt, match):
    path = _small_sens(tmp_path / "s.sens")
    corrupt(path, _layout(path))
    with pytest.raises(DataError, match=match) as err:
        SensReader(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p, at: _truncate(p, at["frame1"] + 50), "frame 1 header"),
        (lambda p, at: _truncate(p, at["frame2_payload"] + 10), "frame 2 of 3"),
        (lambda p, at: _patch(p, at["data"] + 80, "<Q", 2**31), "frame 0 of 3 claims 2147483648 color"),
        (lambda p, at: _patch(p, at["data"] + 88, "<Q", 2**63), "frame 0 of 3"),
        (lambda p, at: _patch(p, at["num_frames"], "<Q", 2), "header says 2 frames"),
        (lambda p, at: _patch(p, at["num_frames"], "<Q", 4), "frame 3 header"),
    ],
    ids=["frame-header", "payload", "absurd-color-size", "absurd-depth-size", "num-frames-short", "num-frames-long"],
)
def test_sens_frame_chain_errors(tmp_path, corrupt, match):
    path = _small_sens(tmp_path / "s.sens")
    corrupt(path, _layout(path))
    tracemalloc.start()
    started = time.perf_counter()
    with SensReader(path) as reader, pytest.raises(DataError, match=match) as err:
        reader.frame_numbers()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(path) in str(err.value) and "re-download" in str(err.value)
    assert time.perf_counter() - started < 2.0 and peak < 10**6  # nothing was allocated for absurd sizes


def test_sens_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        SensReader(tmp_path / "nope.sens")


# --- decoding -----------------------------------------------------------------------------------


def test_decode_errors_are_frame_decode_errors():
    camera = _camera()
    ((pose, jpeg, depth),) = _frames(1)
    assert issubclass(FrameDecodeError, DataError)
    cases = [
        (decode_color, RawFrame(7, pose, b"not a jpeg", b"", "png")),
        (decode_color, RawFrame(7, pose, b"", b"", "png")),
        (lambda f: decode_depth(f, camera), RawFrame(7, pose, jpeg, b"garbage", "zlib_ushort")),
        (lambda f: decode_depth(f, camera), RawFrame(7, pose, jpeg, depth.tobytes()[:-2], "raw_ushort")),
        (lambda f: decode_depth(f, camera), RawFrame(7, pose, jpeg, jpeg, "png")),
        (lambda f: decode_depth(f, camera), RawFrame(7, pose, jpeg, b"", "exr")),
        (
            lambda f: decode_depth(f, _camera((40, 30))),
            RawFrame(7, pose, jpeg, cv2.imencode(".png", depth)[1].tobytes(), "png"),
        ),
    ]
    for decode, frame in cases:
        with pytest.raises(FrameDecodeError, match="frame 7"):
            decode(frame)


def test_decode_depth_refuses_a_zlib_bomb():
    camera = _camera()
    bomb = zlib.compress(bytes(100 * SMALL[0] * SMALL[1] * 2))
    with pytest.raises(FrameDecodeError, match="needs"):
        decode_depth(RawFrame(0, np.eye(4), b"", bomb, "zlib_ushort"), camera)


# --- exported layout ----------------------------------------------------------------------------


def test_exported_reader_on_real_scannet_frames():
    scene = require_fixture(REAL_SCENE)
    with ExportedReader(scene) as reader:
        assert isinstance(reader, SceneReader)
        assert reader.name == "scene0707_00"
        assert reader.frame_numbers() == [0, 1, 2] and reader.missing == []
        cam = reader.camera
        np.testing.assert_array_equal(cam.color_intrinsic, np.loadtxt(scene / "intrinsic/intrinsic_color.txt")[:3, :3])
        np.testing.assert_array_equal(cam.depth_intrinsic, np.loadtxt(scene / "intrinsic/intrinsic_depth.txt")[:3, :3])
        np.testing.assert_array_equal(cam.depth_to_color, np.eye(4))
        assert (cam.color_size, cam.depth_size, cam.depth_shift) == ((1296, 968), (640, 480), 1000.0)
        for i in range(3):
            np.testing.assert_array_equal(reader.pose(i), np.loadtxt(scene / "pose" / f"{i}.txt").astype(np.float32))
        raws = list(reader.read([2, 0]))
    assert [r.frame for r in raws] == [2, 0]
    assert raws[0].color == (scene / "color/2.jpg").read_bytes()
    np.testing.assert_array_equal(
        decode_depth(raws[0], cam), cv2.imread(str(scene / "depth/2.png"), cv2.IMREAD_UNCHANGED)
    )


def _exported(folder: Path, frames=(0, 1, 2), size: tuple[int, int] = SMALL, meta: bool = True) -> Path:
    """A tiny exported scene folder."""
    rng = np.random.default_rng(0)
    for part in ("color", "depth", "pose", "intrinsic"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    for i in frames:
        (folder / "color" / f"{i}.jpg").write_bytes(_jpeg(rng, size))
        cv2.imwrite(str(folder / "depth" / f"{i}.png"), rng.integers(1, 5000, size=(size[1], size[0]), dtype=np.uint16))
        pose = np.eye(4)
        pose[:3, 3] = i
        np.savetxt(folder / "pose" / f"{i}.txt", pose, fmt="%f")
    k = np.eye(4)
    k[0, 0] = k[1, 1] = 70.0
    np.savetxt(folder / "intrinsic" / "intrinsic_color.txt", k, fmt="%f")
    np.savetxt(folder / "intrinsic" / "intrinsic_depth.txt", k, fmt="%f")
    if meta:
        (folder / f"{folder.name}.txt").write_text(
            f"colorWidth = {size[0]}\ncolorHeight = {size[1]}\ndepthWidth = {size[0]}\ndepthHeight = {size[1]}\n"
        )
    return folder


def test_exported_frames_sort_numerically_and_sizes_come_from_images(tmp_path):
    scene = _exported(tmp_path / "scene0000_00", frames=(0, 2, 10, 100), size=(64, 48), meta=False)
    with ExportedReader(scene) as reader:
        assert reader.frame_numbers() == [0, 2, 10, 100]
        assert reader.camera.color_size == (64, 48) and reader.camera.depth_size == (64, 48)
        np.testing.assert_array_equal(reader.pose(10)[:3, 3], [10, 10, 10])
    for part in ("color", "depth", "pose"):
        for file in (scene / part).iterdir():
            file.rename(file.with_name(f"{int(file.stem):06d}{file.suffix}"))
    with ExportedReader(scene) as reader:
        assert reader.frame_numbers() == [0, 2, 10, 100]
        np.testing.assert_array_equal(reader.pose(100)[:3, 3], [100, 100, 100])
        assert next(reader.read([2])).color == (scene / "color" / "000002.jpg").read_bytes()


def test_exported_missing_files_are_skipped_and_listed(tmp_path):
    scene = _exported(tmp_path / "scene0000_00", frames=(0, 1, 2, 3))
    (scene / "pose" / "1.txt").unlink()
    (scene / "color" / "3.jpg").unlink()
    with ExportedReader(scene) as reader:
        assert reader.frame_numbers() == [0, 2]
        assert reader.missing == [1, 3]
        with pytest.raises(IndexError):
            reader.pose(1)


def test_exported_without_any_complete_frame_is_an_error(tmp_path):
    scene = _exported(tmp_path / "scene0000_00", frames=(0, 1))
    for pose in (scene / "pose").iterdir():
        pose.unlink()
    with pytest.raises(DataError, match="no frame has all") as err:
        ExportedReader(scene)
    assert str(scene) in str(err.value)


def test_exported_malformed_pose_reads_as_nan(tmp_path):
    scene = _exported(tmp_path / "scene0000_00")
    (scene / "pose" / "1.txt").write_text("1 2 3\nnot a pose\n")
    (scene / "pose" / "2.txt").write_text("1 0 0\n0 1 0\n0 0 1\n")
    with ExportedReader(scene) as reader:
        assert np.isnan(reader.pose(1)).all() and np.isnan(reader.pose(2)).all()
        assert np.isnan(next(reader.read([1])).pose).all()
        assert np.isfinite(reader.pose(0)).all()


@pytest.mark.parametrize("content", ["1 2 3\nfoo bar baz\n", "1 2\n3 4\n", "nan 0 0\n0 1 0\n0 0 1\n", ""])
def test_exported_malformed_intrinsics(tmp_path, content):
    scene = _exported(tmp_path / "scene0000_00")
    bad = scene / "intrinsic" / "intrinsic_depth.txt"
    bad.write_text(content)
    with pytest.raises(DataError) as err:
        ExportedReader(scene)
    assert str(bad) in str(err.value)


def test_exported_missing_folders(tmp_path):
    scene = _exported(tmp_path / "scene0000_00")
    for part in ("intrinsic/intrinsic_color.txt", "intrinsic", "depth"):
        target = scene / part
        if target.is_dir():
            for child in target.iterdir():
                child.unlink()
            target.rmdir()
        else:
            target.unlink()
        with pytest.raises(DataError, match=target.name):
            ExportedReader(scene)


def test_exported_unreadable_image_is_undecodable_not_fatal(tmp_path):
    scene = _exported(tmp_path / "scene0000_00")
    (scene / "color" / "1.jpg").write_bytes(b"")
    with ExportedReader(scene) as reader:
        raw = next(reader.read([1]))
        with pytest.raises(FrameDecodeError):
            decode_color(raw)


# --- discovery ----------------------------------------------------------------------------------


@pytest.fixture
def scannet_tree(tmp_path) -> Path:
    root = tmp_path / "scannet"
    _exported(root / "scans" / "scene0011_00")  # val
    _exported(root / "scans" / "scene0000_00")  # train
    _exported(root / "scans" / "scene9000_00")  # in no list: train
    _exported(root / "scans_test" / "scene0707_00")  # test
    (root / "scans" / "notes").mkdir()
    _small_sens(root / "scans" / "scene0000_00" / "scene0000_00.sens")
    return root


def test_find_scenes_splits_and_order(scannet_tree):
    entries = find_scenes(scannet_tree)
    assert [(e.name, e.split, e.kind) for e in entries] == [
        ("scene0000_00", "train", "sens"),
        ("scene9000_00", "train", "exported"),
        ("scene0011_00", "val", "exported"),
        ("scene0707_00", "test", "exported"),
    ]
    assert entries[0].path == scannet_tree / "scans" / "scene0000_00" / "scene0000_00.sens"
    assert entries[1].path == scannet_tree / "scans" / "scene9000_00"
    assert [e.name for e in find_scenes(scannet_tree, split="val")] == ["scene0011_00"]
    assert [e.name for e in find_scenes(scannet_tree, split="test")] == ["scene0707_00"]
    assert [e.name for e in find_scenes(scannet_tree / "scans", split="train")] == ["scene0000_00", "scene9000_00"]
    for entry in entries:
        with open_scene(entry) as reader:
            assert reader.name == entry.name and reader.frame_numbers() == [0, 1, 2]


def test_find_scenes_source_and_filters(scannet_tree):
    by_name = {e.name: e for e in find_scenes(scannet_tree, source="exported")}
    assert by_name["scene0000_00"].kind == "exported"
    assert [e.name for e in find_scenes(scannet_tree, source="sens")] == ["scene0000_00"]
    picked = find_scenes(scannet_tree, scenes=["scene0707_00", "scene0000_00"])
    assert [e.name for e in picked] == ["scene0000_00", "scene0707_00"]
    with pytest.raises(DataError, match="scene0999_00"):
        find_scenes(scannet_tree, scenes=["scene0000_00", "scene0999_00"])
    with pytest.raises(DataError, match=r"scene0707_00 \(test\)"):
        find_scenes(scannet_tree, split="train", scenes=["scene0707_00"])


def test_find_scenes_single_scene_root(scannet_tree):
    scene = scannet_tree / "scans" / "scene0011_00"
    assert find_scenes(scene) == [SceneEntry("scene0011_00", "val", scene, "exported")]
    entry = SceneEntry("scene0011_00", "val", str(scene), "exported")  # as rebuilt from JSON attrs
    assert entry.path == scene


def test_find_scenes_errors(tmp_path, scannet_tree):
    with pytest.raises(DataError, match="does not exist"):
        find_scenes(tmp_path / "missing")
    (tmp_path / "empty" / "scans" / "scene0000_00").mkdir(parents=True)
    with pytest.raises(DataError, match="no ScanNet scenes found.*scans_test"):
        find_scenes(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        find_scenes(scannet_tree, split="dev")
    with pytest.raises(DataError, match="unknown scene source"):
        find_scenes(scannet_tree, source="zip")
    with pytest.raises(DataError, match="unknown kind"):
        open_scene(SceneEntry("x", "train", tmp_path, "zip"))


# --- demo scene ---------------------------------------------------------------------------------


def test_demo_scene_in_both_layouts(tmp_path):
    scene = write_demo_scene(tmp_path / "a", num_frames=30)
    assert scene == tmp_path / "a" / "scans" / "scene9000_00"
    lost = lost_tracking_frame(30)
    assert lost == 25 and lost_tracking_frame(250) == 100
    with SensReader(scene / "scene9000_00.sens") as sens, ExportedReader(scene) as exported:
        assert sens.frame_numbers() == exported.frame_numbers() == list(range(30))
        for field in ("color_intrinsic", "depth_intrinsic", "depth_to_color"):
            np.testing.assert_array_equal(getattr(sens.camera, field), getattr(exported.camera, field))
        assert sens.camera.color_size == exported.camera.color_size == (640, 480)
        assert sens.camera.depth_size == exported.camera.depth_size == (640, 480)
        assert not np.array_equal(sens.camera.color_intrinsic, sens.camera.depth_intrinsic)
        for frame in range(30):
            np.testing.assert_array_equal(sens.pose(frame), exported.pose(frame))
        assert np.isneginf(sens.pose(lost)).all()
        assert np.isfinite(sens.pose(0)).all() and np.isfinite(sens.pose(29)).all()
        for a, b in zip(sens.read([0, 25, 29]), exported.read([0, 25, 29]), strict=True):
            depth = decode_depth(a, sens.camera)
            np.testing.assert_array_equal(depth, decode_depth(b, exported.camera))
            assert a.color == b.color
            assert (depth > 0).mean() > 0.9 and depth.max() < 10_000
            assert decode_color(a).std(axis=(0, 1)).min() > 10
        assert np.linalg.norm(sens.pose(29)[:3, 3] - sens.pose(0)[:3, 3]) > 0.5  # the camera moves
    assert find_scenes(tmp_path / "a") == [SceneEntry("scene9000_00", "train", scene / "scene9000_00.sens", "sens")]


def test_demo_depth_matches_the_geometry(tmp_path):
    """Back-projecting a demo depth map puts the floor at z = 0 and everything inside the room."""
    scene = write_demo_scene(tmp_path, num_frames=1, layout="sens")
    with SensReader(scene / "scene9000_00.sens") as reader:
        raw = next(reader.read([0]))
        depth = decode_depth(raw, reader.camera) / 1000.0
        k = reader.camera.depth_intrinsic
    v, u = np.nonzero(depth > 0)
    z = depth[v, u]
    cam = np.stack([(u - k[0, 2]) * z / k[0, 0], (v - k[1, 2]) * z / k[1, 1], z])
    world = raw.pose[:3, :3].astype(np.float64) @ cam + raw.pose[:3, 3:4]
    assert world.min(axis=1)[2] > -0.01 and (world.max(axis=1) < [6.01, 5.01, 2.71]).all()
    assert (np.abs(world[2]) < 0.01).mean() > 0.05  # some floor is in view


def test_demo_is_deterministic_and_layouts_are_exclusive(tmp_path):
    a = write_demo_scene(tmp_path / "a", num_frames=3, layout="sens", seed=1)
    b = write_demo_scene(tmp_path / "b", num_frames=3, layout="sens", seed=1)
    c = write_demo_scene(tmp_path / "c", num_frames=3, layout="sens", seed=2)
    sens = [p / "scene9000_00.sens" for p in (a, b, c)]
    assert sens[0].read_bytes() == sens[1].read_bytes() != sens[2].read_bytes()
    assert not (a / "color").exists()
    only = write_demo_scene(tmp_path / "a", num_frames=3, layout="exported", seed=1, name="scene9000_00")
    assert not (only / "scene9000_00.sens").exists() and (only / "color" / "2.jpg").exists()
    with pytest.raises(ConfigError, match="--layout 'zip' is not a demo layout"):  # a usage error: exit 2
        write_demo_scene(tmp_path / "d", layout="zip")
