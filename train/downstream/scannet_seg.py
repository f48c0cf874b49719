"""ScanNet v2 semantic segmentation (the paper's Table 2, §4.2.2 and appendix A.2) as a ``Task``.

Data: the official train/val lists; each scene's mesh vertices come from the segmentation cache
(``pkd.common.seg_cache``), built from the PLYs on first use (by rank 0 under torchrun) and kept for later
runs. Labels are the 20 benchmark classes; every other vertex is ignored by the loss and the metric.

Inputs (the paper gives only the 8192 points; the column is pkd's own choice, not PointNet++'s, whose
``scannet/scannet_dataset.py`` crops 1.5 m columns with a 0.2 m margin, weights the classes by 1/ln(1.2 + f)
and redraws a column until ≥ 70 % of its points are labelled; pkd does none of that): a vertical column of
``crop_size`` × ``crop_size`` metres (all heights), 3 m by default. Training centres the
column on a random vertex of the scene (``repeats`` columns per scene and epoch, default 1), so a scene
smaller than the column is taken whole and a larger one is cropped; ``num_points`` (8192) of its vertices
are drawn at random (with replacement only when it has fewer). Coordinates are relative to the column
centre and the scene's lowest vertex, divided by half the column size; colours are scaled to [0, 1].
Augmentations (seeded): rotation about z by U(0, 2π), isotropic scale U(0.8, 1.2), per-point jitter
N(0, 0.01) clipped at ±0.05.

Evaluation labels every vertex of every val scene: the scene is tiled into non-overlapping columns of the
same size, each column's vertices are shuffled (fixed seed) and cut into passes of ``num_points`` (the
last pass padded with random repeats), so every vertex is predicted at least once; a vertex's logits are
averaged over its predictions; every epoch is scored the same way (same passes). Metrics, in percent:
per-class IoU, mIoU over the 20 classes (the headline record ``miou`` of ``results.json``, schema:
``results``), overall accuracy.

Model (``SceneSegmenter``): the 12-layer encoder on 256 patches of 32 points; the normed outputs of three
blocks (``fetch_layers``, as Point-MAE's segmentation head) are concatenated per patch (3·C). ``head``
``concat`` (the default, appendix A.2: "select three nearest neighbour center points for each point and
concatenate their features"): each point takes the features of its 3 nearest patch centres side by side,
nearest first (9·C); ``interp`` (runs recorded before v3): their inverse-squared-distance average (PointNet++'s
feature propagation, as Point-MAE; 3·C). Either is concatenated with the point's xyz and colour (the paper
is silent on skip features; PointNet++'s propagation keeps them), then two 1-D conv blocks (512, 256;
BatchNorm, ReLU; DGCNN's widths) and dropout 0.5 with a 1-D conv to the 20 classes. DGCNN's semantic
segmentation head also tiles a global max-pooled feature to every point; the paper lists the head's parts
without one (and names the two global features where it uses them, for part segmentation), so there is none.

Optimizer (``optimizer``): ``adam`` (appendix A.2's Adam, lr 1e-3, weight decay 0.01 as L2 on every
parameter, as the Adam option of Point-MAE's ``segmentation/main.py``, lines 129–136) or ``adamw`` (pkd's
shared AdamW, no decay on biases, norms and tokens; what runs recorded before finetune records v3 used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pkd.common.config import at_least, choice, option
from pkd.common.errors import ConfigError, DataError
from pkd.common.logs import progress_bar
from pkd.common.scannet_mesh import IGNORE, NUM_CLASSES, SceneMesh, class_names, split_scenes
from pkd.common.seg_cache import build_cache, done_scenes, load_scene, open_cache
from pkd.train import distributed
from pkd.train.downstream import metrics
from pkd.train.downstream.config import FinetuneConfig, ShapeData, redefault
from pkd.train.downstream.models import GATHER, FeaturePropagation, fetch_layers, run_blocks
from pkd.train.downstream.plots import plot_class_iou, plot_top_view
from pkd.train.downstream.registry import Benchmark, register
from pkd.train.downstream.results import coverage, coverage_note, percent
from pkd.train.downstream.sampling import numpy_rng, shuffled_batches
from pkd.train.encoder import EncoderConfig, PointEncoder, tokenizer

CACHE_NAME = "scannet_seg.zarr"
SCALE, JITTER_STD, JITTER_CLIP = (0.8, 1.2), 0.01, 0.05
IOU_PLOT, SCENE_PLOT = "class_iou.png", "scene_top_view.png"


@dataclass(frozen=True, kw_only=True)
class ScanNetSegConfig(ShapeData, FinetuneConfig):
    """The paper's appendix A.2 (3-NN concatenation head, Adam, lr 1e-3, weight decay 1e-2, 200 epochs, cosine;
    no warm-up stated); no voting."""

    epochs: int = redefault(FinetuneConfig, "epochs", 200)
    warmup_epochs: int = redefault(FinetuneConfig, "warmup_epochs", 0)
    batch_size: int = redefault(FinetuneConfig, "batch_size", 16)
    lr: float = redefault(FinetuneConfig, "lr", 1e-3)
    weight_decay: float = redefault(FinetuneConfig, "weight_decay", 1e-2)
    num_points: int = redefault(FinetuneConfig, "num_points", 8192)
    num_group: int = redefault(FinetuneConfig, "num_group", 256)
    cache_dir: str | None = option(None, "cache of the parsed meshes (default runs/cache)", run=True)
    crop_size: float = option(3.0, "side in metres of the vertical column each input is drawn from")
    repeats: int = option(1, "random columns drawn from every train scene per epoch")
    head: str = option(
        "concat", "concat: 3 nearest centres' features side by side (the paper); interp: their 1/d² average"
    )
    optimizer: str = option("adam", "adam: L2 weight decay on every weight (the paper); adamw: pkd's AdamW")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(1, repeats=self.repeats)
        choice(tuple(GATHER), head=self.head)
        choice(("adam", "adamw"), optimizer=self.optimizer)
        if self.crop_size <= 0:
            raise ConfigError(f"crop_size must be positive (metres), got {self.crop_size}.")

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam with L2 weight decay on every parameter (appendix A.2), or the shared AdamW (``adamw``)."""
        if self.optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return super().build_optimizer(model)


