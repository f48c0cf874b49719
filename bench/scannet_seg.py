"""Benchmark ScanNet segmentation fine-tuning: one training step, and the mesh cache against parsing PLYs.

Data: the demo room's labelled mesh at ``--spacing`` (0.03 m gives ~140k vertices and ~280k faces, the size
of a typical ScanNet ``_vh_clean_2.ply``), written to a temporary ScanNet tree.

  step   one fine-tuning step of the full model (384-d, 12 blocks, 6 heads; 8192 points, 256 groups of 32):
         column sampling + augmentation + forward + backward + the config's optimizer (Adam by default), through
         ``ScanNetSegTask.loss``; ``--head concat|interp`` picks the head (default the paper's concat)
  read   one scene's vertices/colours/labels read back from the Zarr cache, against parsing its two PLYs
         with pkd's reader (plyfile told that faces are triangles, so it memory-maps them: the cache builder's
         path) and with plyfile's generic parse (face lists parsed one by one, what most ScanNet loaders do);
         ratios = PLY time / cache time (how much faster a cached epoch reads)

    python bench/scannet_seg.py --batch 2 --steps 2 --out bench/results/scannet_seg.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData

from pkd.common.scannet_mesh import read_scene, scene_files
from pkd.common.seg_cache import build_cache, load_scene, open_cache
from pkd.preprocess.demo import BOXES, ROOM, SPHERE
from pkd.preprocess.demo_mesh import write_demo_mesh, write_demo_splits
from pkd.train.downstream.config import FinetuneConfig
from pkd.train.downstream.scannet_seg import ScanNetSegTask

from _report import write_report

SCENE = "scene9000_00"


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def bench_read(root: Path, cache: Path, repeats: int) -> dict:
    files = scene_files(root / "scans" / SCENE)
    vertices = len(read_scene(*files).xyz)
    cached = open_cache(cache)
    ply_s = _timed(lambda: read_scene(*files), repeats)
    generic_s = _timed(lambda: [PlyData.read(str(f))["vertex"].data.copy() for f in files], 1)
    cache_s = _timed(lambda: load_scene(cached, SCENE), repeats)
    return {
        "case": "read",
        "vertices": vertices,
        "cache_s": cache_s,
        "ply_s": ply_s,
        "generic_ply_s": generic_s,
        "cache_scenes/s": 1 / cache_s,
        "ratio": ply_s / cache_s,
        "ratio_generic": generic_s / cache_s,
    }


def bench_step(root: Path, cache_dir: Path, args: argparse.Namespace) -> dict:
    cfg = FinetuneConfig.for_task(
        "scannet-seg",
        root,
        splits=str(root / "splits"),
        cache_dir=str(cache_dir),
        batch_size=args.batch,
        device=args.device,
        head=args.head,
    )
    task = ScanNetSegTask(cfg)
    model = task.model.train()
    optimizer = cfg.build_optimizer(model)
    batch = np.zeros(args.batch, dtype=np.int64)  # the one scene, args.batch random columns of it
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = task.loss(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up
    seconds = _timed(step, args.steps)
    return {
        "case": "step",
        "device": cfg.device,
        "points": cfg.num_points,
        "groups": cfg.num_group,
        "batch": args.batch,
        "head": args.head,
        "s_per_step": seconds,
        "samples_per_s": args.batch / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=0.03, help="demo mesh vertex spacing (m)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="timed reads of each kind")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--head", default="concat", help="concat (the paper's) or interp")
    parser.add_argument("--cases", default="read,step", help="comma-separated: read, step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "scannet"
        (root / "scans" / SCENE).mkdir(parents=True)
        write_demo_mesh(root / "scans" / SCENE, ROOM, BOXES, SPHERE, spacing=args.spacing)
        write_demo_splits(root, SCENE)
        build_cache(root, Path(tmp) / "cache" / "scannet_seg.zarr", [SCENE], progress=False)
        cases = args.cases.split(",")
        rows = [bench_read(root, Path(tmp) / "cache" / "scannet_seg.zarr", args.repeats)] if "read" in cases else []
        rows += [bench_step(root, Path(tmp) / "cache", args)] if "step" in cases else []
    write_report("scannet_seg", rows, args.out, {"threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
