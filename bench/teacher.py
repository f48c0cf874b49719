"""Teacher-stage throughput: the full pipeline (JPEG decode → transform → CLIP → ClipCap MLP, decoding
overlapped in threads) against the bare model forward on pre-transformed tensors, same batch and device.

    python bench/teacher.py --device cpu --batch 32 --images 256 --threads 2 --out teacher_bench.json

Uses the real 7-Scenes JPEGs from ../shared/fixtures/7scenes_seq and a random teacher (same compute as
the real one). Bare and pipeline runs alternate ``--repeats`` times; the best run, the median batch
time and the process CPU time per image of each are reported, so a shared machine's load favours
neither (CPU time per image is the load-insensitive figure). Writes JSON and prints a table.
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


def _run(steps, device: torch.device) -> tuple[list[float], float]:
    """Wall seconds of each step of an iterator (one batch each) and the process CPU seconds of all."""
    times = []
    _sync(device)
    cpu, last = time.process_time(), time.perf_counter()
    for _ in steps:
        _sync(device)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times, time.process_time() - cpu


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
    runs = [(_run(bare(), device), _run(pipeline(), device)) for _ in range(args.repeats)]
    bare_s, pipe_s = min(sum(b[0]) for b, _ in runs), min(sum(p[0]) for _, p in runs)
    bare_med = statistics.median(t for b, _ in runs for t in b[0])
    pipe_med = statistics.median(t for _, p in runs for t in p[0])
    bare_cpu = min(b[1] for b, _ in runs) / args.images
    pipe_cpu = min(p[1] for _, p in runs) / args.images
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
        "bare_cpu_s_per_image": bare_cpu,
        "pipeline_cpu_s_per_image": pipe_cpu,
        "pipeline_over_bare_cpu": bare_cpu / pipe_cpu,
        "runs_s": [{"bare": sum(b[0]), "pipeline": sum(p[0])} for b, p in runs],
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
    }
    rows = [("decode+transform, 1 thread", record["decode_transform_images_per_s_1thread"]),
            ("bare forward (pre-transformed)", record["bare_forward_images_per_s"]),
            ("pipeline (decode overlapped)", record["pipeline_images_per_s"]),
            ("bare, median batch", record["bare_median_batch_images_per_s"]),
            ("pipeline, median batch", record["pipeline_median_batch_images_per_s"])]
    print(f"teacher bench: {record['device_name']} {args.device} {args.precision}, batch {args.batch}, "
          f"{args.images} images {width}x{height}, torch threads {record['torch_threads']}, "
          f"{args.workers} decode threads")
    for name, rate in rows:
        print(f"  {name:<32} {rate:8.1f} images/s")
    print(f"  {'pipeline / bare (best run)':<32} {record['pipeline_over_bare']:8.1%}")
    print(f"  {'pipeline / bare (median batch)':<32} {record['pipeline_over_bare_median_batch']:8.1%}")
    print(f"  {'CPU s/image bare, pipeline':<32} {bare_cpu:8.3f} {pipe_cpu:8.3f}  (ratio {bare_cpu / pipe_cpu:.1%})")
    print(f"  load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
