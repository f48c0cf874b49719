"""Inspect and verify a pair store: what `pkd-prep info` and `pkd-prep verify` report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pkd.common import store
from pkd.common.errors import StoreError

FINITE_ARRAYS = ("points", "pose", "prefix", "clip_embed", "patch_tokens")
STATS_ARRAYS = ("prefix", "clip_embed")  # finalize() records their per-dimension mean/std


def _size_on_disk(path: str) -> int | None:
    if store.is_remote(path):
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def store_info(path: str) -> dict[str, Any]:
    """Splits, sample counts, scenes, skip reasons, teacher identity and size of a store."""
    root = store.open_store(path)
    splits = {}
    for name in store.splits_of(root):
        group = store.split_group(root, name)
        attrs = store.split_attrs(group)
        done = {s: int(store.done_shards(group, s).sum()) for s in store.STAGES}
        splits[name] = {
            "samples": attrs.num_samples,
            "valid": group.attrs.get("valid"),
            "scenes": len(attrs.scenes),
            "shards": int(store.array_of(group, "done_geometry").shape[0]),
            "shards_done": done,
            "skipped": group.attrs.get("skipped", group.attrs.get("plan_skipped", {})),
            "arrays": sorted(n for n, _ in group.arrays() if n not in ("done_geometry", "done_teacher")),
        }
    return {
        "path": str(path),
        "status": root.attrs.get("status"),
        "splits": splits,
        "targets": {name: _set_info(root, target) for name, target in store.target_sets(root).items()},
        "teacher": root.attrs.get("teacher"),
        "prep": root.attrs.get("prep"),
        "bytes": _size_on_disk(str(path)),
    }


def _set_info(root: zarr.Group, target: store.TargetSet) -> dict[str, Any]:
    """What `pkd-prep info` says of a target set: its teacher, arrays, stored bytes per sample, shards done."""
    done = {name: int(target.done_shards(store.split_group(root, name)).sum()) for name in store.splits_of(root)}
    return {
        "teacher": dict(target.teacher),
        "arrays": {
            name: {"shape": list(a.shape), "dtype": a.dtype, "meaning": a.meaning} for name, a in target.arrays.items()
        },
        "bytes_per_sample": target.bytes_per_sample(),
        "complete": target.complete,
        "shards_done": done,
    }


def _check_split(name: str, group: zarr.Group, num_points: int) -> list[str]:
    faults = []
    attrs = store.split_attrs(group)
    n = attrs.num_samples
    present = {a for a, _ in group.arrays()}
    for spec in store.array_specs(num_points, patch_tokens="patch_tokens" in present):
        if spec.name not in present:
            faults.append(f"{name}/{spec.name}: missing")
            continue
        array = store.array_of(group, spec.name)
        if array.shape != (n, *spec.sample_shape) or array.dtype != np.dtype(spec.dtype):
            faults.append(
                f"{name}/{spec.name}: shape {array.shape} dtype {array.dtype}, expected "
                f"{(n, *spec.sample_shape)} {spec.dtype}"
            )
    for stage in store.STAGES:
        missing = np.flatnonzero(~store.done_shards(group, stage))
        if missing.size:
            faults.append(f"{name}: shards {missing.tolist()} lack their {stage} arrays (rerun the prep command)")
    faults += [
        f"{name}/{array} shard {shard}: file missing (it would read back as zeros; rebuild the store)"
        for array, shard in store.missing_shards(group)
    ]
    if faults:
        return faults
    num_scenes = len(attrs.scenes)
    names = [spec.name for spec in store.array_specs(num_points, patch_tokens="patch_tokens" in present)]
    for shard, start, stop in store.iter_shards(group):
        where = f"{name} shard {shard} (samples {start}-{stop - 1})"
        values: dict[str, np.ndarray] = {}
        for array_name in names:
            try:
                values[array_name] = store.read_shard(group, array_name, start, stop)
            except StoreError as exc:
                faults.append(f"{where}: {array_name} unreadable: {exc.__cause__}")
        if len(values) < len(names):
            continue
        valid = values["valid"]
        if (values["scene"] < 0).any() or (values["scene"] >= num_scenes).any():
            faults.append(f"{where}: scene index out of range")
        for array_name in FINITE_ARRAYS:
            if array_name in values and not np.isfinite(values[array_name][valid]).all():
                faults.append(f"{where}: {array_name} holds NaN or inf")
    return faults + _check_stats(name, group)


def _check_stats(name: str, group: zarr.Group) -> list[str]:
    """The recorded target statistics (``--normalize-targets`` divides by them): present, finite, std > 0."""
    valid = int(np.asarray(store.array_of(group, "valid")[:]).sum())
    if not valid:
        return [f"{name}: no valid sample"]
    faults = []
    for array in STATS_ARRAYS:
        stats = store.read_stats(group, array)
        if stats is None:
            faults.append(f"{name}/stats: no {array} mean/std recorded (rerun the prep command)")
            continue
        mean, std = stats
        expected = store.array_of(group, array).shape[1:]
        if mean.shape != expected or std.shape != mean.shape:
            faults.append(f"{name}/stats: {array} mean/std of shape {mean.shape}/{std.shape}, expected {expected}")
        elif not (np.isfinite(mean).all() and np.isfinite(std).all()):
            faults.append(f"{name}/stats: {array} mean/std hold NaN or inf")
        elif valid > 1 and not (std > 0).all():
            faults.append(
                f"{name}/stats: {array} std is 0 in {int((std <= 0).sum())} of {std.size} dimensions "
                f"over {valid} valid samples (identical targets: check the teacher)"
            )
    return faults


def verify_store(path: str) -> list[str]:
    """Every fault found in a store (empty when it is complete and sound)."""
    root = store.open_store(path)
    attrs = store.root_attrs(root)
    faults = []
    if attrs.status != "complete":
        faults.append(f"status is {attrs.status!r}, not 'complete' (rerun the prep command)")
    splits = store.splits_of(root)
    if not splits:
        faults.append("no splits")
    added = [target for target in store.target_sets(root).values() if target.name != store.DEFAULT_SET]
    for name in splits:
        group = store.split_group(root, name)
        faults += _check_split(name, group, attrs.num_points)
        for target in added:
            faults += _check_set(name, group, target)
    return faults


def _check_set(split: str, group: zarr.Group, target: store.TargetSet) -> list[str]:
    """Faults of an added target set in one split: complete, shapes, readable, finite, statistics recorded."""
    where = f"{split}/{store.SETS_GROUP}/{target.name}"
    if not target.complete or f"{store.SETS_GROUP}/{target.name}" not in group:
        return [f"{where}: incomplete (rerun `pkd-prep teacher STORE --name {target.name} ...`)"]
    missing = np.flatnonzero(~target.done_shards(group))
    if missing.size:
        return [f"{where}: shards {missing.tolist()} not written (rerun `pkd-prep teacher STORE --name {target.name}`)"]
    valid = np.asarray(store.array_of(group, "valid")[:]).astype(bool)
    n = store.split_attrs(group).num_samples
    faults = []
    for array, spec in target.arrays.items():
        path = target.path(array)
        node = store.array_of(group, path)
        if node.shape != (n, *spec.shape) or node.dtype != np.dtype(spec.dtype):
            faults.append(f"{where}/{array}: shape {node.shape} dtype {node.dtype}, expected {(n, *spec.shape)}")
            continue
        for shard, start, stop in store.iter_shards(group):
            try:
                values = store.read_shard(group, path, start, stop)
            except StoreError as exc:
                faults.append(f"{where}/{array} shard {shard}: unreadable: {exc.__cause__}")
                continue
            if not np.isfinite(values[valid[start:stop]]).all():
                faults.append(f"{where}/{array} shard {shard}: holds NaN or inf")
        if valid.any() and store.read_stats(group, path) is None:
            faults.append(
                f"{where}/{array}: no mean/std recorded (rerun `pkd-prep teacher STORE --name {target.name}`)"
            )
    return faults
