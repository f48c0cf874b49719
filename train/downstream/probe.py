"""Linear probe on ModelNet40: frozen encoder features, a linear SVM fitted on train, accuracy on test.

Features: the max and the mean of the encoder's final (normalised) patch tokens (2·C), of a plain
1024-point FPS of each shape, without augmentation. The SVM is scikit-learn's ``LinearSVC`` on
standardised features. Minutes on a GPU: one forward pass per shape. Like every command that writes a run
folder, it refuses an existing one unless ``overwrite`` is given (checked before any work).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkd.common.config import option
from pkd.common.errors import ConfigError
from pkd.train.downstream import metrics
from pkd.train.downstream.classification import CONFUSION, load_modelnet_split
from pkd.train.downstream.config import ModelNetData
from pkd.train.downstream.engine import RESULTS
from pkd.train.downstream.modelnet import ShapeSet
from pkd.train.downstream.models import init_encoder
from pkd.train.downstream.plots import plot_confusion
from pkd.train.downstream.results import coverage, coverage_note, make_records, percent, write_results
from pkd.train.downstream.sampling import fps, ordered_batches, stage_bar
from pkd.train.encoder import EncoderConfig, PointEncoder, tokenizer
from pkd.train.runs import code_version, prepare_run_dir, resolve_device, write_config
from pkd.train.tokenizer import Group


@dataclass(frozen=True)
class ProbeConfig(ModelNetData, EncoderConfig):
    """A linear-probe run on ModelNet40 (the encoder's sizes are ``EncoderConfig``'s fields; its drop_path
    does not matter, the encoder only runs in eval mode)."""

    data: str
    init: str = "scratch"
    svm_c: float = option(0.01, "LinearSVC regularisation C")
    batch_size: int = option(64, "shapes per forward pass")
    seed: int = option(0, "SVM seed")
    device: str = option("cpu", "cpu, cuda or auto")
    num_points: int = option(1024, "points per shape fed to the encoder")


@torch.no_grad()
def encoder_features(
    encoder: PointEncoder,
    group: Group,
    shapes: ShapeSet,
    num_points: int,
    batch_size: int,
    device: str,
    desc: str = "probe features",
) -> np.ndarray:
    """(N, 2·C) max- and mean-pooled final tokens of every shape."""
    encoder.eval()
    out = []
    batches = ordered_batches(len(shapes.labels), batch_size)
    for batch in stage_bar(batches, desc, len(batches)):
        points = torch.from_numpy(shapes.points[batch]).to(device)
        patches, centres, _ = group(fps(points, num_points))
        tokens, _ = encoder(patches, centres)
        out.append(torch.cat([tokens.max(dim=1).values, tokens.mean(dim=1)], dim=-1).float().cpu().numpy())
    return np.concatenate(out)


def probe_modelnet40(cfg: ProbeConfig, run_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Fit the SVM on train features, score test; writes config.json, results.json and confusion.png in
    ``run_dir``, which must not exist yet unless ``overwrite``."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume=False, overwrite=overwrite, act=False)
    torch.manual_seed(cfg.seed)
    train, test = load_modelnet_split(cfg, "train"), load_modelnet_split(cfg, "test")
    if len(set(train.labels.tolist())) < 2:
        raise ConfigError(f"the training shapes under {cfg.data} cover one class; a linear probe needs at least two.")
    encoder = PointEncoder.from_config(cfg).to(cfg.device)
    init_report = init_encoder(encoder, cfg.init)
    group = tokenizer(cfg)
    feats = [
        encoder_features(encoder, group, s, cfg.num_points, cfg.batch_size, cfg.device, f"probe features ({name})")
        for name, s in (("train", train), ("test", test))
    ]
    svm = make_pipeline(StandardScaler(), LinearSVC(C=cfg.svm_c, max_iter=20000, random_state=cfg.seed))
    svm.fit(feats[0], train.labels)
    pred = svm.predict(feats[1])
    num_classes = len(train.classes)
    matrix = metrics.confusion_matrix(pred, test.labels, num_classes)
    prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
    data: dict[str, Any] = {
        "train_shapes": len(train.labels),
        "test_shapes": len(test.labels),
        "missing_train": train.missing,
        "missing_test": test.missing,
        "coverage": coverage(len(test.labels), test.missing, "test"),
    }
    config = dataclasses.asdict(cfg)
    write_config(run_dir, config, init=init_report, data=data)
    test_metrics = {
        "overall_acc": percent(metrics.overall_accuracy(pred, test.labels)),
        "mean_class_acc": percent(metrics.mean_class_accuracy(pred, test.labels, num_classes)),
        "train_acc": percent(metrics.overall_accuracy(svm.predict(feats[0]), train.labels)),
        "confusion_matrix": matrix.tolist(),
        "classes": train.classes,
    }
    plot_confusion(
        matrix,
        train.classes,
        run_dir / CONFUSION,
        f"ModelNet40 linear probe, OA {test_metrics['overall_acc']:.2f} %, {coverage_note(data['coverage'])}",
    )
    records = make_records(
        "probe/modelnet40",
        {k: test_metrics[k] for k in ("overall_acc", "mean_class_acc")},
        init_report=init_report,
        config=config,
        data=data["coverage"],
        protocol="linear SVM on frozen max+mean tokens (pkd)",
        run_dir=run_dir,
    )
    return write_results(
        run_dir / RESULTS,
        {
            "task": "probe-modelnet40",
            "init": init_report,
            "test": test_metrics,
            "data": data,
            "config": config,
            "code": code_version(),
        },
        records,
    )
