"""Add a named target set to an existing store: one pass of another teacher over the frames the store holds.

The images are re-read from the source frames the store's provenance records (``prep.root`` and the planned
samples, checked against the store's plan fingerprint); the geometry and every other target set are never
written. A set is resumable per shard like prep: a shard's arrays are written whole, then its done flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr
from PIL import Image

from pkd.common import store
from pkd.common.config import config_diff
from pkd.common.errors import ConfigError, DataError
from pkd.common.logs import progress_bar
from pkd.preprocess.config import RunOptions
from pkd.preprocess.frames import FrameDecodeError, RawFrame, decode_color
from pkd.preprocess.planner import SplitPlan, plan_splits
from pkd.preprocess.prep import check_plans, prep_config_of, store_lock, write_target_stats
from pkd.preprocess.scenes import SceneEntry, open_scene
from pkd.preprocess.shard_writer import ordered_map

if TYPE_CHECKING:
    from pkd.preprocess.teachers import TargetTeacher

SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STORED_DTYPE = "float16"


def set_arrays(teacher: TargetTeacher) -> dict[str, store.TargetArrayAttrs]:
    """The arrays a teacher's set holds, as the store records them (float16, as the default set's targets)."""
    return {
        a.name: store.TargetArrayAttrs(shape=tuple(a.shape), dtype=STORED_DTYPE, meaning=a.meaning)
        for a in teacher.arrays
    }


def check_set_name(name: str, out: str) -> None:
    """ConfigError for a set name the store cannot hold (the default set's, or not a plain word)."""
    if name == store.DEFAULT_SET:
        raise ConfigError(
            f"--name {name} is the default set, written by the prep: recompute it with `pkd-prep teacher {out}` "
            "without --name, or choose another name for the new set."
        )
    if not SET_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '.' and '-' (e.g. dinov2-base).")


def run_target_set(
    out: str, name: str, teacher: TargetTeacher, device: str, options: RunOptions = RunOptions()
) -> dict:
    """Compute (or resume) the target set ``name`` of the store at ``out`` with ``teacher`` (running on
    ``device``); returns a summary per split. A set of that name from another teacher is refused unless
    ``options.overwrite``."""
    out = store.store_path(out)
    check_set_name(name, out)
    if options.dask_workers or options.scheduler:
        raise ConfigError("a --name pass runs in this process: drop --dask-workers/--scheduler.")
    with store_lock(out):
        root = store.open_store(out, mode="r+")
        store.drop_partial_writes(out)
        attrs = store.root_attrs(root)
        arrays = set_arrays(teacher)
        fresh = _refuse_another_teacher(attrs, name, teacher, arrays, out, options.overwrite)
        cfg = prep_config_of(attrs.prep, out)
        if not Path(cfg.root).is_dir():
            raise DataError(
                f"the frames {out} was prepped from are gone ({cfg.root} does not exist); a new target set needs "
                "the images: restore the dataset at that path and rerun."
            )
        plans = plan_splits(cfg.scenes_to_read(), cfg.frame_skip, cfg.limit, options.progress)
        check_plans(root, plans, cfg, out)
        entry = store.TargetSetAttrs(
            teacher=teacher.identity,
            device=device,
            transform=teacher.transform,
            arrays=arrays,
            status="in-progress",
        )
        store.write_root_attrs(root, replace(attrs, targets={**attrs.targets, name: entry}))
        summary = {}
        for split, plan in plans.items():
            group = store.split_group(root, split)
            if fresh or f"{store.SETS_GROUP}/{name}" not in group:
                store.create_target_set(group, name, arrays)
            valid = np.asarray(store.array_of(group, "valid")[:]).astype(bool)
            written = _fill(group, name, plan, valid, teacher, options)
            for array in arrays:
                write_target_stats(group, f"{store.SETS_GROUP}/{name}/{array}")
            summary[split] = {"shards_written": written, "valid": int(valid.sum())}
        latest = store.root_attrs(root)
        complete = replace(entry, status="complete")
        store.write_root_attrs(root, replace(latest, targets={**latest.targets, name: complete}))
        return summary


def _refuse_another_teacher(
    attrs: store.RootAttrs,
    name: str,
    teacher: TargetTeacher,
    arrays: dict[str, store.TargetArrayAttrs],
    out: str,
    overwrite: bool,
) -> bool:
    """Whether the set must be (re)created: True for a new set or, with ``overwrite``, one of another teacher;
    ConfigError naming the differences for one of another teacher without it."""
    existing = attrs.targets.get(name)
    if existing is None:
        return True
    diff = config_diff(dict(existing.teacher), dict(teacher.identity), "teacher.") + config_diff(
        {k: v.to_dict() for k, v in existing.arrays.items()}, {k: v.to_dict() for k, v in arrays.items()}, "arrays."
    )
    if diff and not overwrite:
        raise ConfigError(
            f"target set {name!r} of {out} was computed by another teacher:\n  "
            + "\n  ".join(diff)
            + "\nPass --overwrite to recompute it, or choose another --name."
        )
    return bool(diff)


def _fill(
    group: zarr.Group, name: str, plan: SplitPlan, valid: np.ndarray, teacher: TargetTeacher, options: RunOptions
) -> int:
    """Compute and write every shard of the set not yet done in one split; returns how many were written."""
    done = store.set_done_shards(group, name)
    todo = [(shard, start, stop) for shard, start, stop in store.iter_shards(group) if not done[shard]]
    with progress_bar(
        total=sum(int(valid[start:stop].sum()) for _, start, stop in todo),
        desc=f"teacher {name} {plan.split}",
        unit="frame",
        disable=not options.progress,
    ) as bar:
        for shard, start, stop in todo:
            rows = [i for i in range(start, stop) if valid[i]]
            data = {a.name: np.zeros((stop - start, *a.shape), STORED_DTYPE) for a in teacher.arrays}
            samples = [(i - start, plan.scenes[plan.samples[i][0]], plan.samples[i][1]) for i in rows]
            for places, batch in _batches(samples, teacher, options):
                for array, values in teacher.encode(batch).items():
                    data[array][places] = values.float().cpu().numpy()
                bar.update(len(places))
            store.write_set_shard(group, name, shard, data)
    return len(todo)


def _images(samples: list[tuple[int, SceneEntry, int]]) -> Iterator[tuple[int, np.ndarray]]:
    """(row, decoded colour frame) of each sample, reading each scene once."""
    for entry, grouped in groupby(samples, key=lambda s: s[1]):
        items = list(grouped)
        with open_scene(entry) as reader:
            for (row, _, frame), raw in zip(items, reader.read([f for _, _, f in items]), strict=True):
                if raw.frame != frame:
                    raise DataError(f"{entry.name}: asked for frame {frame}, read frame {raw.frame}")
                yield row, _decoded(entry, raw)


def _decoded(entry: SceneEntry, raw: RawFrame) -> np.ndarray:
    try:
        return decode_color(raw)
    except FrameDecodeError as exc:
        raise DataError(
            f"{entry.name} frame {raw.frame} decoded when the store was prepped but not now ({exc}): the dataset "
            "changed; rebuild the store."
        ) from exc


def _batches(
    samples: list[tuple[int, SceneEntry, int]], teacher: TargetTeacher, options: RunOptions
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, transformed images) in batches of ``options.teacher_batch``, transforms run in threads."""

    def prepare(row: int, image: np.ndarray) -> tuple[int, torch.Tensor]:
        return row, teacher.preprocess(Image.fromarray(image))

    rows: list[int] = []
    images: list[torch.Tensor] = []
    with ThreadPoolExecutor(max_workers=options.threads) as pool:
        for row, image in ordered_map(pool, prepare, _images(samples), window=2 * options.teacher_batch):
            rows.append(row)
            images.append(image)
            if len(rows) == options.teacher_batch:
                yield rows, torch.stack(images)
                rows, images = [], []
    if rows:
        yield rows, torch.stack(images)
