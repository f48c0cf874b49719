"""`pkd-prep scannet` as a function: plan, create or resume the store, build missing shards, finalize.

Resuming is the normal path: a rerun of the same command skips every shard whose done flag is set and
produces the same arrays as an uninterrupted run. A rerun with other arguments is refused, naming the
differences; ``overwrite`` replaces a pkd store (never a foreign folder).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pkd.common import lock, store
from pkd.common.config import config_diff, from_plain, package_versions, to_plain
from pkd.common.errors import ConfigError, DataError, StoreError
from pkd.common.logs import progress_bar
from pkd.common.signals import Interrupts
from pkd.preprocess.config import PrepConfig, RunOptions, TeacherConfig
from pkd.preprocess.planner import SplitPlan, plan_splits
from pkd.preprocess.scenes import describe_splits
from pkd.preprocess.shard_writer import ShardJob, build_shard, stage_name
from pkd.preprocess.teacher import Teacher, build_teacher, teacher_config_identity

log = logging.getLogger(__name__)


@contextmanager
def store_lock(out: str) -> Iterator[None]:
    """Hold the kernel lock ``<store>.lock`` beside a local store for the whole prep (see ``pkd.common.lock``):
    a second prep on the same store is refused at once, naming the holder's pid."""
    if store.is_remote(out):
        log.warning("%s is remote: pkd cannot lock it, make sure no other prep writes it", out)
        yield
        return
    with lock.exclusive(out, "pkd-prep", StoreError):
        yield


def _refuse_a_file(out: str) -> None:
    if not store.is_remote(out) and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a store; choose another --out.")


def _staging(out: str) -> str:
    """Where ``--overwrite`` builds the replacement of ``out``: beside it, swapped in only on success."""
    if store.is_remote(out):
        raise ConfigError(f"--overwrite is not supported for remote store {out}; delete it with your storage tools.")
    store.open_store(out)  # refuses a foreign folder before anything is written
    return str(Path(out).with_name(Path(out).name + ".overwrite"))


def _swap(staging: str, out: str) -> None:
    """Replace ``out`` by the finished ``staging`` store (two renames), then delete the old one."""
    old = Path(out).with_name(Path(out).name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old)


def _drop_stale_staging(staging: str, cfg: PrepConfig, teacher_id: Mapping[str, Any]) -> None:
    """Keep an interrupted ``--overwrite`` build of the same arguments (it resumes), delete any other."""
    if not Path(staging).exists() or _half_created(staging):
        return
    try:
        _refuse_other_arguments(store.open_store(staging), cfg, teacher_id, staging)
    except (ConfigError, StoreError):
        shutil.rmtree(staging)


def _store_exists(out: str) -> bool:
    if store.is_remote(out):
        try:
            zarr.open_group(out, mode="r")
            return True
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return False
    return Path(out).exists()


def _open_or_create(
    out: str, cfg: PrepConfig, plans: dict[str, SplitPlan], teacher_id: store.TeacherAttrs, patch_tokens: bool
) -> zarr.Group:
    if _store_exists(out) and not _half_created(out):
        root = store.open_store(out, mode="r+")
        _refuse_other_arguments(root, cfg, teacher_id.comparable(), out)
        if dropped := store.drop_partial_writes(out):
            log.info("%s: removed %d temp files of writes an earlier prep was killed in", out, dropped)
        check_plans(root, plans, cfg, out)
        return root
    prep = to_plain(cfg)
    created = store.RootAttrs(prep=prep, teacher=teacher_id, versions=package_versions(), status=store.CREATING)
    root = zarr.open_group(out, mode="w", attributes=created.to_dict())  # one write: a pkd store from its first file
    for name, plan in plans.items():
        split = store.SplitAttrs(
            scenes=tuple(e.name for e in plan.scenes),
            num_samples=len(plan.samples),
            shard_size=cfg.shard_size,
            color_sizes=tuple(plan.color_sizes),
            plan=plan.fingerprint(),
            plan_skipped=dict(plan.skipped),
        )
        store.create_split(root, name, split, cfg.geometry.num_points, patch_tokens=patch_tokens)
    store.write_root_attrs(
        root, store.RootAttrs(prep=prep, teacher=teacher_id, versions=package_versions(), status="in-progress")
    )
    return root


def _half_created(out: str) -> bool:
    """A store interrupted before its first shard (an empty folder, or status still CREATING): created again."""
    if not store.is_remote(out) and Path(out).is_dir() and not any(Path(out).iterdir()):
        return True
    try:
        return zarr.open_group(out, mode="r").attrs.get("status") == store.CREATING
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False


