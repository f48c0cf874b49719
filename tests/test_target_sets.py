"""Named target sets: `pkd-prep teacher --name` adds a teacher's targets beside the default set, resumably, without
touching the geometry or another set; `pkd-prep info` and `verify` see every set."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pkd.common import store
from pkd.common.verify import verify_store

from _cli import run_script

pytestmark = pytest.mark.usefixtures("offline")

DINO = ("--teacher", "dinov2:small", "--random-weights", "--seed", "3", "--teacher-batch", "2")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tree_digest(path: Path, skip: str = f"/{store.SETS_GROUP}/") -> dict[str, str]:
    """sha256 of every array file of a store outside the added sets (the root's zarr.json excluded: its attrs
    list the sets)."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and skip not in f"/{f.relative_to(path)}" and f != path / "zarr.json"
    }


def add_set(path: Path, name: str, *extra: str):
    return run_script("pkd-prep", "teacher", path, "--name", name, *DINO, "--no-progress", *extra)


@pytest.fixture
def store_copy(demo_store, tmp_path) -> Path:
    out = tmp_path / "pairs.zarr"
    shutil.copytree(demo_store, out)
    return out


@pytest.fixture(scope="module")
def dino_store(demo_store, tmp_path_factory) -> Path:
    """The demo store with a seeded random DINOv2-small set ``dino`` (read-only: ``with_dino`` copies it)."""
    out = tmp_path_factory.mktemp("sets") / "pairs.zarr"
    shutil.copytree(demo_store, out)
    done = add_set(out, "dino")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def with_dino(dino_store, tmp_path) -> Path:
    out = tmp_path / "dino.zarr"
    shutil.copytree(dino_store, out)
    return out


def read_set(path: Path, split: str, array: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[f"{split}/{store.SETS_GROUP}/dino/{array}"][:])


def test_a_set_is_added_beside_the_default_without_touching_it(demo_store, dino_store):
    assert tree_digest(dino_store) == tree_digest(demo_store)  # geometry and the default set: byte for byte
    root = store.open_store(dino_store)
    sets = store.target_sets(root)
    assert list(sets) == [store.DEFAULT_SET, "dino"]
    dino = sets["dino"]
    assert dino.complete and dino.teacher["random"] and dino.teacher["seed"] == 3
    assert {name: a.shape for name, a in dino.arrays.items()} == {"cls": (384,)}
    assert (dino.transform.image_size, dino.transform.center_crop) == (256, 224)
    for split in store.splits_of(root):
        group = store.split_group(root, split)
        valid = np.asarray(group["valid"][:]).astype(bool)
        cls = read_set(dino_store, split, "cls")
        assert cls.dtype == np.float16 and cls.shape == (len(valid), 384)
        assert np.abs(cls[valid]).sum(axis=1).min() > 0 and not cls[~valid].any()
        mean, _ = store.read_stats(group, f"{store.SETS_GROUP}/dino/cls")
        np.testing.assert_allclose(mean, cls[valid].astype(np.float64).mean(0), atol=1e-3)
    assert verify_store(str(dino_store)) == []


def test_set_targets_are_the_teachers_outputs_on_the_stored_frames(dino_store):
    from PIL import Image

    from pkd.preprocess.frames import decode_color
    from pkd.preprocess.scenes import open_scene
    from pkd.preprocess.teachers import build_target_teacher

    root = store.open_store(dino_store)
    group = store.split_group(root, "train")
    first = int(np.asarray(group["valid"][:]).argmax())
    scene = store.split_attrs(group).scenes[int(group["scene"][first])]
    entry = next(e for e in store_prep_entries(dino_store) if e.name == scene)
    with open_scene(entry) as reader:
        (raw,) = reader.read([int(group["frame"][first])])
    teacher = build_target_teacher("dinov2:small", random=True, seed=3)
    expected = teacher.encode(teacher.preprocess(Image.fromarray(decode_color(raw)))[None])["cls"][0].numpy()
    np.testing.assert_allclose(read_set(dino_store, "train", "cls")[first], expected, rtol=2e-3, atol=2e-3)


def store_prep_entries(path: Path):
    from pkd.preprocess.prep import prep_config_of

    return prep_config_of(store.root_attrs(store.open_store(path)).prep, str(path)).scenes_to_read()


