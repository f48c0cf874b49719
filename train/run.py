"""Python entry points the CLI calls: one training run, and an ablation over variants with a results table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pkd.common.errors import PkdError
from pkd.train.distributed import launch_rank
from pkd.train.model import variant_spec
from pkd.train.trainer import TrainConfig, train


def run_ablation(base: TrainConfig, variants: list[str], out_dir: str | Path, overwrite: bool = False,
                 progress: bool = True) -> list[dict[str, Any]]:
    """Train ``base`` once per variant under ``out_dir/<variant>``; write ``table.md`` and ``table.json``.

    A variant the store cannot serve (e.g. ``local`` without patch tokens) is recorded with its error
    and the others still run.
    """
    for name in variants:
        variant_spec(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in variants:
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, variant=name))
        try:
            summary = train(cfg, out_dir / name, overwrite=overwrite, progress=progress)
            rows.append({"variant": name, "final_loss": summary["final_loss"], "steps": summary["steps"],
                         "samples_per_s": summary["samples_per_s"], "error": None})
        except PkdError as exc:
            rows.append({"variant": name, "final_loss": None, "steps": 0, "samples_per_s": None, "error": str(exc)})
    if launch_rank() != 0:
        return rows  # under torchrun only rank 0 writes the table
    (out_dir / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "table.md").write_text(format_table(rows))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ablation rows."""
    lines = ["| variant | final loss | steps | samples/s | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {_fmt(r['final_loss'], '.4g')} | {r['steps']} | {_fmt(r['samples_per_s'], '.1f')} "
              f"| {r['error'] or ''} |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
