"""ModelNet40 classification finetuning (Point-MAE's ``runner_finetune``) as a ``Task`` for the shared loop.

Training: FPS 1200 of each pooled shape, a random 1024 of those, per-axis ScaleAndTranslate, cross-entropy.
Evaluation: a plain 1024-point FPS. Voting (the final report): logits averaged over ``votes`` training-style
draws with ScaleAndTranslate, as Point-MAE's ``validate_vote`` (one 10-vote pass, not its best-of-300 test).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pkd.train.augment import random_scale_shift
from pkd.train.downstream import metrics
from pkd.train.downstream.engine import FinetuneConfig
from pkd.train.downstream.modelnet import ShapeSet, load_modelnet40
from pkd.train.downstream.models import PointClassifier
from pkd.train.downstream.plots import plot_confusion
from pkd.train.downstream.sampling import fps, fps_pool_size, ordered_batches, random_columns, shuffled_batches

SCALE, TRANSLATE = (2.0 / 3.0, 3.0 / 2.0), 0.2
CONFUSION = "confusion.png"


def load_modelnet_split(cfg: Any, split: str) -> ShapeSet:
    """A ModelNet40 split with the data options of a finetune or probe config."""
    return load_modelnet40(cfg.data, split, splits=cfg.splits, num_points=cfg.pool_points,
                           allow_missing=cfg.allow_missing, trust_pickle=cfg.trust_pickle, cache_dir=cfg.cache_dir)


def class_metrics(logits: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    pred = logits.argmax(dim=-1).numpy()
    return {"overall_acc": metrics.overall_accuracy(pred, labels),
            "mean_class_acc": metrics.mean_class_accuracy(pred, labels, num_classes)}


class ModelNetTask:
    """ModelNet40 train/test data, a ``PointClassifier``, and Point-MAE's sampling protocol."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.train_set = load_modelnet_split(cfg, "train")
        self.test_set = load_modelnet_split(cfg, "test")
        self.classes = self.train_set.classes
        self.model = PointClassifier(len(self.classes), cfg.dim, cfg.depth, cfg.heads, cfg.drop_path,
                                     cfg.num_group, cfg.group_size).to(cfg.device)

    def data_summary(self) -> dict[str, Any]:
        return {"train_shapes": len(self.train_set.labels), "test_shapes": len(self.test_set.labels),
                "missing_train": self.train_set.missing, "missing_test": self.test_set.missing,
                "classes": len(self.classes)}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return shuffled_batches(len(self.train_set.labels), self.cfg.batch_size, self.cfg.seed, epoch)

    def _points(self, shapes: ShapeSet, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(shapes.points[batch]).to(self.cfg.device)

    def _fps_pool(self, points: torch.Tensor) -> torch.Tensor:
        return fps(points, fps_pool_size(self.cfg.num_points, points.shape[1]))

    def _augmented(self, pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random num_points of the FPS pool, then ScaleAndTranslate (training and voting draws)."""
        return random_scale_shift(random_columns(pool, self.cfg.num_points, generator), generator,
                                  SCALE, TRANSLATE, per_axis=True)

    def loss(self, model: torch.nn.Module, batch: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        logits = model(self._augmented(self._fps_pool(self._points(self.train_set, batch)), generator))
        return F.cross_entropy(logits, torch.from_numpy(self.train_set.labels[batch]).to(logits.device))

    @cached_property
    def _plain_test_points(self) -> torch.Tensor:
        """The deterministic num_points FPS of every test shape (CPU), computed once for all evaluations."""
        return torch.cat([fps(self._points(self.test_set, batch), self.cfg.num_points).cpu()
                          for batch in ordered_batches(len(self.test_set.labels), self.cfg.batch_size)])

    @torch.no_grad()
    def test_logits(self, votes: int = 0) -> torch.Tensor:
        """(N_test, classes) logits: plain FPS when ``votes`` is 0, else the mean over ``votes`` augmented draws."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        out = []
        for batch in ordered_batches(len(self.test_set.labels), self.cfg.batch_size):
            if votes:
                pool = self._fps_pool(self._points(self.test_set, batch))
                logits = torch.stack([self.model(self._augmented(pool, generator)) for _ in range(votes)]).mean(0)
            else:
                logits = self.model(self._plain_test_points[batch].to(self.cfg.device))
            out.append(logits.float().cpu())
        return torch.cat(out)

    def evaluate(self) -> dict[str, float]:
        result = class_metrics(self.test_logits(), self.test_set.labels, len(self.classes))
        return {"score": result["overall_acc"], **result}

    def report(self, run_dir: Path) -> dict[str, Any]:
        logits = self.test_logits()
        plain = class_metrics(logits, self.test_set.labels, len(self.classes))
        vote = class_metrics(self.test_logits(self.cfg.votes), self.test_set.labels, len(self.classes))
        matrix = metrics.confusion_matrix(logits.argmax(-1).numpy(), self.test_set.labels, len(self.classes))
        plot_confusion(matrix, self.classes, run_dir / CONFUSION, f"ModelNet40 test, OA {plain['overall_acc']:.2%}")
        return {**plain, "votes": self.cfg.votes, "vote_overall_acc": vote["overall_acc"],
                "vote_mean_class_acc": vote["mean_class_acc"], "confusion_matrix": matrix.tolist(),
                "classes": self.classes}