def test_a_set_resumes_shard_by_shard(with_dino):
    whole = read_set(with_dino, "train", "cls")
    root = zarr.open_group(str(with_dino), mode="r+")
    flags = root[f"train/{store.SETS_GROUP}/dino/done"]
    flags[1] = 0
    root[f"train/{store.SETS_GROUP}/dino/cls"][2:4] = 0  # shard 1 (shards of 2): as if killed mid-write
    again = add_set(with_dino, "dino")
    assert again.returncode == 0, again.stderr
    assert "train: target set dino: 1 shards written" in again.stdout
    np.testing.assert_array_equal(read_set(with_dino, "train", "cls"), whole)
    assert "train: target set dino: 0 shards written" in add_set(with_dino, "dino").stdout


@pytest.mark.slow
def test_another_teacher_under_the_same_name_is_refused_unless_overwrite(with_dino):
    before = read_set(with_dino, "train", "cls")
    other = run_script(
        "pkd-prep", "teacher", with_dino, "--name", "dino", "--teacher", "dinov2:small", "--random-weights",
        "--seed", "4", "--no-progress",
    )  # fmt: skip
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "another teacher" in other.stderr and "teacher.seed: 3 -> 4" in other.stderr, other.stderr
    np.testing.assert_array_equal(read_set(with_dino, "train", "cls"), before)
    redone = run_script(
        "pkd-prep", "teacher", with_dino, "--name", "dino", "--teacher", "dinov2:small", "--random-weights",
        "--seed", "4", "--no-progress", "--overwrite",
    )  # fmt: skip
    assert redone.returncode == 0, redone.stderr
    assert store.target_sets(store.open_store(with_dino))["dino"].teacher["seed"] == 4
    assert not np.array_equal(read_set(with_dino, "train", "cls"), before)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (("--name", store.DEFAULT_SET, *DINO), "is the default set"),
        (("--name", "a/b", *DINO), "use letters, digits"),
        (("--name", "x", "--teacher", "dinov2:tiny", "--random-weights"), "dinov2"),
        (("--name", "x", "--teacher", "open_clip:ViT-B-16"), "--random-weights"),
        (("--random-weights",), "go with --name"),
    ],
)
def test_bad_set_arguments_exit_2_naming_the_fix(store_copy, args, message):
    before = tree_digest(store_copy, skip="\0")
    done = run_script("pkd-prep", "teacher", store_copy, *args, "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr
    assert tree_digest(store_copy, skip="\0") == before


@pytest.mark.slow
def test_a_set_needs_the_source_frames(demo_root, tmp_path):
    from pkd.preprocess.prep import RunOptions, run_prep
    from pkd.preprocess.teacher import TeacherConfig

    from conftest import demo_prep_config

    source = tmp_path / "scans"
    shutil.copytree(demo_root, source)
    out = tmp_path / "pairs.zarr"
    run_prep(demo_prep_config(source), str(out), TeacherConfig(kind="random"), RunOptions(progress=False))
    shutil.rmtree(source)
    done = add_set(out, "dino")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "are gone" in done.stderr and str(source) in done.stderr
    assert store.target_sets(store.open_store(out)).keys() == {store.DEFAULT_SET}


def test_info_lists_every_set_with_its_size(dino_store):
    report = json.loads(run_script("pkd-prep", "info", dino_store, "--json").stdout)
    assert list(report["targets"]) == [store.DEFAULT_SET, "dino"]
    assert report["targets"]["dino"]["bytes_per_sample"] == 384 * 2
    assert report["targets"][store.DEFAULT_SET]["bytes_per_sample"] == (10 * 768 + 512) * 2
    text = run_script("pkd-prep", "info", dino_store).stdout
    assert "dino: dinov2:small  RANDOM WEIGHTS  [cls (384,)]  0.8 KiB/sample" in text


def test_verify_checks_the_added_sets(with_dino):
    root = zarr.open_group(str(with_dino), mode="r+")
    cls = root[f"train/{store.SETS_GROUP}/dino/cls"]
    first = int(np.asarray(root["train/valid"][:]).argmax())
    row = cls[first]
    row[0] = np.nan
    cls[first] = row
    faults = verify_store(str(with_dino))
    assert any("dino/cls" in f and "NaN" in f for f in faults), faults


@pytest.mark.slow
def test_a_version_2_store_reads_and_takes_a_set(store_copy):
    root = zarr.open_group(str(store_copy), mode="r+")
    attrs = dict(root.attrs)
    del attrs["targets"]
    root.attrs.put({**attrs, "version": 2})
    assert list(store.target_sets(store.open_store(store_copy))) == [store.DEFAULT_SET]
    done = add_set(store_copy, "dino")
    assert done.returncode == 0, done.stderr
    assert zarr.open_group(str(store_copy), mode="r").attrs["version"] == store.VERSION
