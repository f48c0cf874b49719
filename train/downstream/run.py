"""Python entry points behind ``pkd-train finetune`` and ``pkd-train probe``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pkd.train.downstream.classification import ModelNetTask
from pkd.train.downstream.engine import FinetuneConfig, finetune
from pkd.train.downstream.probe import ProbeConfig, probe_modelnet40
from pkd.train.downstream.segmentation import ShapeNetPartTask

TASKS = {"modelnet40": ModelNetTask, "shapenetpart": ShapeNetPartTask}

__all__ = ["FinetuneConfig", "ProbeConfig", "run_finetune", "probe_modelnet40"]


def run_finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Finetune ``cfg.task`` (modelnet40 or shapenetpart) into ``run_dir``; returns results.json's content."""
    return finetune(TASKS[cfg.task], cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress)
