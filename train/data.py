"""Store-backed batches: whole-shard reads, shuffling within a window of shards, deterministic per (seed, epoch).

Data streams: each epoch's shard order (from (seed, epoch)) is dealt round-robin into ``streams`` streams;
every stream shuffles its samples within windows of ``shuffle_shards`` shards, and batch i is the
concatenation over streams s = 0..S-1 of stream s's i-th chunk of batch_size/S samples. Under DDP, rank r
of W owns streams r, r+W, … and reads only their (whole) shards, so the global batch, and every sample's
place in it, is the same for any world size that divides S. With one stream and one rank this is the
plain single-process loader.

An epoch's order depends only on (seed, epoch, streams) and the store's ``valid`` flags, so it can be
computed without reading samples: resuming at batch b skips straight to the windows that hold it.
Worker processes take whole windows, round-robin in the order the batches need them, and the
DataLoader's in-order delivery hands them back in that order, so the batches are the same for any
number of workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pkd.common.errors import ConfigError, StoreError
from pkd.common.geometry import farthest_points
from pkd.common.store import (
    array_of,
    iter_shards,
    open_split,
    open_store,
    read_rows,
    read_stats,
    split_group,
    target_moments,
)

POINT_ARRAYS = ("points", "colors", "pixels", "in_view")
MIN_STD = 1e-6


def target_stats(group: zarr.Group, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-element mean and std of a target array: the split's recorded stats, else computed from valid samples."""
    shape = cast(zarr.Array, group[name]).shape[1:]
    moments = read_stats(group, name) or target_moments(group, name)
    if moments is None:
        raise StoreError(f"cannot normalise {name!r}: the split has no valid samples.")
    mean, std = (np.asarray(v, dtype=np.float64).reshape(shape) for v in moments)
    return mean.astype(np.float32), np.maximum(std, MIN_STD).astype(np.float32)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that decides which samples form which batch (picklable, so workers can rebuild windows).

    ``streams`` None means one stream per rank (``world_size``); it must be a multiple of ``world_size``
    and divide ``batch_size``. ``subsample`` is how ``num_points`` below the stored count are picked
    (``subsample_points``).
    """

    store: str
    split: str
    arrays: tuple[str, ...]
    batch_size: int
    num_points: int
    seed: int = 0
    shuffle_shards: int = 4
    rank: int = 0
    world_size: int = 1
    streams: int | None = None
    subsample: str = "random"

    @property
    def num_streams(self) -> int:
        return self.streams or self.world_size

    @property
    def own_streams(self) -> list[int]:
        """The streams this rank reads: rank, rank + world_size, …"""
        return list(range(self.rank, self.num_streams, self.world_size))

    @property
    def chunk(self) -> int:
        """Samples each stream contributes to a batch."""
        return self.batch_size // self.num_streams


class _Epoch:
    """The window layout of one epoch for one rank: the windows of its streams, in the order batches need them.

    ``windows[k]`` (shard indices) belongs to stream ``stream[k]`` and is that stream's window number
    ``index[k]``; ``start[k]`` is the stream sample offset of its first sample and ``sizes[k]`` its valid samples.
    """

    def __init__(self, cfg: LoaderConfig, shards: list[tuple[int, int]], valid: np.ndarray, epoch: int) -> None:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(shards))
        step = max(1, cfg.shuffle_shards)
        items = []
        for position, s in enumerate(cfg.own_streams):
            mine = order[s :: cfg.num_streams]
            offset = 0
            for w, i in enumerate(range(0, len(mine), step)):
                window = mine[i : i + step]
                size = sum(int(valid[shards[x][0] : shards[x][1]].sum()) for x in window)
                items.append((offset // max(1, cfg.chunk), position, s, w, offset, size, window))
                offset += size
        items.sort(key=lambda item: item[:2])
        self.stream = [item[2] for item in items]
        self.index = [item[3] for item in items]
        self.start = [item[4] for item in items]
        self.sizes = [item[5] for item in items]
        self.windows = [item[6] for item in items]
        self.seed = (cfg.seed, epoch)

    def rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([*self.seed, self.stream[k], self.index[k]])


class _WindowDataset(IterableDataset):
    """Yields whole windows (dicts of numpy arrays, shuffled, subsampled, normalised): the items ``todo`` names.

    ``shards`` and ``valid`` are the loader's (read once, not per window); the arrays are opened once per
    process (``arrays``, rebuilt in each worker).
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        epoch: _Epoch,
        todo: list[int],
        stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
        layout: tuple[list[tuple[int, int]], np.ndarray],
        arrays: dict[str, zarr.Array] | None,
    ) -> None:
        self.cfg, self.epoch, self.todo, self.stats = cfg, epoch, todo, stats
        self.shards, self.valid = layout
        self._arrays = arrays

    def arrays(self) -> dict[str, zarr.Array]:
        if self._arrays is None:  # in a worker: the loader already checked the split (open_split)
            group = split_group(open_store(self.cfg.store), self.cfg.split)
            self._arrays = {name: array_of(group, name) for name in self.cfg.arrays}
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, k in enumerate(self.todo):
            if i % workers == worker:
                yield self.load(k)

    def load(self, w: int) -> dict[str, np.ndarray]:
        """Window ``w``: its valid samples in the order of the window's permutation, each decoded straight
        into its shuffled place (no concatenate-then-gather copies)."""
        ranges = [self.shards[s] for s in self.epoch.windows[w]]
        rows = [np.flatnonzero(self.valid[a:b]) for a, b in ranges]
        rng = self.epoch.rng(w)
        perm = rng.permutation(sum(len(r) for r in rows))
        place = np.empty_like(perm)
        place[perm] = np.arange(len(perm))
        bounds = np.cumsum([0, *(len(r) for r in rows)])
        out = {}
        for name, array in self.arrays().items():
            values = np.empty((len(perm), *array.shape[1:]), array.dtype)
            for (a, b), r, lo, hi in zip(ranges, rows, bounds[:-1], bounds[1:]):
                read_rows(array, a, b, r, values, place[lo:hi])
            out[name] = normalize(values, self.stats.get(name))
        return subsample_points(out, self.cfg.num_points, rng, self.cfg.subsample)


