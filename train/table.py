"""The ablation table: ``table.json`` (rows and settings), ``table.md`` (rows, then mean ± std per variant
ranked by readout accuracy) and ``table.png`` (readout accuracy per variant, error bars over seeds)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

TABLE_JSON = "table.json"
TABLE_MD = "table.md"
TABLE_PNG = "table.png"
COLUMNS = (
    "variant",
    "seed",
    "objective",
    "train_loss",
    "val_loss",
    "probe_oa",
    "finetune_oa",
    "steps",
    "wall_s",
    "run_dir",
)
ACCURACIES = ("probe_oa", "finetune_oa")
HEADERS = {
    "train_loss": "train loss",
    "val_loss": "held-out loss",
    "probe_oa": "probe OA %",
    "finetune_oa": "finetune OA %",
    "wall_s": "wall s",
    "run_dir": "run dir",
}


def new_row(variant: str, seed: int, objective: str | None, run_dir: Path) -> dict[str, Any]:
    """A row with nothing run yet (null values)."""
    return {
        **dict.fromkeys(COLUMNS),
        "variant": variant,
        "seed": seed,
        "objective": objective,
        "wall_s": 0.0,
        "run_dir": str(run_dir),
    }


def write(out_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Rewrite table.json (atomically), table.md and, once a readout exists, table.png."""
    tmp = out_dir / f".{TABLE_JSON}.tmp"
    tmp.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    os.replace(tmp, out_dir / TABLE_JSON)
    (out_dir / TABLE_MD).write_text(markdown(rows))
    summary = summarise(rows)
    if any(s[key] is not None for s in summary for key in ACCURACIES):
        plot(summary, out_dir / TABLE_PNG)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: objective, seeds, and (mean, std) of every numeric column, best readout accuracy first."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "objective": mine[0]["objective"], "seeds": len(mine)}
        for key in ("train_loss", "val_loss", *ACCURACIES):
            values = [r[key] for r in mine if r[key] is not None]
            entry[key] = (
                (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
            )
        out.append(entry)
    return sorted(out, key=lambda e: -max((e[k][0] for k in ACCURACIES if e[k]), default=float("-inf")))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Every row, then the mean ± std over seeds per variant (ranked by readout accuracy)."""
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in COLUMNS) + " | note |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        note = r.get("error") or ("stopped inside warm-up" if r.get("in_warmup") else "")
        lines.append("| " + " | ".join(_cell(r[c]) for c in COLUMNS) + f" | {note} |")
    keys = ("train_loss", "val_loss", *ACCURACIES)
    lines += [
        "",
        "Mean ± std over seeds, best readout first (losses are of each row's own objective: "
        "compare them within a variant only).",
        "",
        "| variant | objective | seeds | " + " | ".join(HEADERS[k] for k in keys) + " |",
        "|---" * (3 + len(keys)) + "|",
    ]
    for e in summarise(rows):
        lines.append(
            f"| {e['variant']} | {e['objective'] or '–'} | {e['seeds']} | "
            + " | ".join(_mean_std(e[k]) for k in keys)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of readout accuracy per variant with the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ACCURACIES if any(e[k] for e in summary)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(summary) * len(kinds)), 3.8))
    width = 0.8 / len(kinds)
    for i, key in enumerate(kinds):
        xs = [j + i * width for j in range(len(summary))]
        means = [e[key][0] if e[key] else 0.0 for e in summary]
        stds = [e[key][1] if e[key] else 0.0 for e in summary]
        ax.bar(xs, means, width, yerr=stds, capsize=4, label=HEADERS[key])
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(summary))], [e["variant"] for e in summary])
    ax.set(ylabel="ModelNet40 OA % (no voting)", title="ablation: readout accuracy per variant (mean ± std)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return format(value, ".4g") if isinstance(value, float) else str(value)


def _mean_std(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.4g} ± {value[1]:.2g}"
