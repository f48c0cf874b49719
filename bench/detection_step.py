"""Benchmark one ScanNet detection training step (forward + set loss + backward + AdamW) of pkd's 3DETR model on
the pre-trained encoder against a port of 3DETR's own model, fed the same points and boxes.

Cases:
  pkd        ``Detector`` of ``finetune scannet-det``: ball-query pre-encoder into the pre-trained mini-PointNet,
             the 12-block 384-wide ``PointEncoder``, 3DETR's projection, queries, decoder and heads
  3detr      3DETR's ScanNet model as ``models/model_3detr.py`` builds it (``main.py`` defaults): its own
             pre-encoder MLP [3, 64, 128, 256], a 3-layer pre-norm transformer encoder (width 256, 4 heads,
             FFN 128, ReLU, dropout 0.1; ``models/transformer.py``), then the same decoder and heads
  3detr-vit  the 3DETR port with its encoder at the pre-trained encoder's size (12 layers, 384, 6 heads, FFN
             1536): the ratio against ``pkd`` compares implementations, not model sizes

The pre-encoder, decoder and heads are pkd's modules (they are 3DETR's, ported once); what differs is the
encoder, so the ``3detr-vit`` ratio is the cost of pkd's encoder implementation against 3DETR's own at equal
size. bf16 autocast on CUDA, fp32 on CPU.

    python bench/detection_step.py --points 8192 --batch 2 --steps 2 --out bench/results/detection_cpu.json
    python bench/detection_step.py --device cuda --points 40000 --batch 8 --steps 20      # the paper's setting
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from pkd.common.scannet_annotations import DET_CLASSES
from pkd.train.downstream.detection_data import SampleConfig, collate, scene_sample
from pkd.train.downstream.detection_loss import SetCriterion
from pkd.train.downstream.detection_model import BallGroup, DetectionHead, Detector, SharedMLP
from pkd.train.encoder import EncoderConfig

from _report import write_report

CASES = ("pkd", "3detr", "3detr-vit")


class Port3DETR(nn.Module):
    """3DETR's ``Model3DETR`` with its vanilla encoder (``build_encoder``: ``TransformerEncoderLayer`` with
    ``normalize_before=True``; no positional embedding in the encoder)."""

    def __init__(self, dim: int, layers: int, heads: int, ffn: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.group = BallGroup(args.preenc, 0.2, 64)
        self.pre_encoder = SharedMLP([3, 64, 128, dim])
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = DetectionHead(dim, len(DET_CLASSES), args.queries, 8, 256, 4, 256, 0.1, 0.3, 1)

    def forward(self, points: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor) -> dict:
        groups, centres, _ = self.group(points[..., :3].contiguous(), None)
        return self.head(centres, self.encoder(self.pre_encoder(groups)), dims_min, dims_max)


def build(case: str, args: argparse.Namespace) -> nn.Module:
    if case == "pkd":
        encoder = EncoderConfig(num_group=args.preenc, group_size=64)
        return Detector(encoder, num_queries=args.queries, preenc_points=args.preenc)
    if case == "3detr":
        return Port3DETR(256, 3, 4, 128, args)
    return Port3DETR(384, 12, 6, 1536, args)


def batch(args: argparse.Namespace, device: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A synthetic room per scene: 60 000 points with 10 boxes of random classes."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(args.batch):
        low = rng.uniform([0, 0, 0], [5, 5, 1], (10, 3))
        boxes = np.concatenate([low, low + rng.uniform(0.3, 1.5, (10, 3))], axis=1).astype(np.float32)
        xyz = rng.uniform([0, 0, 0], [6, 6, 2.5], (60000, 3)).astype(np.float32)
        rgb = rng.integers(0, 256, (60000, 3), dtype=np.uint8)
        cfg = SampleConfig(num_points=args.points, use_random_cuboid=False)
        samples.append(scene_sample(xyz, rgb, boxes, rng.integers(0, 18, 10), rng, True, cfg))
    return collate(samples, device)


def time_case(case: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build(case, args).to(args.device)
    criterion = SetCriterion(len(DET_CLASSES)).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    inputs, targets = batch(args, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda"))
    times = []
    for step in range(args.warmup + args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        tic = time.perf_counter()
        with autocast:
            out = model(inputs["point_clouds"], inputs["point_cloud_dims_min"], inputs["point_cloud_dims_max"])
            loss = criterion(out, targets)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - tic)
    params = sum(p.numel() for p in model.parameters())
    return {"case": case, "step_s": statistics.median(times), "params_m": params / 1e6, "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=40000)
    parser.add_argument("--preenc", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [time_case(case, args) for case in args.cases.split(",")]
    base = {r["case"]: r["step_s"] for r in rows}
    for r in rows:
        r["vs_3detr_vit"] = r["step_s"] / base["3detr-vit"] if "3detr-vit" in base else None
    settings = {k: getattr(args, k) for k in ("device", "points", "preenc", "queries", "batch", "steps")}
    write_report("detection training step", rows, args.out, {"settings": settings})


if __name__ == "__main__":
    main()