def subsample_points(
    arrays: dict[str, np.ndarray], num_points: int, rng: np.random.Generator, method: str = "random"
) -> dict[str, np.ndarray]:
    """Keep ``num_points`` points (in stored order) of every sample, in every per-point array.

    ``random`` draws them from ``rng`` (a fresh subset each epoch); ``fps`` takes the farthest-point subset
    with the prep's own sampler (``pkd.common.geometry.farthest_points``: fpsample's QuickFPS, deterministic),
    the same for every epoch and seed and ``rng`` unused.
    """
    count, stored = arrays["points"].shape[:2]
    if num_points >= stored:
        return arrays
    if method == "fps":
        keep = np.stack([np.sort(farthest_points(points, num_points)) for points in arrays["points"]])
    else:
        keep = np.argpartition(rng.random((count, stored)), num_points - 1, axis=1)
        keep = np.sort(keep[:, :num_points], axis=1)
    return {
        name: np.take_along_axis(values, keep.reshape(*keep.shape, *(1,) * (values.ndim - 2)), axis=1)
        if name in POINT_ARRAYS
        else values
        for name, values in arrays.items()
    }


def normalize(values: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """(values - mean) / std with a target's stats; ``values`` unchanged without stats."""
    if stats is None:
        return values
    mean, std = stats
    out = values.astype(np.float32)
    out -= mean
    out /= std
    return out


def to_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A batch array as the model's tensor (uint16 to int32, float16/64 to float32); a worker's window
    arrives as tensors, which numpy views without a copy."""
    values = np.asarray(values)
    if values.dtype == np.uint16:
        values = values.astype(np.int32)
    elif values.dtype in (np.float16, np.float64):
        values = values.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(values))


class StoreLoader:
    """Batches of one split: ``for batch in loader.epoch(e, start_batch=b)`` yields dicts of tensors.

    Every epoch yields exactly ``steps_per_epoch`` full batches: the same number for every rank and every
    world size (it only depends on the number of streams). Under DDP a rank's batch holds the chunks of
    its streams (``cfg.own_streams``, ``cfg.chunk`` samples each), in stream order.
    """

    def __init__(
        self, cfg: LoaderConfig, num_workers: int = 0, stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
    ) -> None:
        self.cfg, self.num_workers, self.stats = cfg, num_workers, dict(stats or {})
        streams = cfg.num_streams
        if streams % cfg.world_size:
            raise ConfigError(
                f"{cfg.world_size} processes cannot share {streams} data streams evenly; pass "
                f"--streams as a multiple of the number of processes (e.g. {cfg.world_size})."
            )
        if cfg.batch_size % streams:
            raise ConfigError(
                f"batch size {cfg.batch_size} does not split into {streams} data streams; pass a "
                f"--batch-size that is a multiple of {streams} (or change --streams)."
            )
        self.group = open_split(cfg.store, cfg.split, require=cfg.arrays)
        stored = cast(zarr.Array, self.group["points"]).shape[1]
        if cfg.num_points > stored:
            raise ConfigError(
                f"the model wants {cfg.num_points} points per sample but {cfg.store}/{cfg.split} "
                f"stores {stored}; pass --num-points {stored} or less."
            )
        self.shards = [(start, stop) for _, start, stop in iter_shards(self.group)]
        self.valid = np.asarray(cast(zarr.Array, self.group["valid"])[:]).astype(bool)
        per_shard = sorted(int(self.valid[a:b].sum()) for a, b in self.shards)
        worst_stream = sum(per_shard[: len(per_shard) // streams])
        self.steps_per_epoch = worst_stream // cfg.chunk
        if self.steps_per_epoch == 0:
            if streams == 1:
                raise ConfigError(
                    f"batch size {cfg.batch_size} is larger than the {worst_stream} valid samples "
                    f"{cfg.store}/{cfg.split} holds; pass a smaller --batch-size."
                )
            raise ConfigError(
                f"batch size {cfg.batch_size} takes {cfg.chunk} samples from each of {streams} data "
                f"streams, but a stream of {cfg.store}/{cfg.split} may get only {worst_stream} valid "
                f"samples ({len(per_shard)} shards dealt into {streams} streams); pass a smaller "
                "--batch-size or fewer --streams."
            )

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` from batch index ``start_batch`` on."""
        layout = _Epoch(self.cfg, self.shards, self.valid, epoch)
        skip = start_batch * self.cfg.chunk
        # the windows that still hold samples; the first of each stream is entered ``skip - start`` samples in
        todo = [k for k in range(len(layout.windows)) if layout.start[k] + layout.sizes[k] > skip]
        arrays = {name: array_of(self.group, name) for name in self.cfg.arrays} if self.num_workers == 0 else None
        dataset = _WindowDataset(self.cfg, layout, todo, self.stats, (self.shards, self.valid), arrays)
        windows: Iterator = (
            iter(dataset)
            if self.num_workers == 0
            else iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False))
        )
        streams = [(layout.stream[k], max(0, skip - layout.start[k])) for k in todo]
        return self._batches(zip(streams, windows), self.steps_per_epoch - start_batch)

    def _batches(self, windows: Iterator, count: int) -> Iterator[dict[str, torch.Tensor]]:
        size = self.cfg.chunk
        buffered: dict[int, deque] = {s: deque() for s in self.cfg.own_streams}  # (window, position) per stream
        have = dict.fromkeys(buffered, 0)
        while count > 0:
            parts: list[dict[str, np.ndarray]] = []
            for s in self.cfg.own_streams:
                while have[s] < size:
                    (t, skip), window = next(windows)
                    buffered[t].append([window, skip])
                    have[t] += len(window["points"]) - skip
                need, queue = size, buffered[s]
                while need:
                    window, pos = queue[0]
                    take = min(need, len(window["points"]) - pos)
                    parts.append({k: v[pos : pos + take] for k, v in window.items()})
                    need, queue[0][1] = need - take, pos + take
                    if queue[0][1] == len(window["points"]):
                        queue.popleft()
                have[s] -= size
            # a batch from one window is a slice of it, handed on without a copy
            yield {
                k: to_tensor(parts[0][k] if len(parts) == 1 else np.concatenate([p[k] for p in parts]))
                for k in parts[0]
            }
            count -= 1