@dataclass(frozen=True)
class SceneSet:
    """The scenes of one split that are present, and the listed ones that are not (``--allow-missing``)."""

    names: list[str]
    scenes: list[SceneMesh]
    missing: list[str]


def cache_path(cfg: ScanNetSegConfig) -> Path:
    """Where the segmentation cache lives: ``<cache_dir>/scannet_seg.zarr`` (default runs/cache)."""
    return Path(cfg.cache_dir or "runs/cache") / CACHE_NAME


def load_split(cfg: ScanNetSegConfig, split: str, progress: bool = True) -> SceneSet:
    """The scenes of ``split`` (train or val), cached first where needed (rank 0 writes, the others wait)."""
    names = split_scenes(split, Path(cfg.splits) if cfg.splits else None)
    path = cache_path(cfg)
    if distributed.is_main():
        build_cache(cfg.data, path, names, allow_missing=cfg.allow_missing, progress=progress)
    distributed.barrier()
    root = open_cache(path)
    done = done_scenes(root)
    present = [name for name in names if name in done]
    if not present:
        raise DataError(
            f"none of the {len(names)} {split} scenes is under {cfg.data}; point --data at the ScanNet "
            "tree holding scans/<scene>/<scene>_vh_clean_2[.labels].ply."
        )
    return SceneSet(present, [load_scene(root, name) for name in present], [n for n in names if n not in done])