def _refuse_other_arguments(root: zarr.Group, cfg: PrepConfig, teacher_id: Mapping[str, Any], out: str) -> None:
    """Refuse to resume a store written with other prep arguments or another teacher, naming the differences.

    ``teacher_id`` is a teacher's ``TeacherAttrs.comparable()``, or only the keys known before the teacher is
    built (``teacher_config_identity``): then just those are compared, so a wrong option is refused before
    the seconds-long teacher build.
    """
    attrs = store.root_attrs(root)
    recorded = {k: v for k, v in attrs.teacher.comparable().items() if k in teacher_id}
    geometry_diff = config_diff(attrs.prep, to_plain(cfg))
    teacher_diff = config_diff(recorded, dict(teacher_id), "teacher.")
    if geometry_diff or teacher_diff:
        hint = (
            ""
            if geometry_diff
            else f"\nTo recompute only the teacher targets, run `pkd-prep teacher {out}` with the new teacher options."
        )
        raise ConfigError(
            f"{out} was written with other arguments:\n  "
            + "\n  ".join(geometry_diff + teacher_diff)
            + "\nRerun with the original arguments to resume, pass --overwrite to replace it, "
            "or choose another --out." + hint
        )


def check_plans(root: zarr.Group, plans: dict[str, SplitPlan], cfg: PrepConfig, out: str) -> None:
    for name, plan in plans.items():
        if name not in root or store.split_attrs(store.split_group(root, name)).plan != plan.fingerprint():
            raise ConfigError(
                f"the scenes under {cfg.root} changed since {out} was planned (split {name}); "
                "pass --overwrite to rebuild the store or --out for a new one."
            )


def _jobs(plan: SplitPlan, cfg: PrepConfig, group: zarr.Group) -> list[ShardJob]:
    done = {stage: store.done_shards(group, stage) for stage in store.STAGES}
    jobs = []
    for shard, (start, stop) in enumerate(plan.shards(cfg.shard_size)):
        stages = tuple(s for s in store.STAGES if not done[s][shard])
        if stages:
            jobs.append(
                ShardJob(
                    split=plan.split,
                    shard=shard,
                    scenes=tuple(plan.scenes),
                    samples=tuple(plan.samples[start:stop]),
                    seed=cfg.seed,
                    geometry=cfg.geometry,
                    stages=stages,
                )
            )
    return jobs


def finalize(group: zarr.Group) -> dict:
    """Write a complete split's summary: skip counts, valid count and per-dimension target statistics."""
    attrs = store.split_attrs(group)
    skipped = Counter(attrs.plan_skipped)
    counts = np.asarray(store.array_of(group, "skipped_counts")[:]).sum(axis=0)
    skipped.update({r: int(c) for r, c in zip(attrs.skip_reasons, counts) if c})
    valid = np.asarray(store.array_of(group, "valid")[:]).astype(bool)
    for name in ("prefix", "clip_embed"):
        write_target_stats(group, name)
    store.write_split_attrs(group, replace(attrs, skipped=dict(skipped), valid=int(valid.sum())))
    return {"skipped": dict(skipped), "valid": int(valid.sum())}


def write_target_stats(group: zarr.Group, path: str) -> None:
    """Record the per-dimension mean and std of the valid samples of target array ``path`` (none without any)."""
    moments = store.target_moments(group, path)
    if moments is not None:
        store.write_stats(group, path, *moments)


def _run_here(root: zarr.Group, jobs: list[ShardJob], teacher: Teacher, options: RunOptions) -> None:
    for _, grouped in groupby(jobs, key=lambda job: job.split):
        split_jobs = list(grouped)
        with progress_bar(
            total=sum(len(j.samples) for j in split_jobs),
            desc=stage_name(split_jobs),
            unit="frame",
            disable=not options.progress,
        ) as bar:
            for job in split_jobs:
                Interrupts.check()
                build_shard(
                    store.split_group(root, job.split), job, teacher, options.teacher_batch, options.threads, bar.update
                )


def run_prep(cfg: PrepConfig, out: str, teacher_cfg: TeacherConfig, options: RunOptions = RunOptions()) -> dict:
    """Build (or resume) the pair store at ``out``; returns a summary per split."""
    out = store.store_path(out)
    entries = cfg.scenes_to_read()
    log.info("scenes under %s by split: %s", cfg.root, describe_splits(entries))
    _refuse_a_file(out)
    if not options.overwrite and _store_exists(out) and not _half_created(out):
        _refuse_other_arguments(store.open_store(out), cfg, teacher_config_identity(teacher_cfg), out)
    teacher = build_teacher(teacher_cfg)
    with store_lock(out):
        target = _staging(out) if options.overwrite and _store_exists(out) else out
        plans = plan_splits(entries, cfg.frame_skip, cfg.limit, options.progress)
        if not any(plan.samples for plan in plans.values()):
            skipped: Counter[str] = Counter()
            for plan in plans.values():
                skipped.update(plan.skipped)
            raise DataError(
                f"no usable frames under {cfg.root}: every frame numbered 0, {cfg.frame_skip}, "
                f"{2 * cfg.frame_skip}, … was skipped ({dict(skipped) or 'the scenes hold no frames'}); "
                "check the scans or lower --frame-skip."
            )
        if target != out:
            _drop_stale_staging(target, cfg, teacher.identity.comparable())
        root = _open_or_create(target, cfg, plans, teacher.identity, teacher_cfg.patch_tokens)
        with _disk_full_is_store_error(target):
            summary = _build(target, root, cfg, plans, teacher, teacher_cfg, options)
        _require_valid(summary, target, out)
        if target != out:
            _swap(target, out)
        return summary


