"""Fault corpus: every exit path of the installed console scripts, run in a subprocess.

Each case asserts the exit code, the message, that no traceback is printed and that what existed before
(a store's arrays, a run folder's checkpoint) is intact. Codes: 0 done, 1 fault, 2 usage or pkd error,
130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pkd.common import store
from pkd.train.checkpoint import LAST

from _cli import flags, script
from _cli import run_command as run
from conftest import DEMO_POINTS, require_fixture

PREP, TRAIN = script("pkd-prep"), script("pkd-train")
NAMES = [s.name for s in store.array_specs(DEMO_POINTS)]
TINY = flags(
    num_points=128, num_group=16, group_size=8, dim=32, depth=1, heads=2, batch_size=2, device="cpu", no_augment=True
)
INTERRUPTED = "interrupted: rerun the same command to resume"


def check(result: subprocess.CompletedProcess, code: int, *messages: str) -> None:
    """Exit code, each message in stderr+stdout, and never a traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{text[-1500:]}"
    assert "Traceback" not in text, text[-1500:]
    for message in messages:
        assert message in text, f"{message!r} not in:\n{text[-1500:]}"


def prep_args(root: Path, out: Path, *extra: object) -> list[object]:
    return [
        PREP,
        "scannet",
        "--root",
        root,
        "--out",
        out,
        "--teacher",
        "random",
        "--num-points",
        DEMO_POINTS,
        "--shard-size",
        2,
        "--teacher-batch",
        2,
        "--no-progress",
        *extra,
    ]


def arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")["train"]
    return {name: group[name][:] for name in NAMES}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def copy_store(demo_store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pairs.zarr"
    shutil.copytree(demo_store, out)
    return out


def unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write to: chmod 555 for a user, a sysfs folder for root."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        Path("/sys/pkd-probe").touch()
    except OSError:
        return Path("/sys")
    Path("/sys/pkd-probe").unlink()
    pytest.skip("running as root with a writable /sys: no unwritable folder to test with")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``path`` exists (the command got past its start-up) or the process ended."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


@pytest.fixture(scope="module")
def clean_arrays(demo_store) -> dict[str, np.ndarray]:
    return arrays(demo_store)


# ---- usage and pkd errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [PREP, "scannet", "--root", ".", "--out", "x", "--bogus"],
        [TRAIN, "distill", "s.zarr", "--bogus"],
        [PREP, "nope"],
    ],
)
def test_usage_errors_print_the_usage_paragraph_and_exit_2(command, tmp_path):
    result = run(*command, cwd=tmp_path)
    check(result, 2, "Usage:", "--help")
    assert len(result.stderr.splitlines()) <= 6


def test_pkd_errors_exit_2_and_name_an_existing_command(tmp_path):
    result = run(PREP, "info", tmp_path / "missing.zarr")
    check(result, 2, "error: no pair store", "pkd-prep demo-scene --out DIR")
    assert "pkd-prep demo`" not in result.stderr
    check(
        run(PREP, "scannet", "--root", tmp_path / "none", "--out", tmp_path / "o.zarr"),
        2,
        "pkd-prep demo-scene --out DIR",
    )


