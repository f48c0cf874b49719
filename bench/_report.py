"""Shared output of the benchmarks: a JSON file and a plain table on stdout."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np


def machine() -> dict:
    """What the numbers were measured on."""
    import os

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_report(name: str, rows: list[dict], out: str | None, extra: dict | None = None) -> None:
    """Print rows as a table and write them (plus machine info) as JSON to ``out``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{name}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(
            json.dumps(
                {"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2, default=_plain
            )
        )
        print(f"wrote {out}")


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