def _require_valid(summary: dict, written: str, out: str) -> None:
    """DataError when a split ended without one valid sample: training on it would be meaningless."""
    empty = [
        f"{name} ({s['samples']} planned, skipped {s['skipped']})" for name, s in summary.items() if not s["valid"]
    ]
    if empty:
        kept = f"; {out} is untouched (the new store is at {written})" if written != out else ""
        raise DataError(
            f"no valid sample in split {', '.join(empty)}: check the depth frames and that --num-points "
            f"is not above the valid depth pixels of a frame{kept}."
        )


def run_teacher(out: str, teacher_cfg: TeacherConfig, options: RunOptions = RunOptions()) -> dict:
    """Recompute only the teacher arrays of an existing store (e.g. real weights after a random demo).

    Geometry is kept; targets already computed by the same teacher identity are never recomputed.
    The frames are read again from the dataset path recorded in the store.
    """
    out = store.store_path(out)
    with store_lock(out):
        root = store.open_store(out, mode="r+")
        store.drop_partial_writes(out)
        attrs = store.root_attrs(root)
        cfg = prep_config_of(attrs.prep, out)
        teacher = build_teacher(teacher_cfg)
        if config_diff(attrs.teacher.comparable(), teacher.identity.comparable()):
            for name in store.splits_of(root):
                group = store.split_group(root, name)
                store.reset_stage(group, "teacher")
                if teacher_cfg.patch_tokens and "patch_tokens" not in group:
                    store.add_array(
                        group,
                        next(s for s in store.array_specs(cfg.geometry.num_points, True) if s.name == "patch_tokens"),
                    )
            store.write_root_attrs(root, replace(attrs, teacher=teacher.identity, status="in-progress"))
        entries = cfg.scenes_to_read()
        plans = plan_splits(entries, cfg.frame_skip, cfg.limit, options.progress)
        check_plans(root, plans, cfg, out)
        with _disk_full_is_store_error(out):
            return _build(out, root, cfg, plans, teacher, teacher_cfg, options)


def prep_config_of(recorded: Mapping[str, Any], out: str) -> PrepConfig:
    """The PrepConfig a store was written with, from its ``prep`` attrs; a StoreError (not a TypeError)
    names the fields when they do not match this pkd's PrepConfig."""
    try:
        return from_plain(PrepConfig, recorded, f"{out} prep attrs")
    except ConfigError as exc:
        raise StoreError(
            f"{exc}. The store was written by another pkd version with the same store version "
            f"({store.VERSION}); rerun that pkd, or rebuild the store with this one "
            "(`pkd-prep scannet ... --overwrite`)."
        ) from exc


@contextmanager
def _disk_full_is_store_error(out: str) -> Iterator[None]:
    """A full disk (or file-size limit) while writing ``out`` becomes a StoreError saying how to go on."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise StoreError(
            f"out of disk space while writing {out} ({exc.strerror}). Free space (or choose another "
            "--out) and rerun the same command: finished shards are kept and the store resumes."
        ) from exc


def _build(
    out: str,
    root: zarr.Group,
    cfg: PrepConfig,
    plans: dict[str, SplitPlan],
    teacher: Teacher,
    teacher_cfg: TeacherConfig,
    options: RunOptions,
) -> dict:
    jobs = [job for name, plan in plans.items() for job in _jobs(plan, cfg, store.split_group(root, name))]
    if options.dask_workers or options.scheduler:
        from pkd.preprocess.distributed import run_on_dask

        run_on_dask(
            out,
            jobs,
            teacher_cfg,
            options.teacher_batch,
            options.threads,
            options.dask_workers,
            options.scheduler,
            options.progress,
        )
    else:
        _run_here(root, jobs, teacher, options)
    summary = {}
    for name, plan in plans.items():
        written = sum(j.split == name for j in jobs)
        group = store.split_group(root, name)
        # a split with nothing new keeps its summary: no need to re-read every target for the stats
        attrs = store.split_attrs(group)
        kept = not written and attrs.skipped is not None
        done = {"skipped": dict(attrs.skipped or {}), "valid": attrs.valid} if kept else None
        summary[name] = (done or finalize(group)) | {"samples": len(plan.samples), "shards_written": written}
    store.write_root_attrs(root, replace(store.root_attrs(root), status="complete"))
    return summary