def test_pkd_debug_shows_the_traceback(tmp_path):
    result = run(PREP, "info", tmp_path / "missing.zarr", env={**os.environ, "PKD_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "StoreError" in result.stderr


# ---- verify and missing data ----------------------------------------------------------------------------


def test_verify_exits_1_on_a_corrupt_chunk(demo_store, tmp_path):
    out = copy_store(demo_store, tmp_path)
    victim = sorted(p for p in (out / "train" / "prefix" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    check(run(PREP, "verify", out), 1, "FAULT train shard 0", "prefix unreadable")


def test_verify_exits_1_on_an_in_progress_store(demo_store, tmp_path):
    out = copy_store(demo_store, tmp_path)
    zarr.open_group(str(out), mode="r+").attrs["status"] = "in-progress"
    check(run(PREP, "verify", out), 1, "FAULT status is 'in-progress'")


@pytest.mark.parametrize("array", ["points", "scene"])
def test_a_deleted_chunk_file_is_found_by_verify_and_refused_by_training(demo_store, tmp_path, array):
    out = copy_store(demo_store, tmp_path)
    target = zarr.open_group(str(out), mode="r")["train"][array]
    (out / "train" / array / target.metadata.encode_chunk_key((1,) + (0,) * (target.ndim - 1))).unlink()
    check(run(PREP, "verify", out), 1, f"FAULT train/{array} shard 1: file missing")
    result = run(TRAIN, "distill", out, *TINY, "--max-steps", 1, "--run-dir", tmp_path / "run")
    check(result, 2, "shard file(s) are missing", f"{array} shard 1")
    assert not (tmp_path / "run").exists()


def test_verify_checks_the_target_stats(demo_store, tmp_path):
    out = copy_store(demo_store, tmp_path)
    group = zarr.open_group(str(out), mode="r+")["train"]
    mean, std = store.read_stats(group, "prefix")
    store.write_stats(group, "prefix", mean, np.zeros_like(std))
    check(run(PREP, "verify", out), 1, "FAULT train/stats: prefix std is 0")
    store.write_stats(group, "prefix", np.full_like(mean, np.nan), std)
    check(run(PREP, "verify", out), 1, "prefix mean/std hold NaN or inf")


# ---- prep: overwrite, bounds, exported frames, OS errors ------------------------------------------------


def test_overwrite_keeps_the_old_store_when_planning_fails(demo_root, demo_store, clean_arrays, tmp_path):
    out = copy_store(demo_store, tmp_path)
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    sens = next(root.rglob("*.sens"))
    sens.write_bytes(sens.read_bytes()[:600])  # truncated inside the frame table
    check(run(*prep_args(root, out, "--overwrite", "--seed", 1, "--source", "sens")), 2, "error:")
    assert_same_arrays(arrays(out), clean_arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.zarr", "root"]


def test_overwrite_replaces_the_store_only_when_the_new_one_is_complete(demo_root, demo_store, tmp_path):
    out = copy_store(demo_store, tmp_path)
    check(run(*prep_args(demo_root, out, "--overwrite", "--limit", 2)), 0, "train: 2 valid of 2 planned")
    assert zarr.open_group(str(out), mode="r")["train"].attrs["num_samples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.zarr"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-points", 10_000_000], "--num-points 10000000 is above 65536"),
        (["--limit", 0], "--limit must be at least 1, got 0"),
        (["--limit", -1], "--limit must be at least 1, got -1"),
        (["--split", "val"], "no scene under"),
    ],
)
def test_bounds_and_messages_name_the_cause(demo_root, demo_store, clean_arrays, tmp_path, extra, message):
    out = copy_store(demo_store, tmp_path)
    result = run(*prep_args(demo_root, out, "--overwrite", *extra))
    check(result, 2, message)
    assert "invalid pose" not in result.stderr
    assert_same_arrays(arrays(out), clean_arrays)


@pytest.fixture(scope="module")
def exported_scene(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exported")
    check(run(PREP, "demo-scene", "--out", root, "--frames", 60, "--layout", "exported", "--no-val-scene"), 0)
    return root


def test_missing_exported_frames_are_counted(exported_scene, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(exported_scene, root)
    scene = next(root.rglob("depth")).parent
    (scene / "depth" / "25.png").unlink()
    (scene / "pose" / "50.txt").unlink()
    (scene / "pose" / "10.txt").unlink()  # not a kept frame (--frame-skip 25): not counted
    result = run(*prep_args(root, tmp_path / "p.zarr", "--source", "exported"))
    check(result, 0, "train: 1 valid of 1 planned samples", "'missing_files': 2")


def test_a_split_without_a_valid_sample_exits_non_zero(exported_scene, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(exported_scene, root)
    for png in root.rglob("depth/*.png"):
        png.write_bytes(b"not a png")
    result = run(*prep_args(root, tmp_path / "p.zarr", "--source", "exported"))
    check(result, 2, "no valid sample in split train", "undecodable")


def test_out_that_is_a_file_or_unwritable_is_one_paragraph(demo_root, tmp_path):
    (tmp_path / "file.zarr").write_text("mine")
    check(run(*prep_args(demo_root, tmp_path / "file.zarr")), 2, "is an existing file")
    assert (tmp_path / "file.zarr").read_text() == "mine"
    result = run(*prep_args(demo_root, unwritable(tmp_path) / "pairs.zarr"))
    check(result, 2, "cannot create the lock file")
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot create the lock file")


# ---- training: locks, exports, checkpoints, messages ----------------------------------------------------


@pytest.fixture(scope="module")
def trained(demo_store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    check(run(TRAIN, "distill", demo_store, *TINY, "--max-steps", 1, "--run-dir", run_dir), 0)
    return run_dir


def test_export_to_a_folder_or_unwritable_place_is_one_paragraph(trained, tmp_path):
    (tmp_path / "enc").mkdir()
    check(run(TRAIN, "export", trained, "--out", tmp_path / "enc"), 2, "is a folder")
    assert list(tmp_path.rglob("*.tmp")) == [] and list((tmp_path / "enc").iterdir()) == []
    check(run(TRAIN, "export", trained, "--out", unwritable(tmp_path) / "enc.pth"), 1, "cannot write")


def test_checkpoint_save_over_the_file_size_limit_keeps_the_last_one(demo_store, tmp_path):
    run_dir = tmp_path / "run"
    check(run(TRAIN, "distill", demo_store, *TINY, "--max-steps", 4, "--stop-after", 1, "--run-dir", run_dir), 0)
    before = (run_dir / LAST).read_bytes()
    limit = len(before) // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [TRAIN, "distill", str(demo_store), *TINY, "--max-steps", "4", "--run-dir", str(run_dir), "--resume"],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=300,
    )
    check(result, 1, f"cannot write {run_dir / LAST}", "the previous last.pt is untouched")
    assert (run_dir / LAST).read_bytes() == before
    assert list(run_dir.glob(".*.tmp")) == []


def test_bad_init_files_say_why(demo_store, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "init.txt").write_text("hello\n")
    for name, reason in (("empty.pth", "the file is empty"), ("init.txt", "not a torch checkpoint file")):
        result = run(
            TRAIN,
            "distill",
            demo_store,
            *TINY,
            "--max-steps",
            1,
            "--run-dir",
            tmp_path / f"run-{name}",
            "--init",
            tmp_path / name,
        )
        check(result, 2, reason)


def test_a_second_run_on_one_run_dir_is_refused_and_sigterm_exits_143(demo_store, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [TRAIN, "distill", str(demo_store), *TINY, "--max-steps", "100000", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(run_dir / "config.json", first)
        second = run(TRAIN, "distill", demo_store, *TINY, "--max-steps", 1, "--run-dir", run_dir, "--overwrite")
        check(second, 2, f"another run (pid {first.pid}) is writing {run_dir}")
        assert (run_dir / "config.json").is_file()
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    check(subprocess.CompletedProcess(first.args, first.returncode, out, err), 143, INTERRUPTED)
    assert not Path(f"{run_dir}.lock").exists()


@pytest.mark.slow  # default tier: SIGINT of prep (130), SIGTERM of training (143), resume equality (test_train)
def test_sigint_at_a_random_moment_of_training_then_rerun_equals_the_clean_run(demo_store, tmp_path):
    steps = ["--max-steps", "12", "--save-every", "1", "--epochs", "50"]
    clean = tmp_path / "clean"
    check(run(TRAIN, "distill", demo_store, *TINY, *steps, "--run-dir", clean), 0)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [TRAIN, "distill", str(demo_store), *TINY, *steps, "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(run_dir / "config.json", proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("training finished before the signal arrived")
    check(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130, INTERRUPTED)
    assert list(run_dir.glob(".*.tmp")) == []
    if (run_dir / LAST).is_file():
        rerun = run(TRAIN, "distill", demo_store, *TINY, *steps, "--run-dir", run_dir, "--resume")
    else:
        check(run(TRAIN, "distill", demo_store, *TINY, *steps, "--run-dir", run_dir, "--resume"), 2, "--overwrite")
        check(run(TRAIN, "distill", demo_store, *TINY, *steps, "--run-dir", run_dir), 2, "--overwrite")
        rerun = run(TRAIN, "distill", demo_store, *TINY, *steps, "--run-dir", run_dir, "--overwrite")
    check(rerun, 0)
    a = torch.load(clean / LAST, weights_only=True)["model"]
    b = torch.load(run_dir / LAST, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_before_the_first_checkpoint_points_to_overwrite(demo_store, trained, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained / "config.json", run_dir / "config.json")  # what a run stopped before step 1 holds
    check(
        run(TRAIN, "distill", demo_store, *TINY, "--run-dir", run_dir, "--resume"),
        2,
        "stopped before its first checkpoint",
        "pass --overwrite instead of --resume",
    )
    check(run(TRAIN, "distill", demo_store, *TINY, "--run-dir", run_dir), 2, "pass --overwrite to start it again")


# ---- prep: signals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, 130), pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)]
)  # SIGTERM takes the same path as SIGINT (130 vs 143 is also tested on training): --slow
def test_signal_at_a_random_moment_of_prep_then_rerun_equals_the_clean_store(
    demo_root, clean_arrays, tmp_path, sig, code
):
    out = tmp_path / "pairs.zarr"
    proc = subprocess.Popen(
        [str(a) for a in prep_args(demo_root, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(Path(f"{out}.lock"), proc)
    time.sleep(random.Random(os.getpid() + code).uniform(0.0, 2.0))
    proc.send_signal(sig)
    out_text, err = proc.communicate(timeout=120)
    if proc.returncode == 0 or f"wrote {out}" in out_text + err:  # a loaded machine can finish within the window
        pytest.skip("prep finished before the signal arrived")
    check(subprocess.CompletedProcess(proc.args, proc.returncode, out_text, err), code, INTERRUPTED)
    check(run(*prep_args(demo_root, out)), 0, f"wrote {out}")
    check(run(PREP, "verify", out), 0, "OK")
    assert_same_arrays(arrays(out), clean_arrays)


@pytest.mark.parametrize("leftover", ["empty folder", "creating"])
def test_a_store_interrupted_while_being_created_is_created_again(demo_root, clean_arrays, tmp_path, leftover):
    out = tmp_path / "pairs.zarr"
    out.mkdir()
    if leftover == "creating":  # what an interrupt leaves between the root's metadata and the split arrays
        zarr.open_group(
            str(out),
            mode="w",
            attributes={
                "format": store.FORMAT,
                "version": store.VERSION,
                "status": "creating",
                "prep": {},
                "teacher": {},
            },
        )
    check(run(*prep_args(demo_root, out)), 0, f"wrote {out}")
    assert_same_arrays(arrays(out), clean_arrays)


# ---- downstream: the ModelNet40 FPS cache follows file contents -----------------------------------------


def test_modelnet_cache_rebuilds_a_replaced_shape(tmp_path):
    from pkd.train.downstream.modelnet import load_modelnet40

    fixture = require_fixture("modelnet40")
    data, splits = tmp_path / "data", fixture / "splits"
    source = fixture / "modelnet40_normal_resampled"
    for folder in source.iterdir():
        if folder.is_dir():
            shutil.copytree(folder, data / folder.name)
    first = load_modelnet40(data, "test", splits=splits, num_points=64, allow_missing=True, cache_dir=tmp_path / "c")
    victim, donor = first.names[0], first.names[1]
    path = data / victim.rsplit("_", 1)[0] / f"{victim}.txt"
    path.write_bytes((data / donor.rsplit("_", 1)[0] / f"{donor}.txt").read_bytes())
    again = load_modelnet40(data, "test", splits=splits, num_points=64, allow_missing=True, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.points[0], first.points[1])
    np.testing.assert_array_equal(again.points[1:], first.points[1:])
