"""Benchmark one training step (forward + backward + AdamW) of the pkd student against a Point-MAE port.

Cases (each in its own subprocess, so peak memory is that case's alone):
  student        pkd ``distill`` student (the paper's head: an MLP on all 32 concept tokens), in-memory batches
  student-pooled the same student with ``--head pooled`` (mean+max pooled concepts), in-memory batches
  pointmae       faithful port of Point-MAE's encoder forward (manual attention, ``x = block(x + pos)``)
                 plus the same-size prefix head on mean+max pooled tokens, in-memory batches
  student-store  pkd ``distill`` student fed by ``StoreLoader`` from a synthetic store on disk
  finetune       pkd ``PointClassifier`` fine-tuning step (``--classes``: 15 as ``finetune scanobjectnn``, 40 as
                 ``finetune modelnet40``)
  finetune-pointmae  port of Point-MAE's ``PointTransformer`` (models/Point_MAE.py: cls token, blocks fed
                 ``x + pos``, head on [cls, max]); both take the same per-batch sampling (shuffle, FPS pool,
                 random subset, ScaleAndTranslate) so the ratio compares the models
  seg            pkd ``SceneSegmenter`` (``finetune scannet-seg``: the concat head, 20 classes, points + colours)
  seg-pointmae   the same head on a port of Point-MAE's encoder (``x = block(x + pos)``, blocks 3/7/11 normed:
                 segmentation/models/pt.py); both take the same random cloud (use --points 8192 --groups 256)

Both models use pkd's pure-torch FPS/kNN tokenizer (Point-MAE's is CUDA-only). Peak memory is the
``ru_maxrss`` growth during the timed loop on CPU, ``torch.cuda.max_memory_allocated`` on GPU. ``--compile``
gives every case the same treatment as ``pkd-train distill --compile on`` (``pkd.train.compiled``: the
forward ``torch.compile``d, static shapes); the compile happens in the untimed warm-up step.

    python bench/train_step.py --points 1024 --batch 8 --steps 3 --out bench/results/cpu.json
    python bench/train_step.py --points 2048 --groups 128 --cases finetune,finetune-pointmae   # ScanObjectNN
    python bench/train_step.py --points 1024 --classes 40 --cases finetune,finetune-pointmae   # ModelNet40
    python bench/train_step.py --points 8192 --groups 256 --cases seg,seg-pointmae            # ScanNet seg
    python bench/train_step.py --device cuda --compile --steps 20                              # compiled
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _store import store_factory
from torch import nn

from pkd.common.scannet_mesh import NUM_CLASSES
from pkd.train.augment import AugmentConfig, augment
from pkd.train.compiled import compile_forward
from pkd.train.downstream.classification import training_draw
from pkd.train.downstream.models import FeaturePropagation, PointClassifier, fetch_layers
from pkd.train.downstream.scannet_seg import SceneSegmenter
from pkd.train.encoder import EncoderConfig, init_weights, positional_embedding
from pkd.train.losses import LossSettings, compute_loss
from pkd.train.model import Student, StudentConfig
from pkd.train.tokenizer import Group

CASES = ("student", "student-pooled", "pointmae", "student-store")
FINETUNE_CASES = ("finetune", "finetune-pointmae")
SEG_CASES = ("seg", "seg-pointmae")
SCANOBJECTNN_CLASSES = 15


class PortEncoder(nn.Module):
    """Point-MAE's Encoder as written there: Conv1d on (BG, C, k), transposes, concat on channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, channels, 1)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, n, _ = groups.shape
        feature = self.first_conv(groups.reshape(b * g, n, 3).transpose(2, 1))
        glob = torch.max(feature, dim=2, keepdim=True)[0]
        feature = self.second_conv(torch.cat([glob.expand(-1, -1, n), feature], dim=1))
        return torch.max(feature, dim=2, keepdim=False)[0].reshape(b, g, self.channels)


class PortAttention(nn.Module):
    """Point-MAE's Attention: explicit softmax(q kᵀ · scale) v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class PortBlock(nn.Module):
    """Point-MAE's Block with timm's DropPath semantics."""

    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = PortAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0:
            return x
        keep = 1 - self.drop_path
        return x.div(keep) * x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class PointMAEPort(nn.Module):
    """Point-MAE's MaskTransformer (no masking) + a prefix head of the same size as pkd's no-concept head."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.group_divider = Group(cfg.num_group, cfg.group_size)
        self.encoder = PortEncoder(cfg.dim)
        self.pos_embed = positional_embedding(cfg.dim)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList([PortBlock(cfg.dim, cfg.heads, r) for r in rates])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Sequential(nn.Linear(2 * cfg.dim, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, 7680))
        self.apply(init_weights)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        patches, centres, _ = self.group_divider(points)
        x, pos = self.encoder(patches), self.pos_embed(centres)
        for block in self.blocks:
            x = block(x + pos)
        x = self.norm(x)
        return self.head(torch.cat([x.mean(1), x.max(1).values], -1)).reshape(-1, 10, 768)


