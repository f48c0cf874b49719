"""Shape classification finetuning (Point-MAE's ``tools/runner_finetune.py``) as a ``Task`` for the shared loop.

One protocol for ModelNet40, ScanObjectNN and few-shot ModelNet40; only the shapes differ. Training: each
cloud shuffled (seeded), an FPS pool of 1200 (1024 points) / 2400 (2048) points starting from its first,
now random, point, a random ``num_points`` of the pool, per-axis ScaleAndTranslate, cross-entropy.
Evaluation after every epoch: a plain ``num_points`` FPS of the unshuffled cloud, plus, when ``votes`` > 0,
logits averaged over ``votes`` training-style draws from the unshuffled pool (``validate_vote``), seeded by
(seed, epoch). The engine keeps the best plain epoch (``ckpt-best``) and the best voting epoch
(``ckpt-best_vote``). Point-MAE votes only on ModelNet40: its ``validate_vote`` has no 2048-point branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer

from pkd.common.config import option
from pkd.common.errors import ConfigError
from pkd.train.augment import random_scale_shift
from pkd.train.downstream import metrics
from pkd.train.downstream.commands import Device
from pkd.train.downstream.config import ClassificationConfig, ModelNetData
from pkd.train.downstream.modelnet import ShapeSet, check_modelnet40, load_modelnet40
from pkd.train.downstream.models import PointClassifier
from pkd.train.downstream.plots import plot_confusion
from pkd.train.downstream.registry import Benchmark, register
from pkd.train.downstream.results import coverage, coverage_note, percent
from pkd.train.downstream.sampling import (
    fps,
    fps_pool_size,
    ordered_batches,
    random_columns,
    shuffle_points,
    shuffled_batches,
    stage_bar,
)

SCALE, TRANSLATE = (2.0 / 3.0, 3.0 / 2.0), 0.2
CONFUSION = "confusion.png"
MODELNET_PROTOCOL = "Point-MAE cfgs/finetune_modelnet.yaml, tools/runner_finetune.py"


def load_modelnet_split(cfg: Any, split: str) -> ShapeSet:
    """A ModelNet40 split with the data options of a finetune or probe config."""
    return load_modelnet40(
        cfg.data,
        split,
        splits=cfg.splits,
        num_points=cfg.pool_points,
        allow_missing=cfg.allow_missing,
        trust_pickle=cfg.trust_pickle,
        cache_dir=cfg.cache_dir,
    )


def check_modelnet_data(cfg: Any) -> dict[str, int]:
    """``check_modelnet40`` with the data options of a finetune or probe config: the shapes per split it uses."""
    return check_modelnet40(
        cfg.data,
        splits=cfg.splits,
        num_points=cfg.pool_points,
        allow_missing=cfg.allow_missing,
        trust_pickle=cfg.trust_pickle,
    )


def class_metrics(logits: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Overall and mean-class accuracy in percent."""
    pred = logits.argmax(dim=-1).numpy()
    return {
        "overall_acc": percent(metrics.overall_accuracy(pred, labels)),
        "mean_class_acc": percent(metrics.mean_class_accuracy(pred, labels, num_classes)),
    }