def column(xyz: np.ndarray, centre: np.ndarray, size: float) -> np.ndarray:
    """Indices of the vertices inside the vertical column of side ``size`` centred at ``centre`` (x, y)."""
    return np.flatnonzero((np.abs(xyz[:, :2] - centre) <= size / 2).all(axis=1))


def model_input(scene: SceneMesh, idx: np.ndarray, centre: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """(points, colours) of vertices ``idx``: xyz relative to (centre, lowest z) over size/2, rgb in [0, 1]."""
    origin = np.array([centre[0], centre[1], scene.xyz[:, 2].min()], dtype=np.float32)
    return (scene.xyz[idx] - origin) / np.float32(size / 2), scene.rgb[idx].astype(np.float32) / 255.0


def coverage_passes(
    xyz: np.ndarray, size: float, num_points: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(vertex indices, column centre) of passes of ``num_points`` that together cover every vertex once (the
    last pass of each column padded with random repeats of its vertices)."""
    low = xyz[:, :2].min(axis=0)
    cells = np.floor((xyz[:, :2] - low) / size).astype(np.int64)
    keys, inverse = np.unique(cells, axis=0, return_inverse=True)
    passes = []
    for cell, members in zip(
        keys, np.split(np.argsort(inverse.ravel(), kind="stable"), np.cumsum(np.bincount(inverse.ravel()))[:-1])
    ):
        members = rng.permutation(members)
        centre = low + (cell + 0.5) * size
        for start in range(0, len(members), num_points):
            chunk = members[start : start + num_points]
            pad = rng.choice(members, num_points - len(chunk)) if len(chunk) < num_points else chunk[:0]
            passes.append((np.concatenate([chunk, pad]), centre))
    return passes


def augment(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotation about z, isotropic scale and clipped per-point jitter of a batch (B, N, 3)."""
    batch = points.shape[0]
    angle = torch.rand(batch, generator=generator) * 2 * math.pi
    cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros(batch), torch.ones(batch)
    rotation = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], dim=1).reshape(batch, 3, 3)
    scale = torch.empty(batch, 1, 1).uniform_(*SCALE, generator=generator)
    jitter = (torch.randn(points.shape, generator=generator) * JITTER_STD).clamp(-JITTER_CLIP, JITTER_CLIP)
    return (points @ rotation.transpose(1, 2).to(points)) * scale.to(points) + jitter.to(points)


