"""Store tools beyond the main prep: teacher-only recompute, show, ply, and prep on a dask cluster."""

import shutil
import sys

import numpy as np
import pytest
import zarr
from PIL import Image

from pkd.common import store
from pkd.common.errors import StoreError
from pkd.common.verify import verify_store
from pkd.preprocess.prep import RunOptions, run_prep, run_teacher
from pkd.preprocess.show import load_sample, render, write_ply
from pkd.preprocess.teacher import TeacherConfig

from _cli import flags, run_command
from conftest import DEMO_POINTS, demo_prep_config

QUIET = RunOptions(teacher_batch=2, progress=False)
GEOMETRY = [s.name for s in store.array_specs(DEMO_POINTS) if s.stage == "geometry"]


def split_arrays(path, names):
    group = zarr.open_group(str(path), mode="r")["train"]
    return {name: group[name][:] for name in names}


def test_teacher_recomputes_targets_only(demo_store, tmp_path):
    out = tmp_path / "pairs.zarr"
    shutil.copytree(demo_store, out)
    before = split_arrays(out, GEOMETRY + ["prefix"])
    summary = run_teacher(str(out), TeacherConfig(kind="random", seed=1, patch_tokens=True), QUIET)
    assert summary["train"]["shards_written"] == 3
    after = split_arrays(out, GEOMETRY + ["prefix", "patch_tokens"])
    for name in GEOMETRY:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert not np.array_equal(after["prefix"], before["prefix"])
    assert after["patch_tokens"].shape == (5, 49, 512) and np.abs(after["patch_tokens"]).max() > 0
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["teacher"]["seed"] == 1 and root.attrs["status"] == "complete"
    assert verify_store(str(out)) == []
    again = run_command(
        *(sys.executable, "-m", "pkd.preprocess", "teacher", out),
        *flags(teacher="random", seed=1, patch_tokens=True, no_progress=True),
    )
    assert again.returncode == 0, again.stderr
    assert "train: teacher targets for 0 shards written" in again.stdout


def test_stored_targets_equal_the_teacher_on_the_color_frame(demo_store):
    """Independent of the prep pipeline: transform the re-read frame, encode, compare after fp16 rounding."""
    import torch
    from PIL import Image

    from pkd.preprocess.show import color_frame
    from pkd.preprocess.teacher import build_teacher

    teacher = build_teacher(TeacherConfig(kind="random", seed=0))
    group = zarr.open_group(str(demo_store), mode="r")["train"]
    for index in (0, 3):
        image = color_frame(str(demo_store), load_sample(str(demo_store), "train", index))
        out = teacher.encode(teacher.transform(Image.fromarray(image))[None])
        # one fp16 rounding step apart at most (batched vs single forward differ in the last float32 bits)
        for name, expected in (("prefix", out.prefix[0]), ("clip_embed", out.clip_embed[0])):
            stored = torch.from_numpy(group[name][index]).float()
            torch.testing.assert_close(stored, expected.half().float(), rtol=2**-10, atol=2**-14, msg=name)


def test_show_writes_a_picture_of_the_expected_size(demo_store, tmp_path):
    sample = load_sample(str(demo_store), "train", 1)
    assert sample.scene == "scene9000_00" and sample.frame == 25
    from pkd.preprocess.show import color_frame

    image = color_frame(str(demo_store), sample)
    assert image is not None and image.shape == (480, 640, 3)
    png = render(sample, image, tmp_path / "sample.png", caption="a room.")
    with Image.open(png) as picture:
        assert picture.size == (1500, 500)
        assert np.asarray(picture.convert("L")).std() > 10
    result = run_command(
        sys.executable, "-m", "pkd.preprocess", "show", demo_store, *flags(index=2, out=tmp_path / "cli.png")
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cli.png").stat().st_size > 10_000


def test_show_refuses_an_index_out_of_range(demo_store):
    with pytest.raises(StoreError, match="--index must be in 0..4"):
        load_sample(str(demo_store), "train", 5)


def test_ply_holds_the_sample_points(demo_store, tmp_path):
    import open3d as o3d

    sample = load_sample(str(demo_store), "train", 0)
    cloud = o3d.io.read_point_cloud(str(write_ply(sample, tmp_path / "s.ply")))
    np.testing.assert_allclose(np.asarray(cloud.points), sample.points, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cloud.colors) * 255, sample.colors, atol=0.5)


def test_dask_cluster_gives_the_single_process_store(demo_root, demo_store, tmp_path):
    out = tmp_path / "dask.zarr"
    run_prep(
        demo_prep_config(demo_root),
        str(out),
        TeacherConfig(kind="random", seed=0),
        RunOptions(teacher_batch=2, progress=False, dask_workers=2, threads=1),
    )
    assert verify_store(str(out)) == []
    names = [s.name for s in store.array_specs(DEMO_POINTS)]
    dask_arrays, local = split_arrays(out, names), split_arrays(demo_store, names)
    for name in names:
        np.testing.assert_array_equal(dask_arrays[name], local[name], err_msg=name)


@pytest.mark.slow  # the cluster itself: test_dask_cluster_gives_the_single_process_store
def test_a_dask_worker_killed_mid_shard_still_ends_in_the_clean_store(demo_root, demo_store, tmp_path):
    """Kill the worker that is building a shard: dask retries the task and the store equals the clean one."""
    import os
    import signal
    import threading
    import time

    from dask.distributed import Client, LocalCluster

    out = tmp_path / "pairs.zarr"
    killed = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):

        def kill_a_busy_worker():
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                busy = [
                    address
                    for address, tasks in client.processing().items()
                    if any("pkd-shard" in str(t) for t in tasks)
                ]
                if busy:
                    time.sleep(1.0)
                    pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                time.sleep(0.1)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        run_prep(
            demo_prep_config(demo_root),
            str(out),
            TeacherConfig(kind="random", seed=0),
            RunOptions(teacher_batch=2, progress=False, scheduler=cluster.scheduler_address, threads=1),
        )
        killer.join()
    assert killed, "no worker was killed: the test did not exercise the retry"
    assert verify_store(str(out)) == []
    names = [s.name for s in store.array_specs(DEMO_POINTS)]
    dask_arrays, local = split_arrays(out, names), split_arrays(demo_store, names)
    for name in names:
        np.testing.assert_array_equal(dask_arrays[name], local[name], err_msg=name)
