"""Python entry points behind ``pkd-train finetune``, ``probe``, ``test`` and ``compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pkd.train.downstream.classification import modelnet_task
from pkd.train.downstream.compare import compare
from pkd.train.downstream.engine import FinetuneConfig, finetune
from pkd.train.downstream.fewshot import run_fewshot
from pkd.train.downstream.probe import ProbeConfig, probe_modelnet40
from pkd.train.downstream.scanobjectnn import scanobjectnn_task
from pkd.train.downstream.segmentation import ShapeNetPartTask
from pkd.train.downstream.votetest import test_modelnet40

TASKS = {"modelnet40": modelnet_task, "shapenetpart": ShapeNetPartTask, "scanobjectnn": scanobjectnn_task}

__all__ = ["FinetuneConfig", "ProbeConfig", "run_finetune", "run_fewshot", "probe_modelnet40", "test_modelnet40",
           "compare"]


def run_finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Finetune ``cfg.task`` (modelnet40, shapenetpart or scanobjectnn) into ``run_dir``; returns results.json."""
    return finetune(TASKS[cfg.task], cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress)
