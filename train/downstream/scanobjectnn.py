"""ScanObjectNN's official h5 files, the three variants Point-MAE-family papers report, as a classification task.

Files (``h5_files/`` of the release): ``main_split/`` (objects with background) and ``main_split_nobg/``
(objects only), each with ``training_objectdataset[_augmentedrot_scale75].h5`` and ``test_…``; datasets
``data`` (N, 2048, 3) float and ``label`` (N,) int, 15 classes. Read as Point-MAE reads them (Point-BERT's
``datasets/ScanObjectNNDataset.py``, used by Point-MAE's ``cfgs/dataset_configs/ScanObjectNN_*.yaml``): points
as stored, no normalisation, training clouds shuffled per sample. Protocol: Point-MAE's
``cfgs/finetune_scan_objbg.yaml`` / ``finetune_scan_objonly.yaml`` / ``finetune_scan_hardest.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pkd.common.config import option
from pkd.common.errors import DataError
from pkd.train.downstream.classification import ClassificationTask
from pkd.train.downstream.config import ClassificationConfig, redefault
from pkd.train.downstream.files import require_dir, require_file
from pkd.train.downstream.modelnet import ShapeSet
from pkd.train.downstream.registry import Benchmark, register

# Point-BERT data/ScanObjectNN_shape_names.txt (label order of the h5 files)
CLASSES = [
    "bag",
    "bin",
    "box",
    "cabinet",
    "chair",
    "desk",
    "display",
    "door",
    "shelf",
    "table",
    "bed",
    "pillow",
    "sink",
    "sofa",
    "toilet",
]
# variant → (sub-folder, file suffix, Point-MAE config)
VARIANTS = {
    "obj_bg": ("main_split", "", "cfgs/finetune_scan_objbg.yaml"),
    "obj_only": ("main_split_nobg", "", "cfgs/finetune_scan_objonly.yaml"),
    "pb_t50_rs": ("main_split", "_augmentedrot_scale75", "cfgs/finetune_scan_hardest.yaml"),
}
FILE_STEM = {"train": "training_objectdataset", "test": "test_objectdataset"}


def variant_dir(data: Path, variant: str) -> Path:
    """The folder holding ``variant``'s files: DATA/<main_split[_nobg]> or DATA itself when it is that folder."""
    if variant not in VARIANTS:
        raise DataError(f"unknown ScanObjectNN variant {variant!r}; use one of {', '.join(VARIANTS)}.")
    data = require_dir(
        data,
        "ScanObjectNN's h5_files folder (with main_split/ and main_split_nobg/)",
        "Pass --data pointing at the extracted h5_files folder.",
    )
    sub = VARIANTS[variant][0]
    return data / sub if (data / sub).is_dir() else data


def load_scanobjectnn(data: str | Path, variant: str, split: str) -> ShapeSet:
    """One split (train or test) of a ScanObjectNN variant from its official h5 file."""
    import h5py

    folder, suffix, _ = VARIANTS.get(variant, ("", "", ""))
    path = require_file(
        variant_dir(Path(data), variant) / f"{FILE_STEM[split]}{suffix}.h5",
        f"the ScanObjectNN {variant} {split} file ({folder}/{FILE_STEM[split]}{suffix}.h5)",
        "Pass --data pointing at h5_files (or at its main_split / main_split_nobg folder).",
    )
    try:
        with h5py.File(path, "r") as h5:
            points = np.asarray(h5["data"], dtype=np.float32)
            labels = np.asarray(h5["label"]).astype(np.int64).reshape(-1)
    except (OSError, KeyError) as exc:
        raise DataError(
            f"cannot read {path} as a ScanObjectNN h5 file with datasets 'data' and 'label' ({exc}); "
            "re-download the file."
        ) from exc
    if points.ndim != 3 or points.shape[2] < 3 or len(points) != len(labels) or len(labels) == 0:
        raise DataError(
            f"{path} holds data {points.shape} and label {labels.shape}; expected (N, P, 3) and (N,). "
            "Re-download the file."
        )
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{path} has labels outside 0–{len(CLASSES) - 1}; it is not a ScanObjectNN file.")
    return ShapeSet(
        np.ascontiguousarray(points[:, :, :3]), labels, [f"{path.name}:{i}" for i in range(len(labels))], CLASSES
    )


@dataclass(frozen=True, kw_only=True)
class ScanObjectNNConfig(ClassificationConfig):
    """Point-MAE's ``cfgs/finetune_scan_{objbg,objonly,hardest}.yaml``: 2048 points, 128 groups, 300 epochs; no
    voting (``runner_finetune.validate_vote`` has no 2048-point branch). pb_t50_rs, the hardest variant, is the
    one papers headline."""

    num_points: int = redefault(ClassificationConfig, "num_points", 2048)
    num_group: int = redefault(ClassificationConfig, "num_group", 128)
    variant: str = option("pb_t50_rs", "obj_bg | obj_only | pb_t50_rs (the hardest)")


def scanobjectnn_task(cfg: ScanObjectNNConfig) -> ClassificationTask:
    """ScanObjectNN ``cfg.variant`` with Point-MAE's protocol (2048 points, 128 groups, no voting)."""
    if cfg.variant not in VARIANTS:
        raise DataError(f"ScanObjectNN needs --variant, one of {', '.join(VARIANTS)}; got {cfg.variant!r}.")
    train, test = (load_scanobjectnn(cfg.data, cfg.variant, split) for split in ("train", "test"))
    return ClassificationTask(
        cfg,
        train,
        test,
        CLASSES,
        f"scanobjectnn/{cfg.variant}",
        f"Point-MAE {VARIANTS[cfg.variant][2]}, tools/runner_finetune.py",
    )


register(
    Benchmark(
        name="scanobjectnn",
        config=ScanObjectNNConfig,
        build=scanobjectnn_task,
        summary="ScanObjectNN classification (15 classes, 2048 points, 128 groups), Point-MAE's finetune_scan_*.yaml.",
        data_help="ScanObjectNN h5_files folder (with main_split/, main_split_nobg/)",
        run_name=lambda cfg: f"scanobjectnn-{cfg.variant}",
    )
)
