"""Teacher stage of pkd-prep against the bare model forward, same device, batch and images.

* full stage: ``build_shard`` on real 7-Scenes frames packed into a .sens — read, decode, geometry and
  the open_clip transform in ``--threads`` threads overlapping the model, CLIP ViT-B/32 + ClipCap MLP in
  batches of ``--batch``, and the shard write;
* bare forward: ``Teacher.encode`` on the same images already transformed and batched.

Target: full stage >= 90 % of the bare forward. A random teacher has the real one's compute.

    python bench/teacher.py --device cpu --batch 32 --images 128 --out bench/results/teacher.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import zarr
from PIL import Image
from prep_geometry import SEVEN_SCENES, pack_seven_scenes

from pkd.common import store
from pkd.preprocess.frame_sample import GeometryConfig
from pkd.preprocess.frames import decode_color
from pkd.preprocess.planner import plan_splits
from pkd.preprocess.scenes import find_scenes, open_scene
from pkd.preprocess.shard_writer import ShardJob, build_shard
from pkd.preprocess.teacher import Teacher, TeacherConfig, build_teacher

from _report import write_report


def sync(teacher: Teacher) -> None:
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)


def full_stage(root: Path, out: Path, teacher: Teacher, images: int, batch: int, threads: int) -> float:
    """Seconds to build one shard of ``images`` samples with geometry and teacher, written to a store."""
    plan = plan_splits(find_scenes(root), frame_skip=1, limit=images, progress=False)["train"]
    attrs = store.SplitAttrs(
        scenes=tuple(e.name for e in plan.scenes), num_samples=len(plan.samples), shard_size=len(plan.samples)
    )
    group = store.create_split(zarr.open_group(str(out), mode="w"), "train", attrs, GeometryConfig().num_points)
    job = ShardJob(
        split="train",
        shard=0,
        scenes=tuple(plan.scenes),
        samples=tuple(plan.samples),
        seed=0,
        geometry=GeometryConfig(),
        stages=store.STAGES,
    )
    sync(teacher)
    start = time.perf_counter()
    build_shard(group, job, teacher, batch, threads)
    sync(teacher)
    return time.perf_counter() - start


def bare_forward(root: Path, teacher: Teacher, images: int, batch: int) -> float:
    """Seconds of the model alone on the same images, transformed and batched beforehand."""
    (entry,) = find_scenes(root)
    with open_scene(entry) as reader:
        frames = reader.frame_numbers()[:images]
        tensors = [teacher.transform(Image.fromarray(decode_color(raw))) for raw in reader.read(frames)]
    batches = [torch.stack(tensors[i : i + batch]).to(teacher.device) for i in range(0, len(tensors), batch)]
    sync(teacher)
    start = time.perf_counter()
    for chunk in batches:
        teacher.encode(chunk).prefix.cpu()
    sync(teacher)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="frames (at most 300)")
    parser.add_argument("--threads", type=int, default=2, help="decode/geometry threads of the full stage")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    if not SEVEN_SCENES.exists():
        raise SystemExit(f"{SEVEN_SCENES} is absent: the teacher bench needs the real 7-Scenes frames")
    teacher = build_teacher(TeacherConfig(kind="random", device=args.device, precision=args.precision))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "scans" / "scene7000_00"
        pack_seven_scenes(root / "scene7000_00.sens")
        teacher.encode(torch.zeros(2, 3, 224, 224, device=teacher.device))
        bare, full = [], []
        for _ in range(args.repeats):
            bare.append(bare_forward(root, teacher, args.images, args.batch))
            full.append(full_stage(root, Path(tmp) / "pairs.zarr", teacher, args.images, args.batch, args.threads))
    row = {
        "device": str(teacher.device),
        "precision": args.precision,
        "batch": args.batch,
        "images": args.images,
        "torch_threads": torch.get_num_threads(),
        "stage_threads": args.threads,
        "bare_images/s": args.images / min(bare),
        "full_stage_images/s": args.images / min(full),
        "ratio": min(bare) / min(full),
    }
    write_report(
        "teacher stage vs bare forward",
        [row],
        args.out,
        {"target": {"ratio": ">= 0.9"}, "runs_s": {"bare": bare, "full": full}},
    )


if __name__ == "__main__":
    main()
