"""Teacher-stage throughput: the full pipeline (JPEG decode → transform → CLIP → ClipCap MLP, decoding
overlapped in threads) against the bare model forward on pre-transformed tensors, same batch and device.

    python bench/teacher.py --device cpu --batch 32 --images 256 --threads 2 --out teacher_bench.json

Uses the real 7-Scenes JPEGs from ../shared/fixtures/7scenes_seq and a random teacher (same compute as
the real one). Bare and pipeline runs alternate ``--repeats`` times; the best run of each and the median batch time
of each are reported, which keeps a shared machine's load from favouring either. Writes a JSON record and prints a table; pipeline/bare
is the number to watch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from itertools import cycle, islice
from pathlib import Path

import torch
from PIL import Image

from pkd.preprocess.teacher import TeacherConfig, build_teacher
from pkd.preprocess.teacher_pipeline import decode_image, encode_images

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "7scenes_seq"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _intervals(steps, device: torch.device) -> list[float]:
    """Wall seconds of each step of an iterator (one batch each), synchronised on CUDA."""
    times = []
    _sync(device)
    last = time.perf_counter()
    for _ in steps:
        _sync(device)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="decode threads")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--fixtures", type=Path, default=FIXTURE)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    files = sorted(args.fixtures.glob("frame-*.color.jpg"))
    if not files:
        raise SystemExit(f"no frame-*.color.jpg under {args.fixtures}")
    jpegs = list(islice(cycle([f.read_bytes() for f in files]), args.images))
    teacher = build_teacher(TeacherConfig(kind="random", device=args.device, precision=args.precision))
    device = teacher.device

    start = time.perf_counter()
    tensors = [teacher.transform(decode_image(j)) for j in jpegs]
    decode_s = time.perf_counter() - start
    batches = [torch.stack(tensors[i:i + args.batch]) for i in range(0, len(tensors), args.batch)]
    teacher.encode(batches[0])  # warm-up (allocator, kernels)

    def bare():
        for batch in batches:
            yield teacher.encode(batch).cpu()

    def pipeline():
        return encode_images(teacher, jpegs, batch_size=args.batch, num_workers=args.workers)

    load_before = os.getloadavg()[0]
    runs = [(_intervals(bare(), device), _intervals(pipeline(), device)) for _ in range(args.repeats)]
    bare_s, pipe_s = min(sum(r[0]) for r in runs), min(sum(r[1]) for r in runs)
    bare_med = statistics.median(t for r in runs for t in r[0])
    pipe_med = statistics.median(t for r in runs for t in r[1])
    width, height = Image.open(files[0]).size
    record = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "precision": args.precision, "batch": args.batch, "images": args.images, "image_size": [width, height],
        "decode_workers": args.workers, "torch_threads": torch.get_num_threads(),
        "decode_transform_images_per_s_1thread": args.images / decode_s,
        "bare_forward_images_per_s": args.images / bare_s,
        "pipeline_images_per_s": args.images / pipe_s,
        "pipeline_over_bare": bare_s / pipe_s,
        "bare_median_batch_images_per_s": args.batch / bare_med,
        "pipeline_median_batch_images_per_s": args.batch / pipe_med,
        "pipeline_over_bare_median_batch": bare_med / pipe_med,
        "runs_s": [{"bare": sum(b), "pipeline": sum(p)} for b, p in runs],
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
    }
    rows = [("decode+transform, 1 thread", record["decode_transform_images_per_s_1thread"]),
            ("bare forward (pre-transformed)", record["bare_forward_images_per_s"]),
            ("pipeline (decode overlapped)", record["pipeline_images_per_s"]),
            ("bare, median batch", record["bare_median_batch_images_per_s"]),
            ("pipeline, median batch", record["pipeline_median_batch_images_per_s"])]
    print(f"teacher bench: {record['device_name']} {args.device} {args.precision}, batch {args.batch}, "
          f"{args.images} images {width}x{height}, torch threads {record['torch_threads']}, {args.workers} decode threads")
    for name, rate in rows:
        print(f"  {name:<32} {rate:8.1f} images/s")
    print(f"  {'pipeline / bare (best run)':<32} {record['pipeline_over_bare']:8.1%}")
    print(f"  {'pipeline / bare (median batch)':<32} {record['pipeline_over_bare_median_batch']:8.1%}")
    print(f"  load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