class SceneSegmenter(nn.Module):
    """Tokenizer → ``MAE_encoder`` (three blocks) → 3-NN features (``head``: concat or interp) + xyz/rgb → two
    conv blocks → classes."""

    def __init__(self, num_classes: int, encoder: EncoderConfig, head: str = "concat") -> None:
        super().__init__()
        self.layers = fetch_layers(encoder.depth)
        self.group_divider = tokenizer(encoder)
        self.MAE_encoder = PointEncoder.from_config(encoder)
        width = GATHER[head][1] * 3 * encoder.dim
        self.propagation = FeaturePropagation(width + 6, [512, 256], gather=head)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv1d(256, num_classes, 1))

    def forward(self, points: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3), colors (B, N, 3) → class logits (B, N, num_classes)."""
        patches, centres, _ = self.group_divider(points)
        blocks = run_blocks(self.MAE_encoder, patches, centres)
        tokens = torch.cat([self.MAE_encoder.norm(blocks[i]) for i in self.layers], dim=-1)  # (B, G, 3C)
        skip = torch.cat([points, colors], dim=-1).transpose(1, 2)
        return self.classifier(self.propagation(points, centres, skip, tokens)).transpose(1, 2)


@dataclass(frozen=True)
class Scores:
    """Full-coverage evaluation of the val scenes: confusion matrix, per-vertex predictions, vertex coverage."""

    matrix: np.ndarray
    predictions: list[np.ndarray]
    vertex_coverage: dict[str, Any]


class ScanNetSegTask:
    """ScanNet train/val scenes and a ``SceneSegmenter``; ``train=False`` loads the val scenes only (testing)."""

    benchmark = "scannet-seg"
    protocol = "paper 2212.08974 §4.2.2 and appendix A.2; pkd's 3 m columns where it is silent"
    headline = ("miou", "overall_acc")

    def __init__(self, cfg: ScanNetSegConfig, train: bool = True) -> None:
        self.cfg = cfg
        self.train_set = load_split(cfg, "train") if train else None
        self.val_set = load_split(cfg, "val")
        self.model: nn.Module = SceneSegmenter(NUM_CLASSES, cfg, cfg.head).to(cfg.device)

    def data_summary(self) -> dict[str, Any]:
        summary = {
            "val_scenes": len(self.val_set.names),
            "missing_val": self.val_set.missing,
            "cache": str(cache_path(self.cfg)),
            "crop_size_m": self.cfg.crop_size,
            "coverage": coverage(len(self.val_set.names), len(self.val_set.missing), "val"),
        }
        if self.train_set is not None:
            summary.update(
                train_shapes=len(self.train_set.names),
                train_scenes=len(self.train_set.names),
                missing_train=self.train_set.missing,
            )
        return summary

    @property
    def _train(self) -> SceneSet:
        """The train scenes; training a task built with ``train=False`` is a programming error."""
        if self.train_set is None:
            raise RuntimeError("this ScanNetSegTask was built with train=False (for testing): it cannot train")
        return self.train_set

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """``repeats`` random columns of every train scene per epoch (scene indices), in shuffled batches."""
        count = len(self._train.names)
        return [
            batch % count
            for batch in shuffled_batches(count * self.cfg.repeats, self.cfg.batch_size, self.cfg.seed, epoch)
        ]

    def _tensors(self, inputs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.cfg.device
        return tuple(torch.from_numpy(np.stack([x[k] for x in inputs])).to(device) for k in (0, 1))  # type: ignore

    def loss(self, model: nn.Module, batch: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        rng, size = numpy_rng(generator), self.cfg.crop_size
        inputs, labels = [], []
        for i in batch:
            scene = self._train.scenes[i]
            centre = scene.xyz[rng.integers(len(scene.xyz)), :2]
            members = column(scene.xyz, centre, size)
            idx = rng.choice(members, self.cfg.num_points, replace=len(members) < self.cfg.num_points)
            inputs.append(model_input(scene, idx, centre, size))
            labels.append(scene.label[idx].astype(np.int64))
        points, colors = self._tensors(inputs)
        logits = model(augment(points, generator), colors)
        target = torch.from_numpy(np.stack(labels)).to(logits.device)
        loss = F.cross_entropy(
            logits.reshape(-1, NUM_CLASSES), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return loss / (target != IGNORE).sum().clamp_min(1)  # a crop of ignored vertices only adds nothing

    @torch.no_grad()
    def predict_scene(self, scene: SceneMesh, seed: int) -> tuple[np.ndarray, int, int]:
        """Per-vertex class of ``scene`` from logits averaged over full-coverage passes; the pass count and how
        many vertices were predicted (all of them, by construction of ``coverage_passes``)."""
        self.model.eval()
        passes = coverage_passes(scene.xyz, self.cfg.crop_size, self.cfg.num_points, np.random.default_rng(seed))
        sums = np.zeros((len(scene.xyz), NUM_CLASSES))
        counts = np.zeros(len(scene.xyz))
        for start in range(0, len(passes), self.cfg.batch_size):
            chunk = passes[start : start + self.cfg.batch_size]
            points, colors = self._tensors(
                [model_input(scene, idx, centre, self.cfg.crop_size) for idx, centre in chunk]
            )
            logits = self.model(points, colors).float().cpu().numpy()
            for (idx, _), values in zip(chunk, logits):
                np.add.at(sums, idx, values)
                np.add.at(counts, idx, 1)
        return (sums / np.maximum(counts, 1)[:, None]).argmax(axis=1), len(passes), int((counts > 0).sum())

    def _score(self, progress: bool = False) -> Scores:
        matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        predictions, passes, vertices, predicted, scored = [], 0, 0, 0, 0
        scenes = zip(self.val_set.names, self.val_set.scenes)
        for i, (_name, scene) in enumerate(
            progress_bar(scenes, total=len(self.val_set.names), desc="val scenes", disable=not progress, unit="scene")
        ):
            pred, count, covered = self.predict_scene(scene, self.cfg.seed * 100_003 + i)
            matrix += metrics.scene_confusion(pred, scene.label, NUM_CLASSES, IGNORE)
            predictions.append(pred)
            passes += count
            vertices += len(pred)
            predicted += covered
            scored += int((scene.label != IGNORE).sum())
        vertex_coverage = {
            "scenes": len(self.val_set.names),
            "missing_scenes": len(self.val_set.missing),
            "vertices": vertices,
            "predicted_vertices": predicted,
            "fraction": predicted / max(vertices, 1),
            "scored_vertices": scored,
            "passes": passes,
        }
        return Scores(matrix, predictions, vertex_coverage)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """mIoU (the score) and overall accuracy in percent; ``epoch`` changes nothing (fixed passes)."""
        scores = self._score()
        miou = percent(metrics.mean_iou(metrics.class_ious(scores.matrix)))
        return {"score": miou, "miou": miou, "overall_acc": percent(_overall(scores.matrix))}

    def report(self, run_dir: Path) -> dict[str, Any]:
        """Full-coverage val metrics in percent (mIoU, overall accuracy, per-class IoU), the vertex coverage, the
        per-class IoU chart and one scene's top view."""
        scores = self._score(progress=True)
        ious = metrics.class_ious(scores.matrix)
        miou, overall = percent(metrics.mean_iou(ious)), percent(_overall(scores.matrix))
        per_class = {name: None if np.isnan(v) else percent(v) for name, v in zip(class_names(), ious)}
        scene, name = self.val_set.scenes[0], self.val_set.names[0]
        plot_class_iou(
            per_class,
            run_dir / IOU_PLOT,
            f"ScanNet val per-class IoU: mIoU {miou:.2f} %, OA {overall:.2f} % "
            f"({coverage_note(self.data_summary()['coverage'], 'scenes')}, every vertex)",
        )
        plot_top_view(
            scene.xyz,
            scores.predictions[0],
            scene.label,
            list(class_names()),
            IGNORE,
            run_dir / SCENE_PLOT,
            f"{name}: top view by prediction (left) and ground truth (right)",
        )
        return {
            "miou": miou,
            "overall_acc": overall,
            "class_iou": per_class,
            "vertex_coverage": scores.vertex_coverage,
            "plots": {"class_iou": IOU_PLOT, "scene": SCENE_PLOT, "scene_name": name},
        }


def _overall(matrix: np.ndarray) -> float:
    return float(np.trace(matrix) / max(int(matrix.sum()), 1))


register(
    Benchmark(
        name="scannet-seg",
        config=ScanNetSegConfig,
        build=ScanNetSegTask,
        build_test=lambda cfg: ScanNetSegTask(cfg, train=False),
        summary="ScanNet v2 semantic segmentation (20 classes): mIoU over every vertex of the val scenes.\n\n"
        "The official per-scene meshes are read once into a Zarr cache (--cache-dir). Training draws random "
        '8192-point columns of the scenes; the README\'s "ScanNet semantic segmentation" has it all.',
        data_help="ScanNet tree holding scans/<scene>/<scene>_vh_clean_2.ply and _vh_clean_2.labels.ply",
        test_options=("data", "splits", "cache_dir", "allow_missing"),
        test_summary="Score RUN's best weights on every vertex of the ScanNet val scenes: results.json, IoU chart, "
        "top view.",
        items="scenes",
    )
)
