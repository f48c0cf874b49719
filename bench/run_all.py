"""Run every benchmark and write bench/results.md: stage, figure, limit or peer, ratio, target.

    python bench/run_all.py                 # all benchmarks at sizes that suit a small CPU machine
    python bench/run_all.py --only teacher  # one of them; the table is rebuilt from every JSON present

Each benchmark also keeps its own JSON in bench/results/ (not committed: machine-specific).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHMARKS = {
    "prep_geometry": ["--repeats", "3"],
    "teacher": ["--batch", "32", "--images", "128"],
    "train_step": ["--points", "4096", "--batch", "8", "--steps", "3", "--rounds", "3"],
    "scale": [],
    "loader": ["--samples", "1024", "--rounds", "5"],
    "distill": ["--points", "1024", "--batch", "8", "--steps", "12"],
}


def _rows(name: str, data: dict) -> list[tuple[str, str, str, float, str]]:
    """(stage, figure, limit or peer, ratio, target) rows of one benchmark's JSON."""
    rows = []
    if name == "prep_geometry":
        for r in data["rows"]:
            rows.append(
                (
                    f"prep geometry, {r['input']}, {r['sampling']}",
                    f"{r['geometry_fps']:.0f} frames/s",
                    f"decode-only {r['decode_fps']:.0f} frames/s",
                    r["ratio"],
                    ">= 0.8",
                )
            )
            if r["sampling"] == "fps":
                rows.append(
                    (
                        f"prep bytes read, {r['input']}",
                        f"{r['bytes_read/payload']:.3f} x kept payload",
                        "-",
                        r["bytes_read/payload"],
                        "<= 1.1",
                    )
                )
    elif name == "teacher":
        for r in data["rows"]:
            rows.append(
                (
                    f"teacher stage ({r['device']}, batch {r['batch']})",
                    f"{r['full_stage_images/s']:.1f} img/s",
                    f"bare forward {r['bare_images/s']:.1f} img/s",
                    r["ratio"],
                    ">= 0.9",
                )
            )
    elif name == "train_step":
        cases = {r["case"]: r for r in data["rows"]}
        student, port = cases.get("student"), cases.get("pointmae")
        if student and port:
            rows.append(
                (
                    f"train step distill ({data['device']}, {data['points']} pts, batch {data['batch']})",
                    f"{student['s_per_step']:.3f} s/step",
                    f"Point-MAE port {port['s_per_step']:.3f} s/step",
                    student["s_per_step"] / port["s_per_step"],
                    "<= 1.0",
                )
            )
        if student and "student-store" in cases:
            fed = cases["student-store"]
            rows.append(
                (
                    "train step store-fed",
                    f"{fed['samples_per_s']:.2f} samples/s",
                    f"in-memory {student['samples_per_s']:.2f} samples/s",
                    fed["samples_per_s"] / student["samples_per_s"],
                    ">= 0.95",
                )
            )
    elif name == "loader":
        cases = {r["case"]: r for r in data["rows"]}
        limit = cases["decode-only"]["samples/s"]
        for case, r in cases.items():
            if case.startswith("loader"):
                rows.append(
                    (
                        f"store loader, {case[len('loader ') :]} ({data['cores']} core, {data['points']} pts)",
                        f"{r['samples/s']:.0f} samples/s",
                        f"decode-only {limit:.0f} samples/s",
                        r["ratio"],
                        ">= 0.5",
                    )
                )
    elif name == "distill":
        step = next(r for r in data["rows"] if r["case"] == "step-only")
        for r in data["rows"]:
            if r["case"] != "step-only":
                rows.append(
                    (
                        f"{r['case']} ({data['device']}, {data['points']} pts, batch {data['batch']})",
                        f"{r['samples/s']:.2f} samples/s",
                        f"step-only {step['samples/s']:.2f} samples/s",
                        r["ratio"],
                        ">= 0.9",
                    )
                )
    elif name == "scale":
        for r in data["rows"]:
            if r["efficiency"] is None or r["workers"] < 2:
                continue
            base = next(b for b in data["rows"] if b["stage"] == r["stage"] and b["speedup"] == 1.0)
            rows.append(
                (
                    f"{r['stage']} scale-out, {r['setup']}",
                    f"{r['per_s']:.2f} items/s",
                    f"{base['setup']} {base['per_s']:.2f} items/s",
                    r["efficiency"],
                    "efficiency (report)",
                )
            )
    return rows


def write_table() -> Path:
    """Rebuild bench/results.md from the JSON files present."""
    lines = ["| stage | figure | limit or peer | ratio | target |", "|---|---|---|---|---|"]
    machines = set()
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        machines.add(json.dumps(data.get("machine", {"device": data.get("device")}), sort_keys=True))
        lines += [f"| {s} | {f} | {p} | {r:.2f} | {t} |" for s, f, p, r, t in _rows(name, data)]
    lines += ["", "Measured on: " + "; ".join(sorted(machines))]
    lines += ["", "GPU figures (bench/gpu.sh, with the card of each run) are in results_gpu.md."]
    out = HERE / "results.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        cmd = [sys.executable, str(HERE / f"{name}.py"), *BENCHMARKS[name], "--out", str(RESULTS / f"{name}.json")]
        subprocess.run(cmd, check=True)
    print(write_table().read_text())


if __name__ == "__main__":
    main()
