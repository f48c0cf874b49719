"""Run metrics: ``metrics.jsonl`` (one JSON record per step and per epoch) and ``curves.png`` (loss, lr)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl``; on resume drops records past the checkpoint's step."""

    def __init__(self, run_dir: Path, keep_until_step: int = 0, write: bool = True) -> None:
        """``write=False`` (DDP ranks other than 0) keeps the records in memory and never touches the files."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self.write = write
        self.records: list[dict[str, Any]] = []
        if not write:
            return
        if self.path.exists():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= keep_until_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def _append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, **values: Any) -> None:
        self._append({"kind": "step", **values})

    def epoch(self, epoch: int, step: int) -> None:
        """An epoch summary: mean loss and samples/s over the epoch's steps."""
        steps = [r for r in self.records if r["kind"] == "step" and r["epoch"] == epoch]
        self._append({"kind": "epoch", "epoch": epoch, "step": step, "loss": _mean(steps, "loss"),
                      "samples_per_s": _mean(steps, "samples_per_s")})

    def summary(self) -> dict[str, Any]:
        """Last step's loss and the mean samples/s over the steps logged (first step excluded when possible)."""
        steps = [r for r in self.records if r["kind"] == "step"]
        if not steps:
            return {"final_loss": None, "samples_per_s": None}
        return {"final_loss": steps[-1]["loss"], "samples_per_s": _mean(steps[1:] or steps, "samples_per_s")}

    def plot(self) -> None:
        """Write curves.png: loss (log scale) and learning rate against step."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in self.records if r["kind"] == "step"]
        if not steps or not self.write:
            return
        x = [r["step"] for r in steps]
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
        ax_loss.plot(x, [r["loss"] for r in steps])
        ax_loss.set(xlabel="step", ylabel="loss", yscale="log" if min(r["loss"] for r in steps) > 0 else "linear")
        ax_lr.plot(x, [r["lr"] for r in steps])
        ax_lr.set(xlabel="step", ylabel="learning rate")
        fig.tight_layout()
        tmp = self.run_dir / f".{CURVES}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.run_dir / CURVES)


def _mean(records: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in records) / max(1, len(records))
