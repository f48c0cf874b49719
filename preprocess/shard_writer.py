"""Compute and write one whole shard: read its frames, build samples in threads, run the teacher.

A shard is the unit of work (one dask task at scale): it is computed in memory and written with one
assignment per array followed by its done flag, so no partial shard ever counts.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
import zarr
from PIL import Image

from pkd.common import store
from pkd.common.errors import ConfigError
from pkd.common.geometry import derive_seed
from pkd.preprocess.frame_sample import FrameSample, GeometryConfig, SkipFrame, make_sample
from pkd.preprocess.frames import Camera, RawFrame
from pkd.preprocess.scenes import SceneEntry, open_scene
from pkd.preprocess.teacher import Teacher


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """Everything needed to (re)build one shard, independent of any other shard."""

    split: str
    shard: int
    scenes: tuple[SceneEntry, ...]
    samples: tuple[tuple[int, int], ...]
    seed: int
    geometry: GeometryConfig
    stages: tuple[str, ...]


def stage_name(jobs: Sequence[ShardJob]) -> str:
    """What a progress bar over these jobs does, e.g. "prep test: geometry+teacher"."""
    splits = ",".join(dict.fromkeys(job.split for job in jobs))
    stages = "+".join(stage for stage in store.STAGES if any(stage in job.stages for job in jobs))
    return f"prep {splits}: {stages}"


@dataclass
class _Prepared:
    sample: FrameSample
    teacher_input: torch.Tensor | None


def _raw_frames(job: ShardJob) -> Iterator[tuple[SceneEntry, Camera, RawFrame]]:
    for scene, group in groupby(job.samples, key=lambda s: s[0]):
        frames = [frame for _, frame in group]
        entry = job.scenes[scene]
        with open_scene(entry) as reader:
            for raw in reader.read(frames):
                yield entry, reader.camera, raw


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """Like pool.map, but never more than ``window`` items in flight (bounded memory)."""
    in_flight: deque[Future] = deque()
    for item in items:
        in_flight.append(pool.submit(fn, *item))
        if len(in_flight) >= window:
            yield in_flight.popleft().result()
    while in_flight:
        yield in_flight.popleft().result()


def build_shard(
    group: zarr.Group,
    job: ShardJob,
    teacher: Teacher | None,
    teacher_batch: int = 32,
    workers: int = 2,
    on_sample: Callable[[], None] = lambda: None,
) -> Counter:
    """Compute the shard's samples and write the stages the job names; returns skip counts by reason."""
    n = len(job.samples)
    specs = store.array_specs(job.geometry.num_points, patch_tokens="patch_tokens" in group)
    arrays = {s.name: np.zeros((n, *s.sample_shape), dtype=s.dtype) for s in specs}
    skipped: Counter = Counter()
    pending: list[tuple[int, torch.Tensor]] = []

    def prepare(entry: SceneEntry, camera: Camera, raw: RawFrame) -> _Prepared | str:
        try:
            sample = make_sample(raw, camera, job.geometry, derive_seed(job.seed, entry.name, raw.frame))
        except SkipFrame as skip:
            return skip.reason
        image = teacher.transform(Image.fromarray(sample.image)) if teacher is not None else None
        return _Prepared(sample, image)

    def flush() -> None:
        if not pending or teacher is None:  # without a teacher nothing is pending
            return
        out = teacher.encode(torch.stack([t for _, t in pending]))
        rows = [i for i, _ in pending]
        arrays["prefix"][rows] = out.prefix.float().cpu().numpy()
        arrays["clip_embed"][rows] = out.clip_embed.float().cpu().numpy()
        if "patch_tokens" in arrays:
            if out.patch_tokens is None:
                raise ConfigError(
                    f"{group.store}/{group.path} holds patch_tokens but the teacher computes none; pass --patch-tokens."
                )
            arrays["patch_tokens"][rows] = out.patch_tokens.float().cpu().numpy()
        pending.clear()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = ordered_map(pool, prepare, _raw_frames(job), window=2 * teacher_batch)
        for i, ((scene, frame), result) in enumerate(zip(job.samples, results, strict=True)):
            arrays["scene"][i] = scene
            arrays["frame"][i] = frame
            on_sample()
            if isinstance(result, str):
                skipped[result] += 1
                continue
            s = result.sample
            arrays["points"][i], arrays["colors"][i], arrays["pixels"][i] = s.points, s.colors, s.pixels
            arrays["in_view"][i], arrays["pose"][i], arrays["valid"][i] = s.in_view, s.pose, True
            if result.teacher_input is not None:
                pending.append((i, result.teacher_input))
                if len(pending) >= teacher_batch:
                    flush()
        flush()
    for stage in job.stages:
        data = {s.name: arrays[s.name] for s in specs if s.stage == stage}
        store.write_shard(group, job.shard, stage, data, skipped if stage == "geometry" else None)
    return skipped