def augmented_draw(pool: torch.Tensor, num_points: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``num_points`` of an FPS pool, then ScaleAndTranslate (training and voting draws)."""
    return random_scale_shift(random_columns(pool, num_points, generator), generator, SCALE, TRANSLATE, per_axis=True)


def fps_pool(points: torch.Tensor, num_points: int) -> torch.Tensor:
    """The FPS pool of ``runner_finetune``: 1200 points for 1024, 2400 for 2048, at most the cloud."""
    return fps(points, fps_pool_size(num_points, points.shape[1]))


def training_draw(points: torch.Tensor, num_points: int, generator: torch.Generator) -> torch.Tensor:
    """Point-MAE's training input from (B, P, 3) clouds: shuffled, FPS pool, random subset, ScaleAndTranslate."""
    return augmented_draw(fps_pool(shuffle_points(points, generator), num_points), num_points, generator)


def seeded(*keys: int) -> torch.Generator:
    """A torch generator fixed by ``keys`` (e.g. seed and epoch)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


class ClassificationTask:
    """Train/test ``ShapeSet``s, a ``PointClassifier`` and Point-MAE's sampling protocol."""

    headline = ("overall_acc", "mean_class_acc", "vote_overall_acc")

    def __init__(
        self,
        cfg: ClassificationConfig,
        train_set: ShapeSet,
        test_set: ShapeSet,
        classes: list[str],
        benchmark: str,
        protocol: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.train_set, self.test_set, self.classes = cfg, train_set, test_set, classes
        self.benchmark, self.protocol, self.extra = benchmark, protocol, extra or {}
        self.model: torch.nn.Module = PointClassifier(len(classes), cfg).to(cfg.device)

    def data_summary(self) -> dict[str, Any]:
        return {
            "train_shapes": len(self.train_set.labels),
            "test_shapes": len(self.test_set.labels),
            "missing_train": self.train_set.missing,
            "missing_test": self.test_set.missing,
            "classes": len(self.classes),
            "coverage": coverage(len(self.test_set.labels), self.test_set.missing, "test"),
            **self.extra,
        }

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return shuffled_batches(len(self.train_set.labels), self.cfg.batch_size, self.cfg.seed, epoch)

    def _points(self, shapes: ShapeSet, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(shapes.points[batch]).to(self.cfg.device)

    def loss(self, model: torch.nn.Module, batch: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        logits = model(training_draw(self._points(self.train_set, batch), self.cfg.num_points, generator))
        return F.cross_entropy(logits, torch.from_numpy(self.train_set.labels[batch]).to(logits.device))

    @cached_property
    def _plain_test_points(self) -> torch.Tensor:
        """The deterministic num_points FPS of every test shape (CPU), computed once for all evaluations."""
        return torch.cat(
            [
                fps(self._points(self.test_set, batch), self.cfg.num_points).cpu()
                for batch in ordered_batches(len(self.test_set.labels), self.cfg.batch_size)
            ]
        )

    @torch.no_grad()
    def test_logits(self, votes: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N_test, classes) logits: the mean over ``votes`` augmented draws from ``generator``, or plain FPS
        (without a generator or with ``votes`` 0)."""
        self.model.eval()
        batches = ordered_batches(len(self.test_set.labels), self.cfg.batch_size)
        out = []
        for batch in stage_bar(batches, f"{votes}-vote evaluation" if votes else "evaluation", len(batches)):
            if votes and generator is not None:
                pool = fps_pool(self._points(self.test_set, batch), self.cfg.num_points)
                logits = torch.stack(
                    [self.model(augmented_draw(pool, self.cfg.num_points, generator)) for _ in range(votes)]
                ).mean(0)
            else:
                logits = self.model(self._plain_test_points[batch].to(self.cfg.device))
            out.append(logits.float().cpu())
        return torch.cat(out)

    def vote_accuracy(self, generator: torch.Generator) -> dict[str, float]:
        """One ``votes``-vote pass: overall and mean-class accuracy in percent."""
        return class_metrics(self.test_logits(self.cfg.votes, generator), self.test_set.labels, len(self.classes))

    def evaluate(self, epoch: int) -> dict[str, float]:
        result = class_metrics(self.test_logits(), self.test_set.labels, len(self.classes))
        scores = {"score": result["overall_acc"], **result}
        if self.cfg.votes:
            vote = self.vote_accuracy(seeded(self.cfg.seed, epoch))
            scores.update(
                vote_score=vote["overall_acc"],
                vote_overall_acc=vote["overall_acc"],
                vote_mean_class_acc=vote["mean_class_acc"],
            )
        return scores

    def report(self, run_dir: Path) -> dict[str, Any]:
        logits = self.test_logits()
        plain = class_metrics(logits, self.test_set.labels, len(self.classes))
        matrix = metrics.confusion_matrix(logits.argmax(-1).numpy(), self.test_set.labels, len(self.classes))
        note = coverage_note(self.data_summary()["coverage"])
        plot_confusion(
            matrix, self.classes, run_dir / CONFUSION, f"{self.benchmark} test, OA {plain['overall_acc']:.2f} %, {note}"
        )
        result = {**plain, "votes": self.cfg.votes, "confusion_matrix": matrix.tolist(), "classes": self.classes}
        if self.cfg.votes:
            vote = self.vote_accuracy(seeded(self.cfg.seed))
            result.update(vote_overall_acc=vote["overall_acc"], vote_mean_class_acc=vote["mean_class_acc"])
        return result


@dataclass(frozen=True, kw_only=True)
class ModelNet40Config(ModelNetData, ClassificationConfig):
    """ModelNet40 fine-tuning, Point-MAE's ``cfgs/finetune_modelnet.yaml`` (the shared defaults are its)."""

    votes: int = option(10, "voting draws per evaluation (0: no voting)")


def modelnet_task(cfg: ModelNet40Config) -> ClassificationTask:
    """ModelNet40 (``cfgs/finetune_modelnet.yaml``): 8192-point FPS pools, 1024 points, 10 votes."""
    train, test = load_modelnet_split(cfg, "train"), load_modelnet_split(cfg, "test")
    return ClassificationTask(cfg, train, test, train.classes, "modelnet40", MODELNET_PROTOCOL)


def check_modelnet_task(cfg: ModelNet40Config) -> None:
    """What ``modelnet_task`` and the loop would refuse: the data (``check_modelnet_data``) and a batch larger
    than the training shapes."""
    train = check_modelnet_data(cfg).get("train", cfg.batch_size)
    if train < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training set ({train} shapes); lower it.")


def test_modelnet40_command(
    run: Annotated[Path, typer.Argument(help="folder of a finished `pkd-train finetune modelnet40` run")],
    votes: Annotated[int, typer.Option(help="draws averaged per pass (Point-MAE: 10)")] = 10,
    passes: Annotated[int, typer.Option(help="voting passes (Point-MAE's test mode: 299)")] = 299,
    weights: Annotated[str, typer.Option(help="best | best_vote | last")] = "best",
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing RUN/test_votes.json")] = False,
) -> None:
    """Point-MAE's test mode: mean, std and best accuracy over repeated voting passes → RUN/test_votes.json."""
    from pkd.train.downstream.commands import summary
    from pkd.train.downstream.votetest import test_modelnet40

    results = test_modelnet40(run, votes=votes, passes=passes, weights=weights, device=device, overwrite=overwrite)
    typer.echo(f"{passes} passes of {votes} votes ({weights} weights): {summary(results)} → {run}/test_votes.json")


register(
    Benchmark(
        name="modelnet40",
        config=ModelNet40Config,
        build=modelnet_task,
        summary="ModelNet40 classification: OA and mean-class accuracy after every epoch, with and without voting "
        "(best plain epoch → best.pt, best voting epoch → best_vote.pt, as Point-MAE's ckpt-best / ckpt-best_vote).",
        data_help="dataset folder (modelnet40_normal_resampled)",
        test_command=test_modelnet40_command,
        check=check_modelnet_task,
    )
)
