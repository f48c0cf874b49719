"""Crash-point enumeration (slow): a prep, a distill and a finetune are SIGKILLed at ≥ 20 points each, resumed
to completion and compared with an uninterrupted run, file by file; then a flipped byte in each kind of file
pkd writes must be detected and named.

The three enumerations are marked ``crash`` (minutes each: ``bash scripts/test.sh --crash`` runs them; CI does not,
to stay well under 30 minutes); the flipped-byte cases run in every tier.

The kill points are every durable write (``pkd.common.durable``'s hook, up to 14 of them spread over the run)
and 8 moments spread over the run's duration; ``tests/_crash.py`` runs them. Files must be byte-identical
except where a field records wall-clock speed (``samples_per_s`` in ``metrics.jsonl``): there the content
without it must be identical.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _cli import DEMO_TRAIN, flags, run_script
from conftest import DEMO_POINTS

HERE = Path(__file__).parent
TIMING = ["samples_per_s"]
DISTILL = flags(
    **{**DEMO_TRAIN, "num_points": 128, "dim": 32, "depth": 1},
    num_concepts=4,
    head_hidden=32,
    no_augment=True,
    max_steps=6,
    save_every=2,
    epochs=50,
)
FINETUNE = flags(
    init="scratch",
    epochs=2,
    repeats=2,
    batch_size=2,
    num_points=256,
    num_group=16,
    group_size=8,
    dim=32,
    depth=3,
    heads=2,
    device="cpu",
    cache_dir="cache",
)


def crash_points(tmp_path: Path, app: str, argv: list[object], resume: list[str], outputs: list[str]) -> dict:
    job = {
        "app": app,
        "argv": [str(a) for a in argv],
        "resume": resume,
        "outputs": outputs,
        "work": str(tmp_path / "work"),
        "commits": 14,
        "times": 8,
        "points": 20,
        "timing_keys": TIMING,
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, str(HERE / "_crash.py"), str(tmp_path / "job.json"), str(tmp_path / "result.json")],
        capture_output=True,
        text=True,
        timeout=1500,  # minutes on an idle 2-core machine; far longer on a loaded one
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


def check_points(result: dict, name: str) -> None:
    """≥ 20 points, each killed run resumed to the clean result; prints the table row."""
    points = result["points"]
    killed = [p for p in points if p["killed"]]
    identical = [p for p in points if p["identical"]]
    content = [p for p in points if p["content"]]
    print(
        f"\n{name}: {len(points)} kill points ({sum(p['kind'] == 'commit' for p in points)} at commits of "
        f"{len(result['clean']['commits'])}, {sum(p['kind'] == 'time' for p in points)} by time), "
        f"{len(killed)} killed, "
        f"{len(identical)} byte-identical, {len(content)} identical in content; "
        f"files differing in bytes only: {sorted({f for p in points for f in p.get('bytes_differ', [])})}"
    )
    bad = [p for p in points if not p["content"]]
    assert not bad, json.dumps(bad, indent=1)[:4000]
    assert len(points) >= 20 and len(killed) >= 20, [(p["kind"], p["at"], p["killed"]) for p in points]


@pytest.mark.crash
@pytest.mark.timeout(1600)
def test_prep_resumes_to_the_clean_store_from_every_crash_point(demo_root, tmp_path):
    argv = [
        "--no-progress",
        "scannet",
        "--root",
        demo_root,
        "--out",
        "pairs.zarr",
        "--teacher",
        "random",
        "--num-points",
        DEMO_POINTS,
        "--shard-size",
        1,
        "--limit",
        3,
        "--teacher-batch",
        2,
        "--source",
        "sens",
    ]
    check_points(crash_points(tmp_path, "prep", argv, [], ["pairs.zarr"]), "pkd-prep scannet")


@pytest.mark.crash
@pytest.mark.timeout(1600)
def test_distill_resumes_to_the_clean_run_from_every_crash_point(demo_store, tmp_path):
    argv = ["--no-progress", "distill", demo_store, *DISTILL, "--run-dir", "run"]
    check_points(crash_points(tmp_path, "train", argv, ["--resume"], ["run"]), "pkd-train distill")


@pytest.mark.crash
@pytest.mark.timeout(1600)
def test_finetune_resumes_to_the_clean_run_from_every_crash_point(tmp_path):
    from test_scannet_seg import demo_tree

    tree = demo_tree(tmp_path / "scannet")
    argv = ["--no-progress", "finetune", "scannet-seg", "--data", tree, "--splits", tree / "splits", *FINETUNE]
    argv += ["--run-dir", "seg"]
    result = crash_points(tmp_path, "train", argv, ["--resume"], ["seg", "cache"])
    check_points(result, "pkd-train finetune scannet-seg")


# ---- a flipped byte in each kind of file pkd writes ------------------------------------------------------------


def flip(path: Path, where: float = 0.5) -> None:
    """XOR one byte of ``path`` (at fraction ``where`` of its length) with 0xFF."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def refused(done: subprocess.CompletedProcess, *names: str) -> str:
    """Non-zero exit, one paragraph naming ``names``, no traceback."""
    text = done.stdout + done.stderr
    assert done.returncode in (1, 2), text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    for name in names:
        assert name in text, f"{name!r} not in {text[-2000:]}"
    return text


