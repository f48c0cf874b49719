"""Python entry points behind ``pkd-train finetune``, ``probe``, ``test`` and ``compare``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pkd.common.errors import ConfigError
from pkd.train.checkpoint import LAST, load_checkpoint
from pkd.train.downstream.compare import compare
from pkd.train.downstream.config import FinetuneConfig
from pkd.train.downstream.engine import BEST, RESULTS, finetune, task_records
from pkd.train.downstream.fewshot import run_fewshot
from pkd.train.downstream.probe import ProbeConfig, probe_modelnet40
from pkd.train.downstream.registry import Benchmark, benchmark, config_from_record
from pkd.train.downstream.results import write_results
from pkd.train.downstream.votetest import test_modelnet40
from pkd.train.records import read_record
from pkd.train.runs import CONFIG, FINETUNE_RUN, code_version, resolve_device

__all__ = [
    "FinetuneConfig",
    "ProbeConfig",
    "run_finetune",
    "run_fewshot",
    "run_test",
    "probe_modelnet40",
    "test_modelnet40",
    "compare",
]


def run_finetune(
    cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Finetune ``cfg.task`` (a registered benchmark) into ``run_dir``; returns results.json's content."""
    build = benchmark(cfg.task).build
    return finetune(build, cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress)


def run_test(
    bench: Benchmark,
    run_dir: str | Path,
    out: str | Path | None = None,
    overwrite: bool = False,
    **changes: Any,
) -> dict[str, Any]:
    """Score a finetuning run's best weights (its last.pt when it has no best.pt) again: the run's
    config.json with ``changes`` (None values ignored) on top, the task's test report and plots in ``out``
    (default RUN/test); returns the results.json written there, whose records name RUN as their run (so
    ``compare`` counts the run once)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds no config.json; pass a run directory written by `pkd-train finetune`.")
    saved = read_record(run_dir / CONFIG, FINETUNE_RUN)  # upgraded: fields added since read as the run trained
    cfg = config_from_record(saved["config"], **changes)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    weights = run_dir / BEST if (run_dir / BEST).is_file() else run_dir / LAST
    if not weights.is_file():
        raise ConfigError(f"{run_dir} has neither {BEST} nor {LAST}; finish (or --resume) the finetuning first.")
    out = Path(out) if out else run_dir / "test"
    if (out / RESULTS).exists() and not overwrite:
        raise ConfigError(f"{out / RESULTS} exists; pass --overwrite to replace it or --out for another folder.")
    task = bench.test_task(cfg)
    task.model.load_state_dict(load_checkpoint(weights)["model"])
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "task": cfg.task,
        "run": str(run_dir),
        "weights": str(weights),
        "init": saved["init"],
        "test": task.report(out),
        "data": task.data_summary(),
        "config": dataclasses.asdict(cfg),
        "code": code_version(),
    }
    return write_results(out / RESULTS, results, task_records(task, results, run_dir))
