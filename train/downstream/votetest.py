"""``pkd-train test modelnet40 RUN``: Point-MAE's test mode, repeated voting passes over the test split.

Point-MAE's ``tools/runner_finetune.py`` ``test`` runs ``test_vote(times=10)`` for ``time in range(1, 300)``
(299 passes of 10 votes) and prints the best pass. We report the mean, the population std and the best of
the passes (each pass seeded by the run's seed and its index) as records in ``RUN/test_votes.json``
(schema: ``results``), with the plain FPS accuracy of the same weights beside them. The best of many passes is an
optimistic number: it is what Point-MAE-family papers print as "with voting"; the mean is the expected single pass.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

from pkd.common.errors import ConfigError
from pkd.train.checkpoint import load_checkpoint
from pkd.train.downstream import metrics
from pkd.train.downstream.classification import ModelNet40Config, class_metrics, modelnet_task, seeded
from pkd.train.downstream.engine import BEST, BEST_VOTE
from pkd.train.downstream.registry import config_from_record
from pkd.train.downstream.results import make_records, write_results
from pkd.train.downstream.sampling import stage_bar
from pkd.train.runs import resolve_device

VOTE_RESULTS = "test_votes.json"
POINT_MAE_PASSES = 299
WEIGHTS = {"best": BEST, "best_vote": BEST_VOTE, "last": "last.pt"}


def test_modelnet40(
    run_dir: str | Path,
    votes: int = 10,
    passes: int = POINT_MAE_PASSES,
    weights: str = "best",
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score a finished ``finetune modelnet40`` run with ``passes`` voting passes of ``votes`` draws each."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} has no config.json; pass the folder of a `pkd-train finetune modelnet40` run.")
    record = json.loads(config_path.read_text())
    if record["config"]["task"] != "modelnet40":
        raise ConfigError(f"{run_dir} is a {record['config']['task']} run; `test modelnet40` needs a modelnet40 run.")
    if votes < 1 or passes < 1:
        raise ConfigError(f"--votes and --passes must be at least 1, got {votes} and {passes}.")
    if weights not in WEIGHTS or not (run_dir / WEIGHTS[weights]).is_file():
        present = ", ".join(w for w, f in WEIGHTS.items() if (run_dir / f).is_file()) or "none: finish the run"
        raise ConfigError(f"{run_dir / WEIGHTS.get(weights, weights)} does not exist; choose --weights from {present}.")
    out = run_dir / VOTE_RESULTS
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it.")
    cfg = config_from_record(record["config"], votes=votes, device=resolve_device(device))
    task = modelnet_task(cast(ModelNet40Config, cfg))
    task.model.load_state_dict(load_checkpoint(run_dir / WEIGHTS[weights])["model"])
    plain = class_metrics(task.test_logits(), task.test_set.labels, len(task.classes))
    accuracies = [
        task.vote_accuracy(seeded(cfg.seed, POINT_MAE_PASSES, index))["overall_acc"]
        for index in stage_bar(range(passes), f"voting passes ({votes} votes each)", passes)
    ]
    summary = metrics.mean_std_best(accuracies)
    data = task.data_summary()
    values = {"vote_pass_mean": summary["mean"], "vote_pass_std": summary["std"], "vote_pass_best": summary["best"]}
    records = make_records(
        "modelnet40",
        values,
        init_report=record["init"],
        config=dataclasses.asdict(cfg),
        data=data["coverage"],
        protocol="Point-MAE tools/runner_finetune.py test()",
        run_dir=run_dir,
    )
    payload = {
        "task": "test-modelnet40",
        "weights": weights,
        "votes": votes,
        "passes": passes,
        "plain": plain,
        "vote_passes": accuracies,
        "summary": summary,
        "data": data,
    }
    return write_results(out, payload, records)
