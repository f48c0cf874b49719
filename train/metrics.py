"""Run metrics: ``metrics.jsonl`` (one JSON record per step, epoch, held-out evaluation and, with
``--monitor-recon``, the step-0 ``monitor`` record) and ``curves.png``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pkd.common import durable
from pkd.common.errors import ConfigError

METRICS = "metrics.jsonl"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
STEP_FIELDS = ("kind", "step", "epoch", "loss", "lr", "samples_per_s")  # a step record's fields besides loss parts


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl``; on resume drops records past the checkpoint's step."""

    def __init__(
        self,
        run_dir: Path,
        keep_until_step: int = 0,
        write: bool = True,
        sinks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ) -> None:
        """``write=False`` (DDP ranks other than 0) keeps the records in memory and never touches the files;
        ``sinks`` also receive every new record (e.g. ``TensorBoardSink``)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self.write = write
        self.sinks = list(sinks) if write else []
        self.records: list[dict[str, Any]] = []
        if not write:
            return
        if self.path.exists():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= keep_until_step]
        durable.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        durable.committed(f"{METRICS} {record['kind']} step {record['step']}")
        for sink in self.sinks:
            sink(record)

    def step(self, **values: Any) -> None:
        self._append({"kind": "step", **values})

    def epoch(self, epoch: int, step: int) -> None:
        """An epoch summary: mean loss, loss parts (``monitor_recon`` included) and samples/s over the epoch's steps."""
        steps = [r for r in self.records if r["kind"] == "step" and r["epoch"] == epoch]
        parts = [k for k in (steps[-1] if steps else {}) if k not in STEP_FIELDS and all(k in r for r in steps)]
        self._append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": step,
                "loss": _mean(steps, "loss"),
                **{k: _mean(steps, k) for k in parts},
                "samples_per_s": _mean(steps, "samples_per_s"),
            }
        )

    def has(self, kind: str, step: int) -> bool:
        """Whether a record of ``kind`` was logged at ``step`` (e.g. by the run before a resume)."""
        return any(r["kind"] == kind and r["step"] == step for r in self.records)

    def monitor(self, **values: Any) -> None:
        """The ``--monitor-recon`` record before any update (epoch 0, step 0: the paper's "No training" row)."""
        self._append({"kind": "monitor", **values})

    def val(self, **values: Any) -> None:
        """A held-out evaluation (epoch, step, loss, its parts, samples)."""
        self._append({"kind": "val", **values})

    def summary(self) -> dict[str, Any]:
        """Last step's loss, last held-out loss, and the mean samples/s over the steps logged (first step
        excluded when possible)."""
        steps = [r for r in self.records if r["kind"] == "step"]
        vals = [r for r in self.records if r["kind"] == "val"]
        return {
            "final_loss": steps[-1]["loss"] if steps else None,
            "val_loss": vals[-1]["loss"] if vals else None,
            "samples_per_s": _mean(steps[1:] or steps, "samples_per_s") if steps else None,
        }

    def plot(self, title: str = "") -> None:
        """Write curves.png under ``title``: training and held-out loss (log scale), learning rate, against step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter

        steps = [r for r in self.records if r["kind"] == "step"]
        vals = [r for r in self.records if r["kind"] == "val"]
        if not steps or not self.write:
            return
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.8))
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
        if vals:
            ax_loss.plot([r["step"] for r in vals], [r["loss"] for r in vals], "o-", label="held-out")
            ax_loss.legend()
        losses = [r["loss"] for r in steps + vals]
        log_scale = min(losses) > 0
        ax_loss.set(xlabel="step", ylabel="loss", yscale="log" if log_scale else "linear")
        ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps])
        ax_lr.set(xlabel="step", ylabel="learning rate")
        plain = FormatStrFormatter("%g")  # 0.2, 1e-05: no offsets, no 10^x labels
        for axis in (ax_loss.yaxis, ax_lr.yaxis):
            axis.set_major_formatter(plain)
        if log_scale and max(losses) < 10 * min(losses):  # less than a decade: label the minor ticks too
            ax_loss.yaxis.set_minor_formatter(plain)
        fig.suptitle(title)
        fig.tight_layout()
        tmp = self.run_dir / f".{CURVES}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.run_dir / CURVES)


class TensorBoardSink:
    """The numeric fields of every metrics.jsonl record as TensorBoard scalars ``<kind>/<field>`` at its step.

    Needs the optional ``tensorboard`` package (``pip install 'pkd[tensorboard]'``). On resume, events
    past the checkpoint's step (written before an interruption) are purged, as metrics.jsonl drops them.
    """

    def __init__(self, log_dir: Path, keep_until_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install 'pkd[tensorboard]' "
                "(or drop --tensorboard; metrics.jsonl holds the same numbers)."
            ) from exc
        self.writer = SummaryWriter(str(log_dir), purge_step=keep_until_step + 1 if keep_until_step else None)

    def __call__(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        self.writer.flush()


def _mean(records: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in records) / max(1, len(records))
