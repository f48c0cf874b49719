"""Batch-level point sampling and augmentation for finetuning, on whatever device the batch is on.

Point-MAE's classification protocol (``tools/runner_finetune.py``): its datasets shuffle every training
cloud (``datasets/ModelNetDataset.py``, ``ScanObjectNNDataset.py``, ``ModelNetDatasetFewShot.py``:
``np.random.shuffle(pt_idxs)`` for subset 'train'), so the 1200-point FPS that follows starts from a random
point; a random 1024 of those (the same columns for the whole batch) are kept. Testing takes a plain
1024-point FPS of the unshuffled cloud; voting repeats the training draw from that unshuffled FPS pool.
The augmentations (per-axis ScaleAndTranslate for classification, the isotropic scale + shift of the
part-segmentation script) are pre-training's ``pkd.train.augment.random_scale_shift``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from pkd.common.logs import progress_bar
from pkd.train.tokenizer import farthest_point_sample, gather_points


def fps(points: torch.Tensor, num: int) -> torch.Tensor:
    """(B, P, 3) → the (B, num, 3) farthest point sample starting at point 0."""
    return gather_points(points, farthest_point_sample(points, num))


def shuffle_points(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Every cloud of (B, P, 3) in its own random point order (Point-MAE's per-sample ``np.random.shuffle``)."""
    order = torch.rand(points.shape[:2], generator=generator).argsort(dim=1).to(points.device)
    return torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def fps_pool_size(num_points: int, available: int) -> int:
    """How many FPS points Point-MAE draws from before picking ``num_points`` at random (1024 → 1200)."""
    return min(available, num_points * 75 // 64)


def random_columns(points: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """The same random ``num`` of the P points of every cloud (B, P, 3) → (B, num, 3)."""
    return points[:, torch.randperm(points.shape[1], generator=generator)[:num].to(points.device)]


def shuffled_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Full batches of a permutation of range(count) fixed by (seed, epoch); the remainder is dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return [order[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def ordered_batches(count: int, batch_size: int) -> list[np.ndarray]:
    """range(count) in order, in batches of ``batch_size`` (the last one may be smaller): for evaluation."""
    return [np.arange(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``generator``, for draws numpy does better (resampling shapes)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


T = TypeVar("T")


def stage_bar(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A transient progress bar named after its stage (evaluation, voting, features); silent when not a TTY."""
    return iter(
        progress_bar(items, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
    )
