"""The one ``results.json`` schema every downstream benchmark writes and ``pkd-train compare`` reads.

A results file (``results.json`` of a fine-tune, probe or few-shot run; ``test_votes.json`` of
``pkd-train test modelnet40``; ``RUN/test/results.json`` of ``test scannet-seg``) is a JSON object with
``"schema": "pkd-results/1"`` and ``"records"``, a list of records; the rest of the file (history, config,
per-class numbers) is free-form per benchmark. A record:

- ``benchmark``: ``modelnet40``, ``shapenetpart``, ``scanobjectnn/obj_bg|obj_only|pb_t50_rs``,
  ``fewshot/<way>way<shot>shot``, ``probe/modelnet40``, ``scannet-seg``;
- ``metric``: what ``value`` is, e.g. ``overall_acc`` (best epoch, plain FPS), ``vote_overall_acc`` (best
  weights, one K-vote pass), ``best_vote_overall_acc`` (best per-epoch vote, Point-MAE's ``ckpt-best_vote``),
  ``vote_pass_best`` / ``vote_pass_mean`` / ``vote_pass_std`` (``pkd-train test``), ``instance_miou``,
  ``class_miou``, ``miou`` (ScanNet, over the 20 classes), ``fold_mean`` / ``fold_std``;
- ``value``: a number in ``unit`` (always ``"%"``: accuracies and IoUs are percentages everywhere);
- ``init``: ``{"path", "random_teacher", "teacher"}``, the encoder the run started from and the teacher
  identity of the store it was distilled from (``null`` when unknown: scratch or a foreign checkpoint);
- ``seed``: the run's seed;
- ``settings``: a 12-hex digest of the run's configuration without seed, device, paths and step limits:
  runs with equal benchmark, metric, init and settings differ only by seed and are averaged by ``compare``;
- ``data``: ``{"used", "listed", "split"}``, the shapes (ScanNet: scenes) evaluated of those the split
  lists (``used < listed`` only under ``--allow-missing``);
- ``protocol``: the reference source the protocol follows (e.g. ``Point-MAE cfgs/finetune_modelnet.yaml``);
- ``run``: the run folder (of the fine-tuning, also for a re-scoring written elsewhere).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pkd.common import durable

SCHEMA = "pkd-results/1"
RESULT_FILES = ("results.json", "test_votes.json")
UNIT = "%"
NOT_SETTINGS = ("seed", "device", "data", "splits", "cache_dir", "max_steps", "init", "folds", "fold")


def settings_digest(config: dict[str, Any]) -> str:
    """Digest of a run configuration without what may differ between repeats (seed, device, paths, limits)."""
    kept = {k: v for k, v in sorted(config.items()) if k not in NOT_SETTINGS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def coverage(used: int, missing: int, split: str) -> dict[str, Any]:
    """The ``data`` field: shapes used of those listed in ``split``."""
    return {"used": int(used), "listed": int(used + missing), "split": split}


def coverage_note(data: dict[str, Any], what: str = "shapes") -> str:
    """``9/2468 test shapes (--allow-missing)`` when part of the split is missing, else ``2468 test shapes``."""
    if data["used"] < data["listed"]:
        return f"{data['used']}/{data['listed']} {data['split']} {what} (--allow-missing)"
    return f"{data['used']} {data['split']} {what}"


def init_identity(init_report: dict[str, Any]) -> dict[str, Any]:
    """The ``init`` field from ``models.init_encoder``'s report."""
    return {
        "path": init_report.get("init", "scratch"),
        "random_teacher": init_report.get("random_teacher"),
        "teacher": init_report.get("teacher"),
    }


def make_records(
    benchmark: str,
    values: dict[str, float],
    *,
    init_report: dict[str, Any],
    config: dict[str, Any],
    data: dict[str, Any],
    protocol: str,
    run_dir: str | Path,
) -> list[dict[str, Any]]:
    """One record per metric in ``values`` (already in percent)."""
    common = {
        "unit": UNIT,
        "init": init_identity(init_report),
        "seed": config.get("seed"),
        "settings": settings_digest(config),
        "data": data,
        "protocol": protocol,
        "run": str(run_dir),
    }
    return [
        {"benchmark": benchmark, "metric": metric, "value": float(value), **common} for metric, value in values.items()
    ]


def write_results(path: Path, payload: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``payload`` with the schema tag and ``records`` to ``path`` atomically; returns what was written."""
    out = {"schema": SCHEMA, "records": records, **payload}
    durable.write_atomic(path, json.dumps(out, indent=2) + "\n")
    return out


def percent(value: float) -> float:
    """A fraction as a percentage."""
    return 100.0 * float(value)
