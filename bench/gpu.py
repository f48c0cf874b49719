"""The GPU check of pkd, one table: teacher precision, whole prep against the teacher, train steps in bf16.

Rows (every model is built with seeded random weights: the real teacher's and student's compute):
* teacher fp32 / bf16 / fp16: ``Teacher.encode`` on the demo scene's frames, transformed and batched
  beforehand (the bare forward), images/s against fp32; agreement of the prefix with fp32 (worst cosine
  over samples, largest error relative to the fp32 prefix's largest magnitude), beside the error that
  storing the fp32 prefix as float16 makes anyway;
* prep: the whole ``run_prep`` (teacher build, plan, read, decode, geometry, teacher, write, finalize) on
  the demo scene, every frame, frames/s against the teacher-only limit (the fp32 bare forward above);
* train step distill, fine-tune (ModelNet40 size) and ScanNet segmentation steps, bf16 autocast: the pkd
  student (distill head), ``PointClassifier`` and ``SceneSegmenter`` against bench/train_step.py's ports of
  Point-MAE (``PointMAEPort`` with the same prefix head, ``PointMAEClassifierPort``, ``PointMAESegPort``
  under the same segmentation head), s/step (forward, backward, AdamW), peak GPU memory; then both
  again with the forward ``torch.compile``d (``pkd.train.compiled.compile_forward``, what ``pkd-train distill
  --compile on`` trains with; CUDA only: inductor's CPU build costs minutes), the compile in the warm-up
  steps and its time in the notes. Issue 24's goal: the compiled distill step <= 15 ms on an H100, at
  most the compiled port's time.

    bash bench/gpu.sh --out bench/results/gpu.json           # on the GPU machine (installs carried wheels)
    python bench/gpu.py --device cpu --quick --out /tmp/gpu.json   # CPU-safe parts at tiny sizes (tests)

The JSON and its table (``gpu.md``) are rewritten after every row, so a run stopped by gpu.sh's time limit
keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from train_step import PointMAEClassifierPort, PointMAEPort, PointMAESegPort

from pkd.common.scannet_mesh import NUM_CLASSES
from pkd.preprocess.demo import write_demo_scene
from pkd.preprocess.frame_sample import GeometryConfig
from pkd.preprocess.frames import decode_color
from pkd.preprocess.prep import PrepConfig, RunOptions, run_prep
from pkd.preprocess.scenes import find_scenes, open_scene
from pkd.preprocess.teacher import Teacher, TeacherConfig, build_teacher
from pkd.train.compiled import compile_forward
from pkd.train.downstream.models import PointClassifier
from pkd.train.downstream.scannet_seg import SceneSegmenter
from pkd.train.encoder import EncoderConfig
from pkd.train.model import Student, StudentConfig

PREFIX = (10, 768)  # the sample shape of the ClipCap prefix the rows regress (a ViT-B/32 ClipCap's)


@dataclass(frozen=True)
class Sizes:
    """How much work each row does: the GPU sizes, or tiny ones for a CPU smoke run (``--quick``)."""

    frames: int = 300
    teacher_batch: int = 64
    prep_points: int = 4096
    train: StudentConfig = StudentConfig(target_shape=PREFIX)
    train_batch: int = 32
    finetune_points: int = 1024
    classes: int = 40
    seg_points: int = 8192  # finetune scannet-seg's column
    seg_groups: int = 256
    seg_batch: int = 8
    steps: int = 20
    warmup: int = 3


QUICK = Sizes(
    frames=4,
    teacher_batch=2,
    prep_points=1024,
    train_batch=2,
    finetune_points=256,
    classes=4,
    seg_points=256,
    seg_groups=8,
    seg_batch=2,
    steps=1,
    warmup=1,
    train=StudentConfig(
        num_points=256,
        num_group=16,
        group_size=8,
        dim=48,
        depth=2,
        heads=2,
        num_concepts=4,
        head_hidden=32,
        target_shape=PREFIX,
    ),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(name: str, log: dict[str, float]) -> contextlib.AbstractContextManager[None]:
    """Time a section into ``log[name]`` and say so on the console (every step of the check is timed)."""

    @contextlib.contextmanager
    def section() -> Iterator[None]:
        print(f"-- {name} ...", flush=True)
        start = time.perf_counter()
        yield
        log[name] = time.perf_counter() - start
        print(f"-- {name}: {log[name]:.1f} s", flush=True)

    return section()


# ---- teacher ----------------------------------------------------------------------------------------------


def transformed_frames(scene_root: Path, teacher: Teacher, batch: int) -> list[torch.Tensor]:
    """The demo scene's colour frames through the teacher's transform, in batches (CPU tensors)."""
    (entry,) = find_scenes(scene_root)
    with open_scene(entry) as reader:
        images = [teacher.transform(Image.fromarray(decode_color(raw))) for raw in reader.read(reader.frame_numbers())]
    return [torch.stack(images[i : i + batch]) for i in range(0, len(images), batch)]


def encode_all(teacher: Teacher, batches: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Prefixes of every batch (float32, CPU) and the seconds of the forward passes alone."""
    inputs = [b.to(teacher.device) for b in batches]
    teacher.encode(inputs[0])
    sync(teacher.device)
    start = time.perf_counter()
    outputs = [teacher.encode(x).prefix for x in inputs]
    sync(teacher.device)
    seconds = time.perf_counter() - start
    return torch.cat([o.float().cpu() for o in outputs]), seconds


