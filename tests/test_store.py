"""The store as a contract: typed attrs, schema versions, upgrades, and one description of the format."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from pkd.common import store
from pkd.common.config import to_plain
from pkd.common.errors import ConfigError, StoreError
from pkd.common.geometry import teacher_crop_box
from pkd.common.verify import verify_store
from pkd.preprocess.prep import PrepConfig
from pkd.train.data import LoaderConfig, StoreLoader

from store_factory import make_store

PKD_PREP = str(Path(sys.executable).with_name("pkd-prep"))


def field_names(value: object, prefix: str = "") -> set[str]:
    """Dotted names of every (nested) field of a dataclass instance."""
    names = set()
    for f in dataclasses.fields(value):  # type: ignore[arg-type]
        inner = getattr(value, f.name)
        names |= field_names(inner, f"{prefix}{f.name}.") if dataclasses.is_dataclass(inner) else {prefix + f.name}
    return names


def test_schema_of_this_version_is_pinned():
    # Renaming, adding or dropping one of these fields changes what a store holds: bump store.VERSION and add
    # an upgrade step to store._UPGRADES, then update this list.
    assert store.VERSION == 3
    teacher = store.TeacherAttrs.from_dict(make_teacher_dict())
    assert field_names(PrepConfig(root="r")) == {
        "root",
        "split",
        "scenes",
        "source",
        "frame_skip",
        "limit",
        "shard_size",
        "seed",
        "geometry.num_points",
        "geometry.sampling",
        "geometry.fps_candidates",
        "geometry.min_depth",
        "geometry.max_depth",
        "geometry.min_valid_pixels",
        "geometry.teacher_image_size",
        "depth_scale",
    }
    assert field_names(teacher) == {
        "clip_model",
        "mapper",
        "kind",
        "random",
        "seed",
        "clip_weights",
        "clip_weights_sha256",
        "clipcap_weights",
        "clipcap_weights_sha256",
        "precision",
        "device",
        "clip_embed",
        "patch_tokens",
        "open_clip_version",
        *(f"transform.{k}" for k in ("image_size", "resize", "interpolation", "center_crop", "mean", "std", "steps")),
    }
    assert {f.name for f in dataclasses.fields(store.RootAttrs)} == {
        "format",
        "version",
        "prep",
        "teacher",
        "versions",
        "status",
        "targets",
    }
    assert {f.name for f in dataclasses.fields(store.TargetSetAttrs)} == {
        "teacher",
        "device",
        "transform",
        "arrays",
        "status",
    }
    assert {f.name for f in dataclasses.fields(store.TargetArrayAttrs)} == {"shape", "dtype", "meaning"}
    assert {f.name for f in dataclasses.fields(store.SplitAttrs)} == {
        "scenes",
        "num_samples",
        "shard_size",
        "skip_reasons",
        "color_sizes",
        "plan",
        "plan_skipped",
        "skipped",
        "valid",
    }


def make_teacher_dict() -> dict:
    from store_factory import synthetic_teacher

    return synthetic_teacher(3, patch_tokens=False).to_dict()


def test_attrs_round_trip_and_validate():
    teacher = store.TeacherAttrs.from_dict(make_teacher_dict())
    assert teacher.transform.image_size == 224 and teacher.seed == 3 and isinstance(teacher.transform.mean, tuple)
    split = store.SplitAttrs(
        scenes=("a", "b"),
        num_samples=5,
        shard_size=2,
        color_sizes=((640, 480), (640, 480)),
        plan_skipped={"invalid_pose": 1},
    )
    assert store.SplitAttrs.from_dict(split.to_dict()) == split and split.num_shards == 3
    root = store.RootAttrs(prep=to_plain(PrepConfig(root="r")), teacher=teacher, versions={}, status="complete")
    assert store.RootAttrs.from_dict(root.to_dict()) == root and root.num_points == 4096
    with pytest.raises(ConfigError, match="status 'done'"):
        dataclasses.replace(root, status="done")
    with pytest.raises(ConfigError, match="valid 9"):
        dataclasses.replace(split, valid=9)
    with pytest.raises(ConfigError, match="skip reasons"):
        dataclasses.replace(split, skipped={"cosmic_ray": 1})
    with pytest.raises(ConfigError, match="precision"):
        dataclasses.replace(teacher, precision="int8")
    with pytest.raises(ConfigError, match=r"unknown fields \['name'\], missing fields \['clip_model'"):
        store.TeacherAttrs.from_dict(
            {**{k: v for k, v in make_teacher_dict().items() if k != "clip_model"}, "name": "x"}
        )


def test_factory_store_passes_verify_and_records_skip_columns(tmp_path):
    path = make_store(tmp_path / "s.zarr", n=6, num_points=64, shard_size=4, invalid=(1,))
    assert verify_store(str(path)) == []
    root = store.open_store(path)
    attrs = store.read_attrs(root, path)
    assert attrs.root.status == "complete" and attrs.splits["train"].skip_reasons == store.SKIP_REASONS
    assert attrs.splits["train"].valid == 5
    assert root["train"]["skipped_counts"].shape == (2, len(store.SKIP_REASONS))


def rewrite_attrs(path: Path, root_change: dict, split_drop: tuple[str, ...] = ()) -> None:
    """Write attrs as another pkd would (bypassing store.py on purpose)."""
    root = zarr.open_group(str(path), mode="r+")
    root.attrs.update(root_change)
    split = root["train"]
    split.attrs.put({k: v for k, v in split.attrs.items() if k not in split_drop})


def test_version_1_store_is_read_then_upgraded(tmp_path):
    path = make_store(tmp_path / "v1.zarr", n=4, num_points=64, shard_size=2)
    v1_split_attrs = ("skip_reasons", "color_sizes", "plan", "plan_skipped")
    v1_prep = {k: v for k, v in zarr.open_group(str(path), mode="r").attrs["prep"].items() if k != "depth_scale"}
    rewrite_attrs(path, {"version": 1, "prep": v1_prep, "targets": None}, v1_split_attrs)
    zarr.open_group(str(path), mode="r+").attrs.__delitem__("targets")
    loader = StoreLoader(LoaderConfig(str(path), "train", ("points",), 2, 64, 0))
    assert sum(len(b["points"]) for b in loader.epoch(0)) == 4  # read without an upgrade
    assert store.read_attrs(store.open_store(path), path).read_version == 1
    done = subprocess.run([PKD_PREP, "upgrade", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and f"version 1 -> {store.VERSION}" in done.stdout, done.stderr
    raw = zarr.open_group(str(path), mode="r")
    assert raw.attrs["version"] == store.VERSION and raw["train"].attrs["skip_reasons"] == list(store.SKIP_REASONS)
    assert raw.attrs["targets"] == {}
    assert raw.attrs["prep"]["depth_scale"] is None
    assert verify_store(str(path)) == []


def test_newer_or_broken_store_is_refused_with_a_way_out(tmp_path):
    path = make_store(tmp_path / "v9.zarr", n=2, num_points=64)
    rewrite_attrs(path, {"version": 9, "versions": {"pkd": "9.0"}})
    with pytest.raises(StoreError, match=r"version 9 \(written by pkd 9.0\).*Install pkd 9.0"):
        store.open_store(path)
    rewrite_attrs(path, {"version": store.VERSION, "status": "half-done"})
    with pytest.raises(StoreError, match="status 'half-done'.*--overwrite"):
        store.open_store(path)


def test_renamed_prep_field_is_an_error_not_a_traceback(tmp_path):
    path = make_store(tmp_path / "renamed.zarr", n=2, num_points=64)
    prep = dict(zarr.open_group(str(path), mode="r").attrs["prep"])
    prep["frame_stride"] = prep.pop("frame_skip")
    rewrite_attrs(path, {"prep": prep})
    done = subprocess.run([PKD_PREP, "teacher", str(path), "--teacher", "random"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.search(r"unknown fields \['frame_stride'\], missing fields \['frame_skip'\]", done.stderr)


def test_teacher_crop_comes_from_the_store(tmp_path):
    path = make_store(tmp_path / "c.zarr", n=2, num_points=64, color_size=(640, 480))
    assert store.teacher_crop(path, "train") == teacher_crop_box(640, 480, 224)
    assert store.teacher_crop(path, "train")[1::2] == (0, 480)
    with pytest.raises(StoreError, match="no colour image sizes"):
        store.teacher_crop(make_store(tmp_path / "none.zarr", n=2, num_points=64, color_size=None), "train")


def documented_names() -> set[str]:
    """Every attr and array the code writes, as the docs must name them."""
    arrays = {spec.name for spec in store.array_specs(16, patch_tokens=True)}
    stats = {"stats/{prefix,clip_embed}_{mean,std}"}
    attrs = {f.name for cls in (store.RootAttrs, store.SplitAttrs) for f in dataclasses.fields(cls)}
    return arrays | stats | attrs | {f"done_{s}" for s in store.STAGES} | {"skipped_counts"}


def test_readme_and_module_docstring_name_every_attr_and_array():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### The store") : readme.index("### Teacher weights")]
    for text, where in ((store.__doc__, "common/store.py docstring"), (section, "README store section")):
        missing = sorted(
            name for name in documented_names() if not re.search(rf"(?<![\w/]){re.escape(name)}(?![\w/])", text)
        )
        assert not missing, f"{where} does not describe {missing}"
    assert f"(`pkd-pairs`, version {store.VERSION})" in section


def test_temp_files_of_killed_writes_are_dropped_and_nothing_else(tmp_path):
    """zarr's local store writes ``zarr.<hex>.partial`` then renames it; a SIGKILL in between leaves the temp file
    (found by the prep crash-point enumeration), which a resumed prep removes."""
    path = make_store(tmp_path / "s.zarr", n=4, num_points=64, shard_size=2)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    stale = [path / "zarr.1cfe8bd89fa645de8e2dda592918310f.partial", path / "train" / "points" / "zarr.ab.partial"]
    for file in stale:
        file.write_bytes(b"half a write")
    assert store.drop_partial_writes(path) == 2
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert store.drop_partial_writes(path) == 0