@pytest.fixture(scope="module")
def finished(demo_store, tmp_path_factory) -> Path:
    """A distill run (2 of 4 steps: resumable) and a seg fine-tuning run with its cache."""
    from test_scannet_seg import demo_tree

    base = tmp_path_factory.mktemp("finished")
    done = run_script(
        "pkd-train",
        "distill",
        demo_store,
        *DISTILL[:-6],
        "--max-steps",
        4,
        "--stop-after",
        2,
        "--run-dir",
        base / "run",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tree = demo_tree(base / "scannet")
    done = run_script(
        "pkd-prep", "scannet-seg", "--root", tree, "--out", base / "seg.zarr", "--splits", tree / "splits"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return base


CORRUPTIONS = ["store chunk", "store attrs JSON", "checkpoint", "config.json", "cache entry"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_flipped_byte_in_each_kind_of_file_is_detected_and_named(kind, demo_store, finished, tmp_path):
    store, run_dir = tmp_path / "pairs.zarr", tmp_path / "run"
    shutil.copytree(demo_store, store)
    shutil.copytree(finished / "run", run_dir)
    distill = ["pkd-train", "distill", store, *DISTILL[:-6], "--max-steps", 4, "--run-dir"]
    resume = ["pkd-train", "distill", demo_store, *DISTILL[:-6], "--max-steps", 4, "--resume", "--run-dir"]
    if kind == "store chunk":
        flip(next(p for p in sorted((store / "train" / "points" / "c").rglob("*")) if p.is_file()))
        refused(run_script("pkd-prep", "verify", store), "FAULT train shard 0", "points")
        refused(run_script(*distill, tmp_path / "new"), "train/points", "shard 0")
    elif kind == "store attrs JSON":
        flip(store / "train" / "zarr.json", 0.3)
        refused(run_script("pkd-prep", "verify", store), str(store / "train" / "zarr.json"))
        refused(run_script(*distill, tmp_path / "new"), str(store / "train" / "zarr.json"))
    elif kind == "checkpoint":
        before = (run_dir / "last.pt").read_bytes()
        flip(run_dir / "last.pt", 0.6)
        refused(run_script(*resume, run_dir), str(run_dir / "last.pt"))
        refused(run_script("pkd-train", "export", run_dir, "--out", tmp_path / "e.pth"), str(run_dir / "last.pt"))
        assert (run_dir / "last.pt").read_bytes() != before and not (tmp_path / "e.pth").exists()
    elif kind == "config.json":
        flip(run_dir / "config.json", 0.3)
        refused(run_script(*resume, run_dir), str(run_dir / "config.json"))
    else:
        cache = tmp_path / "cache" / "scannet_seg.zarr"
        shutil.copytree(finished / "seg.zarr", cache)
        flip(next(p for p in sorted((cache / "scene9000_00" / "xyz").rglob("*")) if p.is_file() and "c" in p.parts))
        refused(run_script("pkd-prep", "verify", cache), "scene9000_00", "unreadable")
        tree = finished / "scannet"
        done = run_script(
            "pkd-train",
            "finetune",
            "scannet-seg",
            "--data",
            tree,
            "--splits",
            tree / "splits",
            *FINETUNE[:-2],
            "--cache-dir",
            tmp_path / "cache",
            "--run-dir",
            tmp_path / "seg",
            "--max-steps",
            1,
        )
        refused(done, "scene9000_00")
