"""Cost of each teacher kind: images/s of ``encode`` and bytes per sample of its arrays stored as float16.

Each kind is built with seeded random weights (the same compute as real ones) and timed on batches of
already preprocessed images (the model alone: decode and transform run in prep's threads beside it).
Bytes per sample are the arrays' element counts x 2 (float16), without and with patch tokens.

    python bench/teacher_kinds.py --device cpu --batch 8 --batches 4 --out bench/results/teacher_kinds.json
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pkd.preprocess.teachers import TargetTeacher, build_target_teacher

from _report import write_report

KINDS = ("clipcap", "open_clip:ViT-B-16", "dinov2:small", "dinov2:base")
FLOAT16_BYTES = 2


def sync(teacher: TargetTeacher) -> None:
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)


def images_per_s(teacher: TargetTeacher, batch: int, batches: int, repeats: int) -> tuple[float, list[float]]:
    """Best of ``repeats`` runs of ``batches`` forwards of ``batch`` images, after one warm-up forward."""
    size = teacher.transform.center_crop
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(teacher.device)
    teacher.encode(x)
    runs = []
    for _ in range(repeats):
        sync(teacher)
        start = time.perf_counter()
        for _ in range(batches):
            teacher.encode(x)
        sync(teacher)
        runs.append(time.perf_counter() - start)
    return batch * batches / min(runs), runs


def bytes_per_sample(teacher: TargetTeacher) -> int:
    return sum(math.prod(a.shape) * FLOAT16_BYTES for a in teacher.arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated teacher kinds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="forwards per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per kind; the best is kept")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    rows, runs = [], {}
    for kind in args.kinds.split(","):
        teacher = build_target_teacher(
            kind, random=True, device=args.device, precision=args.precision, patch_tokens=True
        )
        speed, runs[kind] = images_per_s(teacher, args.batch, args.batches, args.repeats)
        tokens = next(a for a in teacher.arrays if a.name == "patch_tokens")
        with_tokens = bytes_per_sample(teacher)
        rows.append(
            {
                "kind": kind,
                "arrays": " ".join(f"{a.name}{a.shape}".replace(" ", "") for a in teacher.arrays),
                "input": teacher.transform.center_crop,
                "bytes/sample": with_tokens - math.prod(tokens.shape) * FLOAT16_BYTES,
                "bytes/sample+tokens": with_tokens,
                "images/s": speed,
                "device": str(teacher.device),
                "precision": args.precision,
                "batch": args.batch,
                "torch_threads": torch.get_num_threads(),
            }
        )
    write_report("teacher kinds: encode throughput and float16 bytes per sample", rows, args.out, {"runs_s": runs})


if __name__ == "__main__":
    main()
