"""Scale-out on one machine: pkd-prep on 1 and 2 dask workers, and training under torchrun on 1 and 2 processes.

prep     the demo scene (``write_demo_scene``, ``--frames`` frames, every ``--frame-skip``-th kept, 4096
         points, seeded random teacher) written as shards of ``--shard-size`` samples by ``run_prep`` with
         ``RunOptions(dask_workers=W, threads=1)``: one dask task per shard on a LocalCluster of W processes.
         Wall time includes the cluster's start-up. A ``workers=0`` row (in-process, no dask) is the reference.
train    ``pkd.train distill`` on the store just written, same global batch and ``--streams 2`` in every row:
           1 process, OMP_NUM_THREADS=1      (plain ``python -m pkd.train``, no torch.distributed)
           1 process, OMP_NUM_THREADS=W      (the same cores used by intra-op threads instead)
           torchrun --nproc-per-node 2, OMP_NUM_THREADS=1 per process (DDP, gloo)
         samples/s is the median of the per-step rates after ``--warmup`` steps (start-up excluded); the
         three runs are repeated ``--repeats`` times, interleaved, and the best repeat is reported (the
         machine is shared: a repeat slowed by someone else's job says nothing about pkd).

Parallel efficiency = speed-up over the 1-worker / 1-process-1-thread row, divided by the worker count.

    python bench/scale.py --out bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pkd.preprocess.demo import write_demo_scene
from pkd.preprocess.frame_sample import GeometryConfig
from pkd.preprocess.prep import PrepConfig, RunOptions, run_prep
from pkd.preprocess.teacher import TeacherConfig

from _report import write_report

TORCHRUN = Path(sys.executable).with_name("torchrun")


def bench_prep(root: Path, tmp: Path, args) -> tuple[list[dict], Path]:
    cfg = PrepConfig(
        root=str(root),
        frame_skip=args.frame_skip,
        shard_size=args.shard_size,
        geometry=GeometryConfig(num_points=args.points),
    )
    rows, store = [], None
    for workers in (0, 1, 2):
        out = tmp / f"prep-w{workers}.zarr"
        tic = time.perf_counter()
        summary = run_prep(
            cfg,
            str(out),
            TeacherConfig(kind="random", seed=0),
            RunOptions(dask_workers=workers, threads=1, progress=False),
        )
        wall = time.perf_counter() - tic
        frames = sum(s["samples"] for s in summary.values())
        rows.append(
            {
                "stage": "prep",
                "setup": "in-process (no dask)" if workers == 0 else f"dask {workers} worker(s)",
                "workers": workers,
                "items": frames,
                "wall_s": wall,
                "per_s": frames / wall,
            }
        )
        store = out
    base = next(r for r in rows if r["workers"] == 1)["per_s"]
    for r in rows:
        r["speedup"] = r["per_s"] / base
        r["efficiency"] = r["speedup"] / r["workers"] if r["workers"] else None
    return rows, store


def train_run(store: Path, run_dir: Path, nproc: int, threads: int, args) -> dict:
    flags = [
        "--run-dir",
        run_dir,
        "--batch-size",
        args.batch,
        "--streams",
        2,
        "--max-steps",
        args.steps,
        "--epochs",
        1000,
        "--warmup-epochs",
        1,
        "--num-points",
        args.train_points,
        "--num-group",
        args.num_group,
        "--group-size",
        args.group_size,
        "--dim",
        args.dim,
        "--depth",
        args.depth,
        "--heads",
        args.heads,
        "--device",
        "cpu",
        "--overwrite",
    ]
    launcher = [TORCHRUN, "--standalone", "--nproc-per-node", nproc] if nproc > 1 else [sys.executable]
    cmd = [str(c) for c in [*launcher, "-m", "pkd.train", "distill", store, *flags]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    tic = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode:
        raise SystemExit(f"training failed:\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    rates = [r["samples_per_s"] for r in steps][args.warmup :]
    return {
        "stage": "train",
        "setup": f"{'torchrun ' if nproc > 1 else ''}{nproc} proc x {threads} thread(s)",
        "workers": nproc,
        "items": args.batch * args.steps,
        "wall_s": wall,
        "per_s": statistics.median(rates),
    }


def bench_train(store: Path, tmp: Path, args) -> list[dict]:
    setups = [(1, 1), (1, 2), (2, 1)]
    runs: list[list[dict]] = [[] for _ in setups]
    for _ in range(args.repeats):
        for i, (nproc, threads) in enumerate(setups):
            runs[i].append(train_run(store, tmp / f"t-{nproc}x{threads}", nproc, threads, args))
    rows = []
    for repeats in runs:
        best = max(repeats, key=lambda r: r["per_s"])
        rows.append({**best, "repeats_per_s": [round(r["per_s"], 2) for r in repeats]})
    base = rows[0]["per_s"]
    for r in rows:
        r["speedup"] = r["per_s"] / base
        r["efficiency"] = r["speedup"] / 2 if r is not rows[0] else 1.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--frame-skip", type=int, default=5)
    parser.add_argument("--points", type=int, default=4096, help="points per prepped sample")
    parser.add_argument("--shard-size", type=int, default=6, help="samples per shard (one dask task each)")
    parser.add_argument("--batch", type=int, default=8, help="global training batch")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median rate")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the training runs")
    parser.add_argument("--train-points", type=int, default=1024)
    parser.add_argument("--num-group", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(dir=args.tmp) as scratch:
        tmp = Path(scratch)
        write_demo_scene(tmp / "demo", num_frames=args.frames, layout="sens")
        prep_rows, store = bench_prep(tmp / "demo", tmp, args)
        train_rows = bench_train(store, tmp, args)
    model = {k: getattr(args, k) for k in ("train_points", "num_group", "group_size", "dim", "depth", "heads")}
    write_report(
        "scale-out on this machine (prep: frames/s; train: samples/s)",
        prep_rows + train_rows,
        args.out,
        {"args": vars(args), "train_model": model, "cpu_count": os.cpu_count(), "load_avg_before_end": os.getloadavg()},
    )


if __name__ == "__main__":
    main()
