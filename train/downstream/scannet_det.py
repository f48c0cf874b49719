"""ScanNet v2 3D object detection with 3DETR on the pre-trained encoder: the paper's Table 1 and Table 9.

Protocol (paper 2212.08974 appendix A.2, "Object Detection"): 3DETR with its ScanNet settings, 2048 points after
the pre-encoder (``--num-group``), 256 non-parametric queries with Fourier positional embeddings, the pre-trained
12-block 384-wide encoder, an 8-layer decoder of width 256, base lr 5e-4, 720 epochs. Where the paper is silent
pkd follows facebookresearch/3detr: ``main.py`` (batch 8, AdamW weight decay 0.1, warm-up 9 epochs from 1e-6,
cosine to 1e-6, gradient clip 0.1, evaluation every 10 epochs, best weights by mAP@0.25), ``datasets/scannet.py``
(40 000 points, RandomCuboid, flips, ±5° rotation; see ``detection_data``), ``criterion.py`` and
``scripts/scannet_ep1080.sh`` (matcher costs, loss weights; ``detection_loss``), ``models/model_3detr.py`` and
MaskPoint's fork for the encoder plumbing (``detection_model``), ``utils/ap_calculator.py`` for the evaluation
(``detection_metric``). Two differences, both pkd's shared fine-tuning loop: the learning rate changes per epoch
(3DETR: per iteration) and biases/norms have no weight decay (3DETR: ``filter_biases_wd`` off).

Data: the official train/val lists; each scan's raw annotation files are parsed once into the detection cache
(``pkd.common.det_cache``, keyed by data root and file identity). The val split is scored: per scene one fixed
40 000-point sample (seeded by the run's seed and the scene), 3DETR's post-processing, then VOC AP at IoU 0.25 and
0.5. ``report`` writes ``predictions.json`` (rescorable by anyone) and ``class_ap.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pkd.common.config import at_least, option
from pkd.common.det_cache import build_det_cache, det_cache_path, load_det_scene, open_det_cache
from pkd.common.errors import DataError
from pkd.common.logs import progress_bar
from pkd.common.scannet_annotations import DET_CLASSES, DetectionScene
from pkd.common.scannet_mesh import split_scenes
from pkd.train import distributed
from pkd.train.downstream.config import FinetuneConfig, ShapeData, redefault
from pkd.train.downstream.detection_data import SampleConfig, collate, scene_sample
from pkd.train.downstream.detection_loss import SetCriterion
from pkd.train.downstream.detection_metric import average_precision, postprocess, predictions_json
from pkd.train.downstream.detection_model import Detector
from pkd.train.downstream.plots import plot_class_iou
from pkd.train.downstream.registry import Benchmark, register
from pkd.train.downstream.results import coverage
from pkd.train.downstream.sampling import numpy_rng, ordered_batches, shuffled_batches

PREDICTIONS, AP_PLOT = "predictions.json", "class_ap.png"
PROTOCOL = (
    "paper 2212.08974 appendix A.2; facebookresearch/3detr main.py, scripts/scannet_ep1080.sh, datasets/scannet.py, "
    "criterion.py, utils/ap_calculator.py"
)


@dataclass(frozen=True, kw_only=True)
class ScanNetDetConfig(ShapeData, FinetuneConfig):
    """3DETR's ScanNet recipe (``main.py``, ``scripts/scannet_ep1080.sh``) with the paper's 720 epochs and 5e-4.
    ``num_group`` is the pre-encoder's 2048 FPS centres and ``group_size`` its ball query's 64 samples."""

    epochs: int = redefault(FinetuneConfig, "epochs", 720)
    warmup_epochs: int = redefault(FinetuneConfig, "warmup_epochs", 9)
    batch_size: int = redefault(FinetuneConfig, "batch_size", 8)
    weight_decay: float = redefault(FinetuneConfig, "weight_decay", 0.1)
    grad_clip: float = redefault(FinetuneConfig, "grad_clip", 0.1)
    num_points: int = redefault(FinetuneConfig, "num_points", 40000)
    num_group: int = redefault(FinetuneConfig, "num_group", 2048)
    group_size: int = redefault(FinetuneConfig, "group_size", 64)
    cache_dir: str | None = option(None, "cache of the parsed scans (default runs/cache)", run=True)
    num_queries: int = option(256, "box queries (FPS of the encoder points)")
    dec_layers: int = option(8, "transformer decoder layers")
    dec_dim: int = option(256, "decoder width")
    preencoder: str = option("pointmae", "pointmae (the pre-trained mini-PointNet) | 3detr (3DETR's own MLP)")
    random_cuboid: bool = option(True, "3DETR's RandomCuboid crop augmentation")
    eval_every: int = option(10, "score the val split every N epochs (and after the last)")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(1, num_queries=self.num_queries, dec_layers=self.dec_layers, eval_every=self.eval_every)
        at_least(self.num_queries, num_group=self.num_group)


@dataclass(frozen=True)
class SceneSet:
    """The scenes of one split that are present, and the listed ones that are not (``--allow-missing``)."""

    names: list[str]
    scenes: list[DetectionScene]
    missing: tuple[str, ...]


def load_split(cfg: ScanNetDetConfig, split: str, progress: bool = True) -> SceneSet:
    """The scenes of ``split`` through the detection cache (rank 0 builds it, the others wait)."""
    names = split_scenes(split, Path(cfg.splits) if cfg.splits else None)
    cache_dir = Path(cfg.cache_dir or "runs/cache")
    if distributed.is_main():
        build_det_cache(Path(cfg.data), cache_dir, names, allow_missing=cfg.allow_missing, progress=progress)
    distributed.barrier()
    root = open_det_cache(det_cache_path(Path(cfg.data), cache_dir), "r")
    present = [name for name in names if name in root]
    if not present:
        raise DataError(
            f"none of the {len(names)} {split} scenes is under {cfg.data}; point --data at the ScanNet tree holding "
            "scans/<scene>/ with <scene>_vh_clean_2.ply, its .segs.json, .aggregation.json and <scene>.txt."
        )
    missing = tuple(name for name in names if name not in root)
    return SceneSet(present, [load_det_scene(root, name) for name in present], missing)


class ScanNetDetTask:
    """ScanNet train/val scenes, a 3DETR ``Detector`` and its set criterion; ``train=False`` loads val only."""

    benchmark = "scannet-det"
    protocol = PROTOCOL
    headline = ("map25", "map50")

    def __init__(self, cfg: ScanNetDetConfig, train: bool = True) -> None:
        self.cfg = cfg
        self.train_set = load_split(cfg, "train") if train else None
        self.val_set = load_split(cfg, "val")
        self.sampling = SampleConfig(num_points=cfg.num_points, use_random_cuboid=cfg.random_cuboid)
        self.model: nn.Module = Detector(
            cfg,
            num_classes=len(DET_CLASSES),
            num_queries=cfg.num_queries,
            preenc_points=cfg.num_group,
            preenc_samples=cfg.group_size,
            preencoder=cfg.preencoder,
            dec_layers=cfg.dec_layers,
            dec_dim=cfg.dec_dim,
        ).to(cfg.device)
        self.criterion = SetCriterion(len(DET_CLASSES)).to(cfg.device)

    def data_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "val_scenes": len(self.val_set.names),
            "missing_val": list(self.val_set.missing),
            "val_boxes": int(sum(len(s.boxes) for s in self.val_set.scenes)),
            "coverage": coverage(len(self.val_set.names), len(self.val_set.missing), "val"),
        }
        if self.train_set is not None:
            summary.update(
                train_shapes=len(self.train_set.names),
                train_scenes=len(self.train_set.names),
                missing_train=list(self.train_set.missing),
            )
        return summary

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        assert self.train_set is not None, "built with train=False (for testing): it cannot train"
        return shuffled_batches(len(self.train_set.names), self.cfg.batch_size, self.cfg.seed, epoch)

    def _inputs(
        self, scenes: SceneSet, batch: np.ndarray, rngs: list[np.random.Generator], augment: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        samples = [
            scene_sample(s.xyz, s.rgb, s.boxes, s.box_classes, rng, augment, self.sampling)
            for s, rng in zip((scenes.scenes[i] for i in batch), rngs)
        ]
        return collate(samples, self.cfg.device, names=[scenes.names[i] for i in batch])

    def loss(self, model: nn.Module, batch: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        assert self.train_set is not None, "built with train=False (for testing): it cannot train"
        rng = numpy_rng(generator)
        inputs, targets = self._inputs(self.train_set, batch, [rng] * len(batch), augment=True)
        outputs = model(inputs["point_clouds"], inputs["point_cloud_dims_min"], inputs["point_cloud_dims_max"])
        return self.criterion(outputs, targets)[0]

    @torch.no_grad()
    def predict(self, progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Post-processed detections of every val scene, from one fixed sample per scene."""
        self.model.eval()
        out = {}
        batches = ordered_batches(len(self.val_set.names), self.cfg.batch_size)
        for batch in progress_bar(batches, desc="val scenes", disable=not progress, unit="batch"):
            rngs = [np.random.default_rng([self.cfg.seed, int(i)]) for i in batch]
            inputs, _ = self._inputs(self.val_set, batch, rngs, augment=False)
            points = inputs["point_clouds"]
            last = self.model(points, inputs["point_cloud_dims_min"], inputs["point_cloud_dims_max"])["outputs"]
            for j, i in enumerate(batch):
                out[self.val_set.names[i]] = postprocess(
                    last["boxes"][j].float().cpu().numpy(),
                    last["sem_cls_prob"][j].float().cpu().numpy(),
                    last["objectness_prob"][j].float().cpu().numpy(),
                    points[j, :, :3].cpu().numpy(),
                )
        return out

    def ground_truth(self) -> dict[str, dict[str, np.ndarray]]:
        """The val scenes' boxes and classes in the axis-aligned frame."""
        return {n: {"boxes": s.boxes, "labels": s.box_classes} for n, s in zip(self.val_set.names, self.val_set.scenes)}

    def evaluate(self, epoch: int) -> dict[str, float]:
        """mAP@0.25 (the score, as 3DETR keeps its best checkpoint) and mAP@0.5 every ``eval_every`` epochs and
        after the last; other epochs return the score of no detection (-1), so they never become the best."""
        last = epoch + 1 >= self.cfg.epochs
        if (epoch + 1) % self.cfg.eval_every and not last and self.cfg.max_steps is None:
            return {"score": -1.0}
        ap = average_precision(self.predict(), self.ground_truth(), DET_CLASSES)
        return {"score": ap["map25"], "map25": ap["map25"], "map50": ap["map50"]}

    def report(self, run_dir: Path) -> dict[str, Any]:
        """mAP and per-class AP (percent; classes without val ground truth None) of the current weights, their
        ``predictions.json`` and a per-class AP chart."""
        import json

        predictions = self.predict(progress=True)
        ap = average_precision(predictions, self.ground_truth(), DET_CLASSES)
        (run_dir / PREDICTIONS).write_text(json.dumps(predictions_json(predictions, DET_CLASSES)) + "\n")
        plot_class_iou(
            ap["per_class"]["map25"],
            run_dir / AP_PLOT,
            f"ScanNet val AP@0.25 per class: mAP@0.25 {ap['map25']:.2f} %, mAP@0.5 {ap['map50']:.2f} %",
        )
        return {**ap, "classes": list(DET_CLASSES), "predictions": PREDICTIONS}


register(
    Benchmark(
        name="scannet-det",
        config=ScanNetDetConfig,
        build=ScanNetDetTask,
        build_test=lambda cfg: ScanNetDetTask(cfg, train=False),
        summary="ScanNet v2 3D object detection (18 classes) with 3DETR on the encoder: mAP@0.25 and mAP@0.5 on the "
        "val scenes.\n\nThe raw annotation files of every scan are parsed once into a Zarr cache (--cache-dir); the "
        'README\'s "ScanNet object detection" has the protocol and its sources.',
        data_help="ScanNet tree holding scans/<scene>/ with _vh_clean_2.ply, .segs.json, .aggregation.json, .txt",
        test_options=("data", "splits", "cache_dir", "allow_missing"),
        test_summary="Score RUN's best weights on the ScanNet val scenes: results.json (mAP, per-class AP), "
        "predictions.json, per-class AP chart.",
        items="scenes",
        per_class="per_class",
    )
)
