"""``pkd-train compare``: one table across runs from their results files (schema: ``results``).

Every record found under the given folders is grouped by (benchmark, metric, init, settings digest): runs in
a group differ only by seed (or few-shot fold), so the group reports mean ± population std over them. The
table goes to Markdown, JSON and a PNG of the group means with their std as error bars.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pkd.common.errors import ConfigError, DataError
from pkd.train.downstream import metrics
from pkd.train.downstream.plots import plot_comparison
from pkd.train.downstream.results import RESULT_FILES, SCHEMA


def find_results(paths: list[Path]) -> list[Path]:
    """Results files named by ``paths`` (a file, or every results file below a folder), sorted."""
    found: set[Path] = set()
    for path in paths:
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p for name in RESULT_FILES for p in path.rglob(name))
        else:
            raise DataError(f"{path} does not exist; pass run folders or results.json files.")
    return sorted(found)


def load_records(files: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of every file in the current schema, and the files skipped (older or foreign) with why."""
    records, skipped = [], []
    for path in files:
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            skipped.append(f"{path}: not JSON ({exc})")
            continue
        if not isinstance(content, dict) or content.get("schema") != SCHEMA:
            skipped.append(f"{path}: not a {SCHEMA} file (written by an older pkd?); re-run its evaluation")
            continue
        records += content["records"]
    return records, skipped


def init_label(init: dict[str, Any]) -> str:
    """Short name of an init: 'scratch', or the checkpoint file (its run folder for last.pt / best.pt)."""
    path = Path(init["path"])
    name = path.parent.name if path.name in ("last.pt", "best.pt") else path.name
    flag = {True: " (RANDOM teacher)", False: "", None: ""}[init.get("random_teacher")]
    return f"{name or init['path']}{flag}"


def group_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the comparison: one per (benchmark, metric, init, settings), values pooled over seeds/folds."""
    unique = {(r["run"], r["benchmark"], r["metric"]): r for r in records}  # a run counts once per metric
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in unique.values():
        groups[(r["benchmark"], r["metric"], r["init"]["path"], r["settings"])].append(r)
    rows = []
    for (benchmark, metric, _, settings), members in sorted(groups.items()):
        stats = metrics.mean_std_best([m["value"] for m in members])
        coverage = min(members, key=lambda m: m["data"]["used"] / max(1, m["data"]["listed"]))["data"]
        rows.append(
            {
                "benchmark": benchmark,
                "metric": metric,
                "init": init_label(members[0]["init"]),
                "random_teacher": members[0]["init"].get("random_teacher"),
                "teacher": members[0]["init"].get("teacher"),
                "settings": settings,
                "seeds": sorted({m["seed"] for m in members}),
                "n": stats["n"],
                "mean": stats["mean"],
                "std": stats["std"],
                "unit": members[0]["unit"],
                "coverage": coverage,
                "runs": sorted({m["run"] for m in members}),
            }
        )
    return rows


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table; partial data is flagged in the data column."""
    lines = ["| benchmark | metric | init | seeds | n | value | data |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        data = r["coverage"]
        partial = f"{data['used']}/{data['listed']} {data['split']}" + (
            " (partial)" if data["used"] < data["listed"] else ""
        )
        value = f"{r['mean']:.2f} ± {r['std']:.2f} {r['unit']}" if r["n"] > 1 else f"{r['mean']:.2f} {r['unit']}"
        lines.append(
            f"| {r['benchmark']} | {r['metric']} | {r['init']} | {', '.join(map(str, r['seeds']))} | "
            f"{r['n']} | {value} | {partial} |"
        )
    return "\n".join(lines) + "\n"


def per_class_tables(files: list[Path]) -> dict[str, str]:
    """Per-class numbers of several runs side by side (the paper's Table 9 for ``scannet-det``): one Markdown
    table per (benchmark, metric) of the benchmarks that declare ``per_class``, a column per results file."""
    from pkd.train.downstream.registry import benchmarks

    columns: dict[tuple[str, str], list[tuple[str, dict[str, float | None]]]] = defaultdict(list)
    for path in files:
        content = json.loads(path.read_text())
        bench = benchmarks().get(str(content.get("task"))) if isinstance(content, dict) else None
        if bench is None or bench.per_class is None or content.get("schema") != SCHEMA:
            continue
        label = f"{init_label({'path': content['init'].get('init', 'scratch')})} ({path.parent.name})"
        for metric, values in (content.get("test") or {}).get(bench.per_class, {}).items():
            columns[(bench.name, metric)].append((label, values))
    tables = {}
    for (name, metric), runs in sorted(columns.items()):
        classes = list(runs[0][1])
        lines = [
            f"| {name} {metric} | " + " | ".join(label for label, _ in runs) + " |",
            "|---" * (len(runs) + 1) + "|",
        ]
        for c in classes:
            values = [v.get(c) for _, v in runs]
            lines.append(f"| {c} | " + " | ".join("–" if x is None else f"{x:.2f}" for x in values) + " |")
        tables[f"{name}/{metric}"] = "\n".join(lines) + "\n"
    return tables


def compare(paths: list[Path], out: Path, overwrite: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Write ``out`` (Markdown: the records' table, then any per-class tables), ``out.json`` and ``out.png`` for
    every record below ``paths``."""
    outputs = [out, out.with_suffix(".json"), out.with_suffix(".png")]
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} already exists; pass --overwrite to replace the comparison or choose another --out."
        )
    files = find_results(paths)
    records, skipped = load_records(files)
    if not records:
        raise DataError(
            f"no {SCHEMA} results under {', '.join(map(str, paths))}; pass the folders of finished "
            "finetune / probe / few-shot / test runs."
        )
    rows = group_records(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = per_class_tables(files)
    out.write_text("\n".join([format_markdown(rows), *tables.values()]))
    outputs[1].write_text(json.dumps({"rows": rows, "per_class": tables, "skipped": skipped}, indent=2) + "\n")
    plot_comparison(rows, outputs[2])
    return rows, skipped
