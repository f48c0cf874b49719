"""ShapeNetPart part-segmentation finetuning (Point-MAE's ``segmentation/main.py``) as a ``Task``.

Training: train+val shapes, 2048 points drawn with replacement, isotropic scale U(0.8, 1.25) and shift
U(-0.1, 0.1), cross-entropy over all 50 parts. Evaluation: test shapes redrawn at every evaluation, as
Point-MAE's ``PartNormalDataset`` draws ``npoints`` with replacement each time its test loader runs (seeded
by seed and epoch here; the final report by the seed alone), each point's prediction restricted to its
category's parts; per-shape IoU → instance and class mIoU, in percent.

The loop is Point-MAE's (``segmentation/main.py`` at commit 336d42f): each batch steps the optimizer twice,
once with the raw gradients (line 202) and once more after clipping them to norm 10 (lines 205–210), unless
``--no-double-step``; Point-MAE reports the best instance mIoU and the best class mIoU, each over all epochs
(lines 310–316), so results.json's ``best.over_epochs`` gives both (value and epoch), beside the records and
``test`` scores of ``best.pt`` (the best instance-mIoU epoch's weights, as Point-MAE saves ``best_model.pth``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pkd.common.config import option
from pkd.train.augment import random_scale_shift
from pkd.train.downstream import metrics
from pkd.train.downstream.config import FinetuneConfig, ShapeData, redefault
from pkd.train.downstream.models import PartSegmenter
from pkd.train.downstream.plots import plot_category_iou
from pkd.train.downstream.registry import Benchmark, register
from pkd.train.downstream.results import coverage, coverage_note, percent
from pkd.train.downstream.sampling import numpy_rng, ordered_batches, shuffled_batches, stage_bar
from pkd.train.downstream.shapenetpart import CATEGORIES, CATEGORY_PARTS, NUM_PARTS, PartSet, load_shapenetpart

SCALE, SHIFT = (0.8, 1.25), 0.1
IOU_PLOT = "category_iou.png"


def restricted_prediction(logits: torch.Tensor, category: int) -> np.ndarray:
    """Argmax of (N, 50) logits over the parts of ``category`` only, as global part ids."""
    parts = CATEGORY_PARTS[CATEGORIES[category]]
    return np.asarray(parts)[logits[:, list(parts)].argmax(dim=-1).cpu().numpy()]


@dataclass(frozen=True, kw_only=True)
class ShapeNetPartConfig(ShapeData, FinetuneConfig):
    """Point-MAE's ``segmentation/main.py`` (current): --learning_rate 0.0002 --epoch 300, batch 16, 2048 points;
    ``CosineLRScheduler(t_initial=args.epoch, warmup_t=10)``: cosine over all epochs; two optimizer steps per
    batch (``double_step``)."""

    batch_size: int = redefault(FinetuneConfig, "batch_size", 16)
    lr: float = redefault(FinetuneConfig, "lr", 2e-4)
    num_points: int = redefault(FinetuneConfig, "num_points", 2048)
    num_group: int = redefault(FinetuneConfig, "num_group", 128)
    double_step: bool = option(
        True, "step twice per batch, first unclipped, then clipped to --grad-clip (Point-MAE's loop)"
    )

    def unclipped_step(self) -> bool:
        return self.double_step


class ShapeNetPartTask:
    """ShapeNetPart trainval/test data and a ``PartSegmenter``."""

    benchmark = "shapenetpart"
    protocol = "Point-MAE segmentation/main.py"
    headline = ("instance_miou", "class_miou")

    def __init__(self, cfg: ShapeNetPartConfig) -> None:
        self.cfg = cfg
        self.train_set = load_shapenetpart(cfg.data, "trainval", splits=cfg.splits, allow_missing=cfg.allow_missing)
        self.test_set = load_shapenetpart(cfg.data, "test", splits=cfg.splits, allow_missing=cfg.allow_missing)
        self.model = PartSegmenter(NUM_PARTS, len(CATEGORIES), cfg).to(cfg.device)

    def data_summary(self) -> dict[str, Any]:
        return {
            "train_shapes": len(self.train_set.names),
            "test_shapes": len(self.test_set.names),
            "missing_train": self.train_set.missing,
            "missing_test": self.test_set.missing,
            "train_split": "trainval",
            "coverage": coverage(len(self.test_set.names), self.test_set.missing, "test"),
        }

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return shuffled_batches(len(self.train_set.names), self.cfg.batch_size, self.cfg.seed, epoch)

    def _forward(
        self,
        shapes: PartSet,
        batch: np.ndarray,
        draws: list[tuple[np.ndarray, np.ndarray]],
        generator: torch.Generator | None,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.cfg.device
        points = torch.from_numpy(np.stack([d[0] for d in draws])).to(device)
        if generator is not None:
            points = random_scale_shift(points, generator, SCALE, SHIFT, per_axis=False)
        category = torch.from_numpy(shapes.categories[batch]).to(device)
        labels = torch.from_numpy(np.stack([d[1] for d in draws])).to(device)
        return (model or self.model)(points, category), labels

    def loss(self, model: torch.nn.Module, batch: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        rng = numpy_rng(generator)
        draws = [self.train_set.sample(i, self.cfg.num_points, rng) for i in batch]
        logits, labels = self._forward(self.train_set, batch, draws, generator, model)
        return F.cross_entropy(logits.reshape(-1, NUM_PARTS), labels.reshape(-1))

    @torch.no_grad()
    def _shape_ious(self, *seed: int) -> tuple[list[float], list[str], float]:
        """Per-shape IoUs, categories and point accuracy of one test draw fixed by ``seed``."""
        self.model.eval()
        rng = np.random.default_rng(list(seed))
        draws = [self.test_set.sample(i, self.cfg.num_points, rng) for i in range(len(self.test_set.names))]
        ious, cats, correct = [], [], 0
        batches = ordered_batches(len(draws), self.cfg.batch_size)
        for batch in stage_bar(batches, "evaluation", len(batches)):
            logits, labels = self._forward(self.test_set, batch, [draws[i] for i in batch], None)
            for row, i in enumerate(batch):
                category = int(self.test_set.categories[i])
                pred, label = restricted_prediction(logits[row], category), labels[row].cpu().numpy()
                ious.append(metrics.shape_iou(pred, label, CATEGORY_PARTS[CATEGORIES[category]]))
                cats.append(CATEGORIES[category])
                correct += int((pred == label).sum())
        return ious, cats, correct / (len(draws) * self.cfg.num_points)

    def _scores(self, *seed: int) -> dict[str, Any]:
        ious, cats, accuracy = self._shape_ious(*seed)
        return {
            "instance_miou": percent(metrics.instance_miou(ious)),
            "class_miou": percent(metrics.class_miou(ious, cats)),
            "point_acc": percent(accuracy),
            "category_miou": {c: percent(v) for c, v in metrics.category_mious(ious, cats).items()},
        }

    def evaluate(self, epoch: int) -> dict[str, float]:
        scores = self._scores(self.cfg.seed, epoch)
        scores.pop("category_miou")
        return {"score": scores["instance_miou"], **scores}

    def report(self, run_dir: Path) -> dict[str, Any]:
        result = self._scores(self.cfg.seed)
        plot_category_iou(
            result["category_miou"],
            run_dir / IOU_PLOT,
            f"ShapeNetPart test: instance mIoU {result['instance_miou']:.2f} %, "
            f"class mIoU {result['class_miou']:.2f} %, {coverage_note(self.data_summary()['coverage'])}",
        )
        return result


register(
    Benchmark(
        name="shapenetpart",
        config=ShapeNetPartConfig,
        build=ShapeNetPartTask,
        summary="ShapeNetPart part segmentation: instance and class mIoU.",
        data_help="ShapeNetPart folder (shapenetcore_partanno_segmentation_benchmark_v0_normal)",
        best_of=("instance_miou", "class_miou"),
    )
)