def agreement(prefix: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Worst per-sample cosine and largest error relative to the reference's largest magnitude."""
    a, b = prefix.flatten(1), reference.flatten(1)
    return {
        "min_cosine": float(F.cosine_similarity(a, b, dim=1).min()),
        "max_rel_error": float((a - b).abs().max() / b.abs().max()),
    }


def teacher_rows(scene_root: Path, device: torch.device, sizes: Sizes) -> list[dict]:
    """One teacher (fp32 weights), run under each autocast precision on the same batches."""
    teacher = build_teacher(TeacherConfig(kind="random", device=str(device), seed=0))
    batches = transformed_frames(scene_root, teacher, sizes.teacher_batch)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    results = {p: encode_all(dataclasses.replace(teacher, precision=p), batches) for p in precisions}
    reference, fp32_s = results["fp32"]
    storage = agreement(reference.half().float(), reference)["max_rel_error"]
    rows = [
        {
            "stage": f"teacher {p} bare forward",
            "images": len(prefix),
            "batch": sizes.teacher_batch,
            "images_per_s": len(prefix) / seconds,
            "peer": "fp32",
            "peer_images_per_s": len(prefix) / fp32_s,
            "ratio": fp32_s / seconds,
            **agreement(prefix, reference),
            "float16_storage_rel_error": storage,
        }
        for p, (prefix, seconds) in results.items()
    ]
    if device.type != "cuda":
        rows.append({"stage": "teacher fp16 bare forward", "skipped": "fp16 needs CUDA"})
    return rows


# ---- whole prep -------------------------------------------------------------------------------------------


def prep_row(
    scene_root: Path, out: Path, device: torch.device, sizes: Sizes, threads: int, teacher_limit: float
) -> dict:
    """The whole prep of the demo scene, every frame, against the fp32 teacher-only limit."""
    cfg = PrepConfig(
        root=str(scene_root), frame_skip=1, shard_size=128, geometry=GeometryConfig(num_points=sizes.prep_points)
    )
    start = time.perf_counter()
    summary = run_prep(
        cfg,
        str(out),
        TeacherConfig(kind="random", device=str(device)),
        RunOptions(teacher_batch=sizes.teacher_batch, threads=threads, progress=False),
    )
    seconds = time.perf_counter() - start
    frames = summary["train"]["samples"]
    return {
        "stage": f"whole pkd-prep, demo scene ({sizes.prep_points} pts, fp32 teacher, {threads} threads)",
        "frames": frames,
        "seconds": seconds,
        "frames_per_s": frames / seconds,
        "peer": "teacher-only limit",
        "peer_images_per_s": teacher_limit,
        "ratio": frames / seconds / teacher_limit,
    }


# ---- train steps ------------------------------------------------------------------------------------------


def step_seconds(
    model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], device: torch.device, sizes: Sizes
) -> tuple[float, float | None, float]:
    """Median seconds of a bf16-autocast training step (forward, backward, AdamW), peak GPU memory in MiB and
    the seconds of the warm-up steps (a compiled model compiles there)."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began, warmup_s = time.perf_counter(), 0.0
    for i in range(sizes.warmup + sizes.steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= sizes.warmup:
            times.append(time.perf_counter() - start)
        elif i == sizes.warmup - 1:
            warmup_s = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak, warmup_s


def train_rows(device: torch.device, sizes: Sizes) -> Iterator[dict]:
    """The step rows, eager cases first, then the same cases compiled (on CUDA only)."""
    cfg, gen = sizes.train, torch.Generator().manual_seed(0)
    points = torch.randn(sizes.train_batch, cfg.num_points, 3, generator=gen).to(device)
    prefix = torch.randn(sizes.train_batch, 10, 768, generator=gen).to(device)
    shapes = torch.randn(sizes.train_batch, sizes.finetune_points, 3, generator=gen).to(device)
    labels = torch.randint(0, sizes.classes, (sizes.train_batch,), generator=gen).to(device)
    scene = torch.randn(sizes.seg_batch, sizes.seg_points, 3, generator=gen).to(device)
    colors = torch.rand(sizes.seg_batch, sizes.seg_points, 3, generator=gen).to(device)
    point_labels = torch.randint(0, NUM_CLASSES, (sizes.seg_batch * sizes.seg_points,), generator=gen).to(device)
    seg_cfg = EncoderConfig(  # segmentation reads three blocks: at least 3 deep
        dim=cfg.dim, depth=max(3, cfg.depth), heads=cfg.heads, num_group=sizes.seg_groups, group_size=cfg.group_size
    )
    torch.manual_seed(0)

    def seg_loss(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(scene, colors).float().reshape(-1, NUM_CLASSES), point_labels)

    cases = {
        "distill": (
            lambda m: F.mse_loss(m(points).pred.float(), prefix),
            Student(cfg),
            lambda m: F.mse_loss(m(points).float(), prefix),
            PointMAEPort(cfg),
            f"{cfg.num_points} pts, batch {sizes.train_batch}",
        ),
        "fine-tune": (
            lambda m: F.cross_entropy(m(shapes).float(), labels),
            PointClassifier(sizes.classes, cfg),
            lambda m: F.cross_entropy(m(shapes).float(), labels),
            PointMAEClassifierPort(cfg.dim, cfg.depth, cfg.heads, cfg.num_group, cfg.group_size, sizes.classes),
            f"{sizes.finetune_points} pts, batch {sizes.train_batch}",
        ),
        "scannet-seg": (
            seg_loss,
            SceneSegmenter(NUM_CLASSES, seg_cfg),
            seg_loss,
            PointMAESegPort(
                seg_cfg.dim, seg_cfg.depth, seg_cfg.heads, seg_cfg.num_group, seg_cfg.group_size, NUM_CLASSES
            ),
            f"{sizes.seg_points} pts, {sizes.seg_groups} groups, batch {sizes.seg_batch}",
        ),
    }
    for (name, (loss, model, port_loss, port, size)), compiled in (
        (case, compiled) for compiled in (False, True) for case in cases.items()
    ):
        stage = f"{name} step bf16{' compiled' if compiled else ''} ({size})"
        if compiled and device.type != "cuda":
            yield {"stage": stage, "skipped": "compiled on CUDA only (inductor's CPU build costs minutes)"}
            continue
        pkd_s, pkd_mib, pkd_warmup = step_seconds(compile_forward(model) if compiled else model, loss, device, sizes)
        port_s, port_mib, port_warmup = step_seconds(
            compile_forward(port) if compiled else port, port_loss, device, sizes
        )
        yield (
            {
                "stage": stage,
                "s_per_step": pkd_s,
                "peak_mib": pkd_mib,
                "peer": f"Point-MAE port{' compiled' if compiled else ''}",
                "peer_s_per_step": port_s,
                "peer_peak_mib": port_mib,
                "ratio": pkd_s / port_s,
                "warmup_s": pkd_warmup,
                "peer_warmup_s": port_warmup,
            }
        )


# ---- report -----------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(ImportError):
        import fpsample

        info["fpsample"] = getattr(fpsample, "__version__", "unknown")
    return info


def table(rows: list[dict]) -> str:
    """One markdown table: stage, figure, peer, ratio, agreement or memory."""
    lines = ["| stage | figure | limit or peer | ratio | notes |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['stage']} | skipped | - | - | {r['skipped']} |")
        elif "s_per_step" in r:
            memory = (
                f"peak {r['peak_mib']:.0f} MiB vs {r['peer_peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "-"
            )
            memory += f"; warm-up {r['warmup_s']:.1f} s vs {r['peer_warmup_s']:.1f} s"
            lines.append(
                f"| {r['stage']} | {r['s_per_step'] * 1e3:.1f} ms/step | {r['peer']} "
                f"{r['peer_s_per_step'] * 1e3:.1f} ms/step | {r['ratio']:.2f} (time, <= 1.0 is faster) | "
                f"{memory} |"
            )
        elif "frames_per_s" in r:
            lines.append(
                f"| {r['stage']} | {r['frames_per_s']:.1f} frames/s ({r['frames']} in {r['seconds']:.1f} s) "
                f"| {r['peer']} {r['peer_images_per_s']:.1f} img/s | {r['ratio']:.2f} | incl. teacher build |"
            )
        else:
            lines.append(
                f"| {r['stage']} (batch {r['batch']}) | {r['images_per_s']:.1f} img/s | {r['peer']} "
                f"{r['peer_images_per_s']:.1f} img/s | {r['ratio']:.2f} | min cosine {r['min_cosine']:.5f}, "
                f"max rel error {r['max_rel_error']:.2e} (float16 storage: "
                f"{r['float16_storage_rel_error']:.2e}) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every row on any device")
    parser.add_argument("--threads", type=int, default=8, help="decode/geometry threads of the prep row")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; pass --device cpu for the CPU-safe parts")
    sizes = QUICK if args.quick else Sizes()
    steps: dict[str, float] = {}
    rows: list[dict] = []
    result = {"machine": machine(device), "quick": args.quick, "sizes": repr(sizes), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        """Rewrite the JSON and the table with the rows so far; the table."""
        args.out.write_text(json.dumps({**result, "section_seconds": steps}, indent=2) + "\n")
        report = f"{table(rows)}\n\nMeasured on: {json.dumps(result['machine'])}\n"
        args.out.with_suffix(".md").write_text(report)  # the section bench/results_gpu.md takes, card named
        return report

    with tempfile.TemporaryDirectory() as tmp:
        with timed("demo scene", steps):
            scene = write_demo_scene(Path(tmp) / "demo", num_frames=sizes.frames, layout="sens")
        with timed("teacher precisions", steps):
            rows += teacher_rows(scene, device, sizes)
        write()
        with timed("whole prep", steps):
            rows.append(prep_row(scene, Path(tmp) / "pairs.zarr", device, sizes, args.threads, rows[0]["images_per_s"]))
        write()
        with timed("train steps", steps):
            for row in train_rows(device, sizes):
                rows.append(row)
                write()
    print(f"\n{write()}\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
