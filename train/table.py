"""The ablation table: ``table.json`` (rows and settings), ``table.md`` (rows, then mean ± std per variant
ranked by readout accuracy, then the paper's Tables 5 and 6 beside pkd's fine-tune readout where it has
one) and ``table.png`` (readout accuracy per variant, error bars over seeds).

Rows of an ablation across target sets (``--targets``) also hold ``targets`` (``SET/ARRAY``, None for a row that
regresses none), shown as a column after ``variant`` and in the per-variant labels; tables without it are unchanged.

A row's ``status`` is ``done``, ``failed`` (``error`` says which stage and why) or ``running`` (a call
stopped inside it); tables written before rows had a status read as ``failed`` when they hold an error,
else with no status."""

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
    "status",
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
# The paper's Tables 5 and 6 (ModelNet40 fine-tuning, no voting), quoted from arXiv 2212.08974 (not measured
# by pkd): its row name, the pkd variant that runs it, its accuracy in percent.
PAPER_TABLES = {
    "Table 5 (key components)": (
        ("From Scratch", "scratch", 92.38),
        ("w/o Concept Extraction", "no-concept", 92.42),
        ("w/o Caption Model", "clip-target", 92.18),
        ("Direct Local Alignment", "local", 91.65),
        ("Distillation", "distill", 92.71),
    ),
    "Table 6 (do we need reconstruction?)": (
        ("Only Reconstruction", "recon", 92.42),
        ("Only Distillation", "distill", 92.71),
        ("Reconstruction + Distillation", "recon+distill", 92.42),
    ),
}


def new_row(
    variant: str, seed: int, objective: str | None, run_dir: Path, targets: str | None = None
) -> dict[str, Any]:
    """A row with nothing run yet (null values); ``targets`` only where the call listed target sets."""
    return {
        **dict.fromkeys(COLUMNS),
        "variant": variant,
        **({"targets": targets} if targets else {}),
        "seed": seed,
        "objective": objective,
        "wall_s": 0.0,
        "status": "pending",
        "error": None,
        "run_dir": str(run_dir),
    }


def row_label(row: dict[str, Any]) -> str:
    """The variant of a row, with its target set where it names one: ``distill [dino/embed]``."""
    return f"{row['variant']} [{row['targets']}]" if row.get("targets") else row["variant"]


def _columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The columns of the row table: ``targets`` after ``variant`` once any row names a target set."""
    if not any(r.get("targets") for r in rows):
        return COLUMNS
    return (COLUMNS[0], "targets", *COLUMNS[1:])


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of any table this pkd wrote, with every current key (older rows have no status)."""
    status = "failed" if row.get("error") else None
    return {**dict.fromkeys(COLUMNS), "status": status, "error": None, **row}


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
    """Per variant (and target set: ``row_label``): objective, seeds, and (mean, std) of every numeric column, best
    readout accuracy first."""
    out = []
    for variant in dict.fromkeys(row_label(r) for r in rows):
        mine = [r for r in rows if row_label(r) == variant]
        entry: dict[str, Any] = {"variant": variant, "objective": mine[0]["objective"], "seeds": len(mine)}
        for key in ("train_loss", "val_loss", *ACCURACIES):
            entry[key] = _stats([r[key] for r in mine if r[key] is not None])
        out.append(entry)
    return sorted(out, key=lambda e: -max((e[k][0] for k in ACCURACIES if e[k]), default=float("-inf")))


def markdown(rows: list[dict[str, Any]]) -> str:
    """Every row, then the mean ± std over seeds per variant (ranked by readout accuracy)."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " | note |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        note = r.get("error") or ("stopped inside warm-up" if r.get("in_warmup") else "")
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + f" | {_one_line(note)} |")
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
    return "\n".join(lines + paper_tables(rows)) + "\n"


def paper_tables(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's Tables 5 and 6 beside pkd's fine-tune readout of the same rows (none without one; rows naming
    a target set are not the paper's)."""
    measured: dict[str, list[float]] = {}
    for r in rows:
        if r.get("finetune_oa") is not None and not r.get("targets"):
            measured.setdefault(r["variant"], []).append(r["finetune_oa"])
    if not any(variant in measured for table in PAPER_TABLES.values() for _, variant, _ in table):
        return []
    lines = [
        "",
        "The paper's ablations (ModelNet40 fine-tuning, no voting; the paper's numbers, not measured by pkd) "
        "beside pkd's fine-tune readout:",
    ]
    for title, paper_rows in PAPER_TABLES.items():
        lines += [
            "",
            title,
            "",
            "| paper row | pkd variant | paper OA % | pkd finetune OA % | seeds |",
            "|---" * 5 + "|",
        ]
        for name, variant, accuracy in paper_rows:
            values = measured.get(variant, [])
            lines.append(f"| {name} | {variant} | {accuracy:.2f} | {_mean_std(_stats(values))} | {len(values)} |")
    return lines


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


def _stats(values: list[float]) -> tuple[float, float] | None:
    """(mean, std) of ``values`` (std 0 for one value), None for none."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _one_line(text: str) -> str:
    """``text`` fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return format(value, ".4g") if isinstance(value, float) else str(value)


def _mean_std(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.4g} ± {value[1]:.2g}"
