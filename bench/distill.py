"""Benchmark a whole ``pkd-train distill`` run against the bare training step of the same student.

Cases, in one process on a synthetic store on disk (a train split and a small val split):
  step-only  ``train_step.py``'s ``student`` case: forward + backward + AdamW on in-memory batches
  distill    ``pkd.train.trainer.train``: loader, step, metrics log, checkpoints and the held-out loss
             every epoch. Two figures: the median of the per-step rates it logs (loader + step + logging)
             and its whole wall time after the first step (checkpoints, held-out evaluation and plots
             amortised over ``--steps`` steps)

    python bench/distill.py --points 1024 --batch 8 --steps 12 --out bench/results/distill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from _store import store_factory
from train_step import run_case

from pkd.train.model import StudentConfig
from pkd.train.trainer import TrainConfig, train

from _report import write_report


def distill_rates(store: Path, run_dir: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(median logged samples/s, whole-run samples/s after the first step) of one distill run."""
    cfg = TrainConfig(
        store=str(store),
        model=StudentConfig(num_points=args.points, num_group=args.groups),
        batch_size=args.batch,
        epochs=args.epochs,
        max_steps=args.steps,
        device=args.device,
    )
    tic = time.perf_counter()
    train(cfg, run_dir, progress=False)
    wall = time.perf_counter() - tic
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in steps if r.get("kind") == "step"]
    first = args.batch / rates[0]  # the first step carries the run's setup: left out, as step-only's warm-up
    return statistics.median(rates[1:]), args.batch * (len(rates) - 1) / (wall - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the run (and of step-only)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs the steps span (one held-out loss each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    per_epoch = -(-args.steps // args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        make_store = store_factory().make_store
        store = make_store(
            Path(tmp) / "pairs.zarr",
            n=per_epoch * args.batch,
            num_points=args.points,
            shard_size=args.batch,
            patch_tokens=False,
        )
        make_store(store, n=2 * args.batch, num_points=args.points, shard_size=args.batch, split="val", add_split=True)
        logged, whole = distill_rates(store, Path(tmp) / "run", args)
        step = run_case(
            "student",
            types.SimpleNamespace(
                points=args.points, groups=args.groups, batch=args.batch, steps=args.steps, device=args.device
            ),
        )
    step_rate = args.batch / statistics.median(step["step_seconds"])
    rows = [
        {"case": "step-only", "samples/s": step_rate, "ratio": 1.0},
        {"case": "distill, logged steps", "samples/s": logged, "ratio": logged / step_rate},
        {"case": "distill, whole run", "samples/s": whole, "ratio": whole / step_rate},
    ]
    setup = {"device": args.device, "points": args.points, "batch": args.batch, "steps": args.steps}
    write_report(f"distill end to end vs step-only ({args.device}, {args.points} points)", rows, args.out, setup)


if __name__ == "__main__":
    main()
