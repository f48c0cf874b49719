"""Held-out loss: the run's own objective on the store's ``val`` split, in a fixed order with fixed draws.

Every evaluation sees the same samples (the first ``val_max_samples`` valid ones), the same point subsets,
the same reconstruction masks and no augmentation beyond unit-sphere normalisation, with the model in eval
mode (no drop-path, BatchNorm running statistics) and no global RNG touched, so the curve moves only with
the weights and a resumed run logs what an uninterrupted one logs. ``--monitor-recon`` adds the Chamfer
loss of a frozen, randomly initialised decoder on masked patches (paper Table 7, ``pkd.train.monitor``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import cast

import numpy as np
import torch

from pkd.common.store import iter_shards, open_split, open_store, read_shard, splits_of
from pkd.train.augment import normalize_unit_sphere
from pkd.train.config import TrainConfig
from pkd.train.data import normalize, subsample_points, to_tensor
from pkd.train.losses import LossSettings, compute_loss
from pkd.train.model import Student
from pkd.train.monitor import ReconMonitor

log = logging.getLogger(__name__)


def has_heldout(cfg: TrainConfig) -> bool:
    """Whether the run's store has its held-out split; when not, says so once in the log."""
    if cfg.val_split in splits_of(open_store(cfg.store)):
        return True
    log.warning(
        "%s has no %r split: no held-out loss is logged (pass --val-split to use another).", cfg.store, cfg.val_split
    )
    return False


class HeldOut:
    """The held-out split of a run; ``evaluate`` returns its mean loss (and parts) for a model."""

    def __init__(
        self,
        cfg: TrainConfig,
        arrays: tuple[str, ...],
        stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
        settings: LossSettings,
        batch_size: int,
    ) -> None:
        self.cfg, self.arrays, self.stats, self.settings = cfg, arrays, dict(stats), settings
        self.batch_size = batch_size
        self.group = open_split(cfg.store, cfg.val_split, require=arrays)
        self.monitor = ReconMonitor(cfg, settings) if cfg.monitor_recon else None

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out samples in store order, in batches of ``batch_size`` (the last one may be smaller)."""
        left = self.cfg.val_max_samples or int(cast(int, self.group.attrs["num_samples"]))
        buffer: dict[str, np.ndarray] = {}
        for shard, start, stop in iter_shards(self.group):
            if left <= 0:
                break
            valid = read_shard(self.group, "valid", start, stop).astype(bool)
            arrays = {
                name: normalize(read_shard(self.group, name, start, stop)[valid][:left], self.stats.get(name))
                for name in self.arrays
            }
            rng = np.random.default_rng([self.cfg.seed, shard])
            arrays = subsample_points(arrays, self.cfg.model.num_points, rng, self.cfg.subsample)
            left -= len(arrays["points"])
            buffer = {k: np.concatenate([buffer[k], v]) if buffer else v for k, v in arrays.items()}
            while len(buffer["points"]) >= self.batch_size:
                yield {k: to_tensor(v[: self.batch_size]) for k, v in buffer.items()}
                buffer = {k: v[self.batch_size :] for k, v in buffer.items()}
        if buffer and len(buffer["points"]):
            yield {k: to_tensor(v) for k, v in buffer.items()}

    @torch.no_grad()
    def evaluate(
        self, model: Student, device: torch.device, autocast: Callable[[], AbstractContextManager]
    ) -> dict[str, float]:
        """Mean loss, its parts and (with ``--monitor-recon``) ``monitor_recon`` over the held-out samples."""
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        totals: dict[str, float] = {}
        count = 0
        for batch in self.batches():
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["points"] = normalize_unit_sphere(batch["points"])
            size = len(batch["points"])
            with autocast():
                loss, parts = compute_loss(model, batch, self.settings, generator)
                values = {"loss": float(loss), **{k: float(v) for k, v in parts.items()}}
                if self.monitor is not None:
                    values["monitor_recon"] = self.monitor.loss(model, batch["points"], generator)
            totals = {k: totals.get(k, 0.0) + v * size for k, v in values.items()}
            count += size
        model.train(was_training)
        return {**{k: v / count for k, v in totals.items()}, "samples": count} if count else {}
