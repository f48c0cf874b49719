"""Fault injection: kill -9 at random points, a full disk, and fuzzed .sens files never corrupt anything."""

import contextlib
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkd.common import store
from pkd.common.errors import DataError
from pkd.common.verify import verify_store
from pkd.preprocess.demo import demo_camera
from pkd.preprocess.frames import decode_color, decode_depth
from pkd.preprocess.sens import SensReader, write_sens

from _cli import DEMO_TRAIN, flags
from conftest import DEMO_POINTS

NAMES = [s.name for s in store.array_specs(DEMO_POINTS)]


def prep_command(root: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pkd.preprocess",
        "scannet",
        "--root",
        str(root),
        "--out",
        str(out),
        "--teacher",
        "random",
        "--num-points",
        str(DEMO_POINTS),
        "--shard-size",
        "2",
        "--teacher-batch",
        "2",
        "--no-progress",
    ]


def assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r")["train"], zarr.open_group(str(b), mode="r")["train"]
    for name in NAMES:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)


# random kill moments: --slow; the default tier kills prep at a fixed point (test_prep) and crashes it mid-run
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_moment_then_rerun_gives_the_clean_store(demo_root, demo_store, tmp_path, seed):
    out = tmp_path / "pairs.zarr"
    delay = random.Random(seed).uniform(1.0, 12.0)
    proc = subprocess.Popen(prep_command(demo_root, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = subprocess.run(prep_command(demo_root, out), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert verify_store(str(out)) == []
    assert_same_store(out, demo_store)


@pytest.mark.slow  # a failed write that keeps the last file: test_exit_codes' file-size case
def test_disk_full_gives_a_clear_error_and_a_resumable_store(demo_root, demo_store, tmp_path):
    def file_sizes(name):
        return [p.stat().st_size for p in (demo_store / "train" / name / "c").rglob("*") if p.is_file()]

    geometry = [s.name for s in store.array_specs(DEMO_POINTS) if s.stage == "geometry"]
    limit = max(max(file_sizes(name), default=0) for name in geometry) + 1024
    assert max(file_sizes("prefix")) > limit, "the test needs prefix shards larger than every geometry shard"
    out = tmp_path / "pairs.zarr"
    limited = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"sys.argv = {['pkd-prep', *prep_command(demo_root, out)[3:]]!r}\n"
        "from pkd.preprocess.cli import main\nmain()\n"
    )
    result = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True)
    assert result.returncode == 2
    assert "out of disk space" in result.stderr and "Traceback" not in result.stderr
    faults = verify_store(str(out))
    assert faults and all("lack their" in f or "status" in f for f in faults), faults
    assert subprocess.run(prep_command(demo_root, out), capture_output=True).returncode == 0
    assert verify_store(str(out)) == []
    assert_same_store(out, demo_store)


@pytest.fixture(scope="module")
def small_sens(tmp_path_factory) -> bytes:
    """A valid 3-frame .sens with tiny images, as bytes."""
    import cv2

    camera = demo_camera()
    camera = type(camera)(
        camera.color_intrinsic, camera.depth_intrinsic, camera.depth_to_color, (16, 12), (16, 12), 1000.0
    )
    rng = np.random.default_rng(0)
    frames = []
    for i in range(3):
        color = cv2.imencode(".jpg", rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))[1].tobytes()
        depth = rng.integers(0, 5000, (12, 16), dtype=np.uint16)
        pose = np.eye(4)
        pose[0, 3] = i
        frames.append((pose, color, depth))
    path = write_sens(tmp_path_factory.mktemp("sens") / "tiny.sens", camera, frames)
    return path.read_bytes()


def read_everything(path: Path) -> None:
    with SensReader(path) as reader:
        frames = reader.frame_numbers()
        for frame in frames:
            reader.pose(frame)
        for raw in reader.read(frames):
            decode_color(raw)
            decode_depth(raw, reader.camera)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_sens_files_end_in_data_errors_only(small_sens, tmp_path, data):
    """Random truncations, byte flips and absurd 8-byte size fields: a DataError or success, nothing else."""
    blob = bytearray(small_sens)
    mutation = data.draw(st.sampled_from(["truncate", "flip", "size"]))
    if mutation == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif mutation == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        offset = data.draw(st.integers(0, len(blob) - 8))
        blob[offset : offset + 8] = struct.pack("<Q", data.draw(st.sampled_from([2**31, 2**40, 2**63, 2**64 - 1])))
    path = tmp_path / "fuzzed.sens"
    path.write_bytes(bytes(blob))
    with contextlib.suppress(DataError):
        read_everything(path)


TINY_TRAIN = flags(**DEMO_TRAIN, epochs=3, save_every=1, max_steps=6)


def train_command(store_path: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pkd.train", "distill", str(store_path), "--run-dir", str(run), *TINY_TRAIN, *extra]


def final_state(run: Path) -> dict:
    import torch

    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def clean_run(demo_store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train") / "clean"
    subprocess.run(train_command(demo_store, run), check=True, capture_output=True)
    return run


# random kill moments: --slow; the default tier kills training after a checkpoint and resumes it (test_train)
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_killed_at_a_random_moment_resumes_bit_identically(demo_store, clean_run, tmp_path, seed):
    import torch

    run = tmp_path / "run"
    proc = subprocess.Popen(train_command(demo_store, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(3.0, 10.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = (
        train_command(demo_store, run, "--resume")
        if (run / "last.pt").exists()
        else train_command(demo_store, run, "--overwrite")
    )
    result = subprocess.run(again, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed, clean = final_state(run), final_state(clean_run)
    assert resumed.keys() == clean.keys()
    for key in clean:
        assert torch.equal(resumed[key], clean[key]), key


def test_training_stops_on_a_corrupt_chunk_naming_it(demo_store, tmp_path):
    import shutil

    copy = tmp_path / "pairs.zarr"
    shutil.copytree(demo_store, copy)
    victim = sorted(p for p in (copy / "train" / "prefix" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = subprocess.run(train_command(copy, tmp_path / "run"), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "prefix: shard 0 (samples 0-1) is corrupt" in result.stderr
