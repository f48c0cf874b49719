"""Prep on a dask.distributed cluster: one task per shard, each worker writing whole shards.

The client plans, creates the store and writes the final attrs; workers only fill shards, so the
result is the same as a single-process run. A worker that dies mid-shard leaves that shard without its
done flag; dask retries the task elsewhere and the retry rewrites the shard whole.
"""

from __future__ import annotations

import logging

import zarr
from dask.distributed import Client, LocalCluster, as_completed

from pkd.common import store
from pkd.common.logs import progress_bar
from pkd.preprocess.config import TeacherConfig
from pkd.preprocess.shard_writer import ShardJob, build_shard, stage_name
from pkd.preprocess.teacher import Teacher, build_teacher

log = logging.getLogger(__name__)
RETRIES = 3
_teachers: dict[TeacherConfig, Teacher] = {}


def shard_task(out: str, job: ShardJob, teacher_cfg: TeacherConfig, teacher_batch: int, threads: int) -> dict:
    """Build one shard on a worker; the worker keeps one teacher for all its tasks."""
    if teacher_cfg not in _teachers:
        _teachers[teacher_cfg] = build_teacher(teacher_cfg)
    group = store.split_group(zarr.open_group(out, mode="r+"), job.split)
    return dict(build_shard(group, job, _teachers[teacher_cfg], teacher_batch, threads))


def run_on_dask(
    out: str,
    jobs: list[ShardJob],
    teacher_cfg: TeacherConfig,
    teacher_batch: int,
    threads: int,
    workers: int,
    scheduler: str | None,
    progress: bool,
) -> None:
    """Run shard jobs on an existing scheduler or a local cluster of ``workers`` processes."""
    cluster = (
        None
        if scheduler
        else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    )
    with Client(scheduler or cluster) as client:
        log.info("dask dashboard: %s", client.dashboard_link)
        futures = [
            client.submit(
                shard_task,
                out,
                job,
                teacher_cfg,
                teacher_batch,
                threads,
                retries=RETRIES,
                key=f"pkd-shard-{job.split}-{job.shard}",
                pure=False,
            )
            for job in jobs
        ]
        sizes = {f.key: len(job.samples) for f, job in zip(futures, jobs)}
        with progress_bar(
            total=sum(sizes.values()), desc=f"{stage_name(jobs)} (dask)", unit="frame", disable=not progress
        ) as bar:
            for future in as_completed(futures):
                future.result()
                bar.update(sizes[future.key])
    if cluster is not None:
        cluster.close()