class PointMAEClassifierPort(nn.Module):
    """Point-MAE's PointTransformer: cls token and position, blocks on ``x + pos``, norm, [cls, max] → head."""

    def __init__(self, dim: int, depth: int, heads: int, num_group: int, group_size: int, classes: int) -> None:
        super().__init__()
        self.group_divider = Group(num_group, group_size)
        self.encoder = PortEncoder(dim)
        self.pos_embed = positional_embedding(dim)
        self.cls_token, self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.randn(1, 1, dim))
        rates = torch.linspace(0, 0.1, depth).tolist()
        self.blocks = nn.ModuleList([PortBlock(dim, heads, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.cls_head_finetune = nn.Sequential(
            nn.Linear(2 * dim, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, classes),
        )

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        patches, centres, _ = self.group_divider(points)
        tokens = self.encoder(patches)
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres)], dim=1)
        for block in self.blocks:
            x = block(x + pos)
        x = self.norm(x)
        return self.cls_head_finetune(torch.cat([x[:, 0], x[:, 1:].max(1).values], dim=-1))


class PointMAESegPort(nn.Module):
    """Point-MAE's segmentation encoder (segmentation/models/pt.py: blocks on ``x + pos``, the normed outputs of
    blocks 3, 7 and 11) under pkd's ``scannet-seg`` head (concat propagation + xyz/rgb, two conv blocks)."""

    def __init__(self, dim: int, depth: int, heads: int, num_group: int, group_size: int, classes: int) -> None:
        super().__init__()
        self.group_divider = Group(num_group, group_size)
        self.encoder = PortEncoder(dim)
        self.pos_embed = positional_embedding(dim)
        rates = torch.linspace(0, 0.1, depth).tolist()
        self.blocks = nn.ModuleList([PortBlock(dim, heads, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.layers = fetch_layers(depth)
        self.propagation = FeaturePropagation(3 * 3 * dim + 6, [512, 256], gather="concat")
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv1d(256, classes, 1))
        self.apply(init_weights)

    def forward(self, points: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        patches, centres, _ = self.group_divider(points)
        x, pos, outputs = self.encoder(patches), self.pos_embed(centres), []
        for block in self.blocks:
            x = block(x + pos)
            outputs.append(x)
        tokens = torch.cat([self.norm(outputs[i]) for i in self.layers], dim=-1)
        skip = torch.cat([points, colors], dim=-1).transpose(1, 2)
        return self.classifier(self.propagation(points, centres, skip, tokens)).transpose(1, 2)


def finetune_model(case: str, args: argparse.Namespace) -> nn.Module:
    if case == "seg":
        return SceneSegmenter(NUM_CLASSES, EncoderConfig(num_group=args.groups))
    if case == "seg-pointmae":
        return PointMAESegPort(384, 12, 6, args.groups, 32, NUM_CLASSES)
    if case == "finetune":
        return PointClassifier(args.classes, EncoderConfig(num_group=args.groups))
    return PointMAEClassifierPort(384, 12, 6, args.groups, 32, args.classes)


def make_batches(n: int, batch: int, points: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "points": torch.randn(batch, points, 3, generator=g).to(device),
            "prefix": torch.randn(batch, 10, 768, generator=g).to(device),
        }
        for _ in range(n)
    ]


def run_case(case: str, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` steps after one warm-up step; returns samples/s, s/step and peak memory."""
    device = torch.device(args.device)
    cfg = StudentConfig(
        num_points=args.points,
        num_group=args.groups,
        head="pooled" if case == "student-pooled" else "flat",
        target_shape=(10, 768),  # the synthetic prefix its batches hold
    )
    settings = LossSettings.of(cfg)
    torch.manual_seed(0)
    if case in FINETUNE_CASES + SEG_CASES:
        model = finetune_model(case, args)
    else:
        model = PointMAEPort(cfg) if case == "pointmae" else Student(cfg)
    model = model.to(device).train()
    forward = compile_forward(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)

    if case == "student-store":
        from pkd.train.data import LoaderConfig, StoreLoader

        make_store = store_factory().make_store
        store = make_store(
            Path(args.tmp) / "bench.zarr",
            n=args.batch * (args.steps + 1),
            num_points=args.points,
            shard_size=args.batch * 2,
            patch_tokens=False,
            stats=False,
        )
        loader = StoreLoader(
            LoaderConfig(str(store), "train", ("points", "prefix"), args.batch, args.points), num_workers=args.workers
        )
        batches = iter(loader.epoch(0))
    else:
        batches = iter(make_batches(args.steps + 1, args.batch, args.points, device))

    labels = torch.arange(args.batch, device=device) % args.classes
    point_labels = torch.randint(0, NUM_CLASSES, (args.batch, args.points), generator=gen).to(device)

    def step_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if case in SEG_CASES:
            logits = forward(batch["points"], batch["points"].abs().clamp(max=1))  # stand-in colours in [0, 1]
            return F.cross_entropy(logits.reshape(-1, NUM_CLASSES), point_labels.reshape(-1))
        if case in FINETUNE_CASES:
            return F.cross_entropy(forward(training_draw(batch["points"], args.points, gen)), labels)
        batch["points"] = augment(batch["points"], AugmentConfig(), gen)
        if case == "pointmae":
            return F.mse_loss(forward(batch["points"]), batch["prefix"])
        return compute_loss(forward, batch, settings)[0]

    def step() -> None:
        loss = step_loss({k: v.to(device) for k, v in next(batches).items()})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(args.steps):
        tic, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - tic)
        cpu_times.append(time.process_time() - cpu)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    total_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": case,
        "step_seconds": times,
        "cpu_seconds": cpu_times,
        "peak_mib": peak,
        "max_rss_mib": total_rss,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def summarise(case: str, runs: list[dict], batch: int) -> dict:
    """Pool the step times of every round of a case: median and best s/step, samples/s from the median."""
    times = sorted(t for r in runs for t in r["step_seconds"])
    median = statistics.median(times)
    cpu = statistics.median(t for r in runs for t in r["cpu_seconds"])
    return {
        "case": case,
        "s_per_step": median,
        "best_s_per_step": times[0],
        "cpu_s_per_step": cpu,
        "samples_per_s": batch / median,
        "peak_mib": max(r["peak_mib"] for r in runs),
        "max_rss_mib": max(r["max_rss_mib"] for r in runs),
        "params_m": runs[0]["params_m"],
        "step_seconds": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--groups", type=int, default=64, help="patches per cloud (ScanObjectNN fine-tuning: 128)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="cases run interleaved this many times (noisy hosts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the store-fed case")
    parser.add_argument(
        "--classes", type=int, default=SCANOBJECTNN_CLASSES, help="fine-tuning classes (ModelNet40: 40)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every case's forward (as --compile on)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return

    cases = args.cases.split(",")
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for _, case in ((r, c) for r in range(args.rounds) for c in cases):
            cmd = [
                sys.executable,
                __file__,
                "--case",
                case,
                "--tmp",
                tmp,
                "--points",
                str(args.points),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
                "--groups",
                str(args.groups),
                "--workers",
                str(args.workers),
                "--classes",
                str(args.classes),
                *(["--compile"] if args.compile else []),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                sys.exit(f"case {case} failed:\n{done.stderr}")
            runs[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [summarise(case, runs[case], args.batch) for case in cases]
    by = {r["case"]: r for r in rows}
    ratios = {}
    if "student" in by and "pointmae" in by:
        ratios["student_time_vs_pointmae"] = by["student"]["s_per_step"] / by["pointmae"]["s_per_step"]
        ratios["student_time_vs_pointmae_best"] = by["student"]["best_s_per_step"] / by["pointmae"]["best_s_per_step"]
        ratios["student_cpu_vs_pointmae"] = by["student"]["cpu_s_per_step"] / by["pointmae"]["cpu_s_per_step"]
    if "student" in by and "student-pooled" in by:
        ratios["flat_head_vs_pooled_head"] = by["student"]["s_per_step"] / by["student-pooled"]["s_per_step"]
    if "student" in by and "student-store" in by:
        ratios["store_fed_vs_in_memory"] = by["student-store"]["samples_per_s"] / by["student"]["samples_per_s"]
    if set(SEG_CASES) <= set(by):
        ratios["seg_time_vs_pointmae"] = by["seg"]["s_per_step"] / by["seg-pointmae"]["s_per_step"]
        ratios["seg_time_vs_pointmae_best"] = by["seg"]["best_s_per_step"] / by["seg-pointmae"]["best_s_per_step"]
    if set(FINETUNE_CASES) <= set(by):
        ratios["finetune_time_vs_pointmae"] = by["finetune"]["s_per_step"] / by["finetune-pointmae"]["s_per_step"]
        ratios["finetune_time_vs_pointmae_best"] = (
            by["finetune"]["best_s_per_step"] / by["finetune-pointmae"]["best_s_per_step"]
        )
    result = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "points": args.points,
        "groups": args.groups,
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "workers": args.workers,
        "classes": args.classes,
        "compile": args.compile,
        "rows": rows,
        **ratios,
    }
    print(
        f"device={args.device} points={args.points} batch={args.batch} steps={args.steps}x{args.rounds} rounds "
        f"compile={'on' if args.compile else 'off'}"
    )
    print(
        f"{'case':<14} {'s/step med':>10} {'s/step best':>11} {'cpu s/step':>10} {'samples/s':>10} {'peak MiB':>9} "
        f"{'params M':>9}"
    )
    for r in rows:
        print(
            f"{r['case']:<14} {r['s_per_step']:>10.3f} {r['best_s_per_step']:>11.3f} {r['cpu_s_per_step']:>10.3f} "
            f"{r['samples_per_s']:>10.2f} "
            f"{r['peak_mib']:>9.0f} {r['params_m']:>9.2f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
