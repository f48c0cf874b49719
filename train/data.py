"""Store-backed batches: whole-shard reads, shuffling within a window of shards, deterministic per (seed, epoch).

An epoch's order depends only on (seed, epoch, rank, world_size) and the store's ``valid`` flags, so it
can be computed without reading samples: resuming at batch b skips straight to the window that holds
it. Each rank takes whole shards (for DDP); worker processes take whole windows, round-robin, and the
DataLoader's in-order delivery hands them back in window order, so the batches are the same for any
number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pkd.common.errors import ConfigError, StoreError
from pkd.common.store import iter_shards, open_split, read_shard, read_stats

POINT_ARRAYS = ("points", "colors", "pixels", "in_view")
MIN_STD = 1e-6


def target_stats(group: zarr.Group, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-element mean and std of a target array: the split's recorded stats, else computed from valid samples."""
    shape = group[name].shape[1:]
    recorded = read_stats(group, name)
    if recorded is not None:
        mean, std = (np.asarray(v, dtype=np.float64).reshape(shape) for v in recorded)
    else:
        total, total_sq, count = np.zeros(shape), np.zeros(shape), 0
        for _, start, stop in iter_shards(group):
            valid = read_shard(group, "valid", start, stop).astype(bool)
            values = read_shard(group, name, start, stop)[valid].astype(np.float64)
            total += values.sum(0)
            total_sq += (values ** 2).sum(0)
            count += len(values)
        if count == 0:
            raise StoreError(f"cannot normalise {name!r}: the split has no valid samples.")
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, MIN_STD).astype(np.float32)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that decides which samples form which batch (picklable, so workers can rebuild windows)."""

    store: str
    split: str
    arrays: tuple[str, ...]
    batch_size: int
    num_points: int
    seed: int = 0
    shuffle_shards: int = 4
    rank: int = 0
    world_size: int = 1


class _Epoch:
    """The window layout of one epoch for one rank."""

    def __init__(self, cfg: LoaderConfig, shards: list[tuple[int, int]], valid: np.ndarray, epoch: int) -> None:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(shards))[cfg.rank::cfg.world_size]
        step = max(1, cfg.shuffle_shards)
        self.windows = [order[i:i + step] for i in range(0, len(order), step)]
        self.sizes = [sum(int(valid[shards[s][0]:shards[s][1]].sum()) for s in w) for w in self.windows]
        self.seed = (cfg.seed, epoch, cfg.rank)

    def rng(self, window: int) -> np.random.Generator:
        return np.random.default_rng([*self.seed, window])


class _WindowDataset(IterableDataset):
    """Yields whole windows (dicts of numpy arrays, shuffled, subsampled, normalised) from ``first`` on."""

    def __init__(self, cfg: LoaderConfig, epoch: "_Epoch", first: int,
                 stats: Mapping[str, tuple[np.ndarray, np.ndarray]], group: zarr.Group | None) -> None:
        self.cfg, self.epoch, self.first, self.stats = cfg, epoch, first, stats
        self._group = group

    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = open_split(self.cfg.store, self.cfg.split)
        return self._group

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for w in range(self.first, len(self.epoch.windows)):
            if (w - self.first) % workers == worker:
                yield self.load(w)

    def load(self, w: int) -> dict[str, np.ndarray]:
        group = self.group()
        shards = list(iter_shards(group))
        ranges = [shards[s][1:] for s in self.epoch.windows[w]]
        valid = [read_shard(group, "valid", a, b).astype(bool) for a, b in ranges]
        rng = self.epoch.rng(w)
        perm = rng.permutation(sum(int(v.sum()) for v in valid))
        out = {}
        for name in self.cfg.arrays:
            values = np.concatenate([read_shard(group, name, a, b)[v] for (a, b), v in zip(ranges, valid)])[perm]
            if name in self.stats:
                mean, std = self.stats[name]
                values = (values.astype(np.float32) - mean) / std
            out[name] = values
        stored = group["points"].shape[1]
        if self.cfg.num_points < stored:
            keep = np.argpartition(rng.random((len(perm), stored)), self.cfg.num_points - 1, axis=1)
            keep = np.sort(keep[:, :self.cfg.num_points], axis=1)
            for name in set(out) & set(POINT_ARRAYS):
                out[name] = np.take_along_axis(out[name], keep.reshape(*keep.shape, *(1,) * (out[name].ndim - 2)),
                                               axis=1)
        return out


def _to_tensor(values: np.ndarray) -> torch.Tensor:
    if values.dtype == np.uint16:
        values = values.astype(np.int32)
    elif values.dtype in (np.float16, np.float64):
        values = values.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(values))


class StoreLoader:
    """Batches of one split: ``for batch in loader.epoch(e, start_batch=b)`` yields dicts of tensors.

    Every epoch yields exactly ``steps_per_epoch`` full batches (the same number on every rank).
    """

    def __init__(self, cfg: LoaderConfig, num_workers: int = 0,
                 stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.cfg, self.num_workers, self.stats = cfg, num_workers, dict(stats or {})
        self.group = open_split(cfg.store, cfg.split, require=cfg.arrays)
        stored = self.group["points"].shape[1]
        if cfg.num_points > stored:
            raise ConfigError(f"the model wants {cfg.num_points} points per sample but {cfg.store}/{cfg.split} "
                              f"stores {stored}; pass --num-points {stored} or less.")
        self.shards = [(start, stop) for _, start, stop in iter_shards(self.group)]
        self.valid = self.group["valid"][:].astype(bool)
        per_shard = sorted(int(self.valid[a:b].sum()) for a, b in self.shards)
        worst_rank = sum(per_shard[:len(per_shard) // cfg.world_size])
        self.steps_per_epoch = worst_rank // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch size {cfg.batch_size} is larger than the {worst_rank} valid samples "
                              f"{cfg.store}/{cfg.split} gives each of {cfg.world_size} rank(s); "
                              "pass a smaller --batch-size.")

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` from batch index ``start_batch`` on."""
        layout = _Epoch(self.cfg, self.shards, self.valid, epoch)
        skip = start_batch * self.cfg.batch_size
        first = 0
        while first < len(layout.sizes) and skip >= layout.sizes[first]:
            skip -= layout.sizes[first]
            first += 1
        dataset = _WindowDataset(self.cfg, layout, first, self.stats,
                                 self.group if self.num_workers == 0 else None)
        windows: Iterator = iter(dataset) if self.num_workers == 0 else iter(
            DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False))
        return self._batches(windows, skip, self.steps_per_epoch - start_batch)

    def _batches(self, windows: Iterator, skip: int, count: int) -> Iterator[dict[str, torch.Tensor]]:
        size = self.cfg.batch_size
        parts: list[dict[str, np.ndarray]] = []
        need = size
        for window in windows:
            length, pos, skip = len(window["points"]), skip, 0
            while pos < length and count > 0:
                take = min(need, length - pos)
                parts.append({k: v[pos:pos + take] for k, v in window.items()})
                pos, need = pos + take, need - take
                if need == 0:
                    yield {k: _to_tensor(np.concatenate([p[k] for p in parts])) for k in parts[0]}
                    parts, need, count = [], size, count - 1
            if count <= 0:
                break


def store_path(path: str | Path) -> str:
    """A store path as recorded in configs: absolute for local paths, unchanged for URLs."""
    return str(path) if "://" in str(path) else str(Path(path).resolve())
