"""Learning-rate schedules as pure functions of explicit numbers.

Pre-training steps its rate every optimizer step (``Schedule``, ``lr_at``: linear warm-up to ``lr``, then
cosine to ``min_lr``); fine-tuning follows Point-MAE's CosLR, stepped once per epoch (``epoch_lr``: linear
warm-up from ``min_lr``, then cosine, as timm's ``CosineLRScheduler``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Optimizer steps of warm-up and of the whole schedule, and where this launch stops."""

    warmup: int
    total: int
    stop: int

    @classmethod
    def of(
        cls,
        *,
        epochs: int,
        warmup_epochs: int,
        steps_per_epoch: int,
        max_steps: int | None = None,
        stop_after: int | None = None,
    ) -> Schedule:
        """``epochs`` × ``steps_per_epoch`` steps, or ``max_steps`` with warm-up the same fraction of them;
        ``stop_after`` ends this launch early without changing the schedule."""
        if max_steps:
            total, warmup = max_steps, round(max_steps * warmup_epochs / epochs)
        else:
            total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
        return cls(warmup=min(warmup, total), total=total, stop=min(total, stop_after or total))


def cosine(lr: float, min_lr: float, progress: float) -> float:
    """Half a cosine from ``lr`` (progress 0) down to ``min_lr`` (progress 1 and beyond)."""
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return cosine(lr, min_lr, (step - warmup) / max(1, total - warmup))


def epoch_lr(epoch: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Point-MAE's CosLR: linear warm-up from ``min_lr`` over ``warmup`` epochs, cosine to ``min_lr`` at epoch
    ``total`` (counted from epoch 0, warm-up included)."""
    if epoch < warmup:
        return min_lr + epoch * (lr - min_lr) / warmup
    return cosine(lr, min_lr, epoch / total)
