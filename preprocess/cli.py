"""`pkd-prep`: turn ScanNet RGB-D sequences into a pair store, and inspect stores."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from pkd.common import lock, logs
from pkd.common.cli import run_app
from pkd.common.errors import ConfigError, StoreError
from pkd.common.seg_cache import is_seg_cache, verify_cache
from pkd.common.verify import store_info, verify_store
from pkd.preprocess.frame_sample import GeometryConfig

app = typer.Typer(
    help="Pay for the teacher once: ScanNet frames -> (point cloud, ClipCap target) pairs in a Zarr store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(logs.cli_options)

CLIP_FILE, CLIPCAP_FILE = "ViT-B-32.pt", "conceptual_weights.pt"
MAX_POINTS = 65536  # points per sample: bounds memory (points × shard size) and stays below a depth frame's pixels

Store = Annotated[str, typer.Argument(help="Pair store path.")]
Split = Annotated[str, typer.Option(help="Split of the store.")]
Index = Annotated[int, typer.Option(help="Sample index within the split.")]

# The teacher and run options shared by `scannet` and `teacher`: (name, annotation, default).
TEACHER_OPTIONS = (
    ("teacher", Annotated[str, typer.Option(help="clipcap (real weights) | random (seeded, tests/demos).")],
     "clipcap"),
    ("clip_weights", Annotated[str | None, typer.Option(help="OpenAI ViT-B-32.pt or open_clip state dict; "
                                                                "'openai' downloads.")], None),
    ("clipcap_weights", Annotated[str | None, typer.Option(help="ClipCap conceptual_weights.pt (MLP mapper).")],
     None),
    ("weights_dir", Annotated[Path | None, typer.Option(help=f"Folder holding {CLIP_FILE} and {CLIPCAP_FILE}.")],
     None),
    ("device", Annotated[str, typer.Option(help="cpu | cuda (teacher device).")], "cpu"),
    ("precision", Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (half precisions on cuda only).")], "fp32"),
    ("patch_tokens", Annotated[bool, typer.Option(help="Also cache CLIP's 7x7 patch tokens (local ablation).")],
     False),
    ("teacher_batch", Annotated[int, typer.Option(help="Images per teacher forward.")], 32),
    ("threads", Annotated[int, typer.Option(help="Decode/geometry threads running beside the teacher.")], 2),
    ("workers", Annotated[int, typer.Option(help="Start a local dask.distributed cluster of N worker processes "
                                                 "(0: run in this process).")], 0),
    ("scheduler", Annotated[str | None, typer.Option(help="Address of an existing dask scheduler "
                                                             "(tcp://host:8786); one task per shard.")], None),
    ("progress", Annotated[bool, typer.Option(help="Show progress bars.")], True),
)


@dataclass(frozen=True)
class TeacherArgs:
    """The parsed TEACHER_OPTIONS of a command."""

    teacher: str
    clip_weights: str | None
    clipcap_weights: str | None
    weights_dir: Path | None
    device: str
    precision: str
    patch_tokens: bool
    teacher_batch: int
    threads: int
    workers: int
    scheduler: str | None
    progress: bool

    def config(self, seed: int):
        """The TeacherConfig these options describe (a random teacher uses ``seed``)."""
        from pkd.preprocess.teacher import TeacherConfig

        if self.teacher not in ("clipcap", "random"):
            raise ConfigError(f"--teacher {self.teacher!r}: choose 'clipcap' (real weights) or 'random' (tests, "
                              "demos).")
        _check_positive(teacher_batch=self.teacher_batch, threads=self.threads)
        clip, clipcap = self.clip_weights, self.clipcap_weights
        if self.weights_dir is not None:
            clip = clip or str(self.weights_dir / CLIP_FILE)
            clipcap = clipcap or str(self.weights_dir / CLIPCAP_FILE)
        return TeacherConfig(kind=self.teacher, clip_weights=clip, clipcap_weights=clipcap, device=self.device,
                             precision=self.precision, seed=seed, patch_tokens=self.patch_tokens)

    def options(self, overwrite: bool = False):
        """How to run: batching, threads, dask, progress."""
        from pkd.preprocess.prep import RunOptions

        return RunOptions(self.teacher_batch, self.threads, self.workers, self.scheduler, overwrite, self.progress)


def with_teacher_options(command: Callable) -> Callable:
    """Give a command the TEACHER_OPTIONS; it receives them as one TeacherArgs keyword ``run``."""
    signature = inspect.signature(command, eval_str=True)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in TEACHER_OPTIONS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        run = TeacherArgs(**{name: kwargs.pop(name) for name, _, _ in TEACHER_OPTIONS})
        return command(run=run, **kwargs)

    new_signature = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "run"] + extra)
    wrapper.__signature__ = new_signature  # type: ignore[attr-defined]  # typer reads the signature
    wrapper.__annotations__ = {p.name: p.annotation for p in new_signature.parameters.values()}
    return wrapper


@app.command()
@with_teacher_options
def scannet(
    root: Annotated[Path, typer.Option(help="ScanNet tree (with scans/, scans_test/) or a single scene folder.")],
    out: Annotated[str, typer.Option(help="Store path or fsspec URL (e.g. pairs.zarr, s3://bucket/pairs.zarr).")],
    split: Annotated[str, typer.Option(help="train | val | test | all (official ScanNet v2 lists).")] = "all",
    scenes: Annotated[str | None, typer.Option(help="Comma-separated scene names to keep.")] = None,
    source: Annotated[str, typer.Option(help="auto (prefer .sens) | sens | exported.")] = "auto",
    frame_skip: Annotated[int, typer.Option(help="Keep frames numbered 0, N, 2N, ...")] = 25,
    limit: Annotated[int | None, typer.Option(help="At most this many frames per split (quick runs).")] = None,
    points: Annotated[int, typer.Option(help="Points per sample.")] = 4096,
    sampling: Annotated[str, typer.Option(help="fps (farthest point) | random.")] = "fps",
    shard_size: Annotated[int, typer.Option(help="Samples per Zarr shard (unit of writing and resuming).")] = 512,
    seed: Annotated[int, typer.Option(help="Global seed; every sample's seed derives from (seed, scene, frame).")] = 0,
    depth_scale: Annotated[float | None, typer.Option(
        help="Depth units per metre of exported depth PNGs (default 1000: millimetres, as ScanNet, 7-Scenes, "
             "Redwood; TUM RGB-D: 5000). .sens files record their own.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing store written with other arguments (the new one is built beside it as "
             "OUT.overwrite and swapped in only once complete).")] = False,
    *,
    run: TeacherArgs,
) -> None:
    """Read ScanNet (.sens or exported frames), back-project every 25th frame and cache teacher targets.

    Rerunning the same command resumes an interrupted run; other arguments on an existing store are refused.
    """
    from pkd.preprocess.prep import PrepConfig, run_prep

    cfg = PrepConfig(
        root=str(root.resolve()), split=split, scenes=tuple(scenes.split(",")) if scenes else None, source=source,
        frame_skip=frame_skip, limit=limit, shard_size=shard_size, seed=seed,
        geometry=GeometryConfig(num_points=points, sampling=sampling, min_valid_pixels=points),
        depth_scale=depth_scale,
    )
    _check_positive(frame_skip=frame_skip, points=points, shard_size=shard_size)
    if limit is not None:
        _check_positive(limit=limit)
    if points > MAX_POINTS:
        raise ConfigError(f"--points {points} is above {MAX_POINTS}: a sample needs that many valid depth pixels (a "
                          "ScanNet depth frame has 307,200) and memory grows with --points × --shard-size. Pass at "
                          f"most {MAX_POINTS} (the paper uses 4096).")
    if sampling not in ("fps", "random"):
        raise ConfigError(f"--sampling {sampling!r}: choose 'fps' or 'random'.")
    if depth_scale is not None and not depth_scale > 0:
        raise ConfigError(f"--depth-scale must be positive (depth units per metre, 1000 for millimetres), got "
                          f"{depth_scale}.")
    summary = run_prep(cfg, out, run.config(seed), run.options(overwrite))
    for name, s in summary.items():
        typer.echo(f"{name}: {s['valid']} valid of {s['samples']} planned samples, skipped {s['skipped'] or 'none'}")
    typer.echo(f"wrote {out}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


@app.command("demo-scene")
def demo_scene(
    out: Annotated[Path, typer.Option(help="Folder to write a ScanNet-format tree into (out/scans/<scene>).")],
    frames: Annotated[int, typer.Option(help="Frames in the sequence.")] = 250,
    layout: Annotated[str, typer.Option(help="both | sens | exported.")] = "both",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic room.")] = 0,
) -> None:
    """Write a small synthetic scene in real ScanNet format (a .sens file and/or exported frames)."""
    from pkd.preprocess.demo import write_demo_scene

    typer.echo(f"wrote {write_demo_scene(out, num_frames=frames, layout=layout, seed=seed)}")


@app.command("scannet-seg")
def scannet_seg(
    root: Annotated[Path, typer.Option(help="ScanNet tree with scans/<scene>/<scene>_vh_clean_2[.labels].ply.")],
    out: Annotated[Path, typer.Option(help="Cache to create or complete (e.g. seg.zarr).")],
    split: Annotated[str, typer.Option(help="train | val | all (train and val: the scenes with labels).")] = "all",
    splits: Annotated[Path | None, typer.Option(help="Folder with scannetv2_train/val.txt (default: official).")]
    = None,
    allow_missing: Annotated[bool, typer.Option(help="Skip listed scenes whose PLYs are absent.")] = False,
) -> None:
    """Parse the labelled ScanNet meshes once into a Zarr cache for `pkd-train finetune scannet-seg`.

    Rerunning resumes (scenes already cached are kept); `pkd-prep verify OUT` checks every checksum.
    """
    from pkd.common.scannet_mesh import split_scenes
    from pkd.common.seg_cache import build_cache

    if split not in ("train", "val", "all"):
        raise ConfigError(f"--split {split!r}: choose train, val or all.")
    names = [n for s in (("train", "val") if split == "all" else (split,)) for n in split_scenes(s, splits)]
    with lock.exclusive(out, "pkd-prep scannet-seg", StoreError):
        summary = build_cache(root, out, names, allow_missing=allow_missing)
    typer.echo(f"{out}: {summary['written']} scenes written, {summary['kept']} already cached"
               + (f", {len(summary['missing'])} missing" if summary["missing"] else ""))


@app.command()
def info(
    store: Store,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Splits, counts, scenes, skipped frames, teacher identity and size of a store."""
    report = store_info(store)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    teacher = report["teacher"] or {}
    typer.echo(f"{report['path']}  status={report['status']}  size={(report['bytes'] or 0) / 2**20:.1f} MiB")
    typer.echo(f"teacher: {teacher.get('clip_model')} + {teacher.get('mapper')}  random={teacher.get('random')}  "
               f"precision={teacher.get('precision')}")
    if teacher.get("random"):
        typer.echo("WARNING: this store's targets come from a RANDOM teacher (tests/demos only).")
    prep = report["prep"] or {}
    geometry = prep.get("geometry", {})
    typer.echo(f"prep: {prep.get('root')} (split {prep.get('split')}, source {prep.get('source')}), frame skip "
               f"{prep.get('frame_skip')}, limit {prep.get('limit')}, {geometry.get('num_points')} points "
               f"({geometry.get('sampling')}), depth {geometry.get('min_depth')}-{geometry.get('max_depth')} m, "
               f"depth scale {prep.get('depth_scale') or 'default (exported frames: 1000, .sens: its header)'}, "
               f"seed {prep.get('seed')}, shard size {prep.get('shard_size')}")
    for name, s in report["splits"].items():
        typer.echo(f"{name}: {s['samples']} samples ({s['valid']} valid), {s['scenes']} scenes, "
                   f"{s['shards']} shards (done {s['shards_done']}), skipped {s['skipped'] or 'none'}")


@app.command()
def verify(store: Store) -> None:
    """Check every shard (done, shapes, dtypes, checksums, no NaN/inf, attrs); exit 1 on any fault.

    Also checks a ScanNet segmentation cache (`pkd-prep scannet-seg`) scene by scene."""
    faults = verify_cache(store) if is_seg_cache(store) else verify_store(store)
    for fault in faults:
        typer.echo(f"FAULT {fault}", err=True)
    if faults:
        raise typer.Exit(1)
    typer.echo(f"{store}: OK")


@app.command()
def upgrade(store: Store) -> None:
    """Rewrite an older pkd-pairs store's attrs at this pkd's store version (arrays are unchanged).

    Reading needs no upgrade (older stores are upgraded in memory); resuming a prep upgrades them too.
    """
    from pkd.common.store import VERSION
    from pkd.common.store import upgrade as upgrade_store
    from pkd.preprocess.prep import store_lock

    with store_lock(store):
        old = upgrade_store(store)
    typer.echo(f"{store}: version {old} -> {VERSION}" if old != VERSION else f"{store}: already version {VERSION}")


@app.command("teacher")
@with_teacher_options
def teacher_cmd(
    store: Store,
    seed: Annotated[int, typer.Option(help="Seed of a random teacher.")] = 0,
    *,
    run: TeacherArgs,
) -> None:
    """Recompute only the teacher targets of a store (geometry kept; the dataset must still be reachable).

    Targets already computed by the same teacher identity are kept; another teacher replaces them all.
    """
    from pkd.preprocess.prep import run_teacher

    summary = run_teacher(store, run.config(seed), run.options())
    for name, s in summary.items():
        typer.echo(f"{name}: teacher targets for {s['shards_written']} shards written")


@app.command()
def show(
    store: Store,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("sample.png"),
    index: Index = 0,
    split: Split = "train",
    clipcap_weights: Annotated[str | None, typer.Option(help="ClipCap weights with gpt.* keys: adds the "
                                                                "caption.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="GPT-2 tokenizer folder (HF format) for the caption.")]
    = None,
) -> None:
    """One picture of a sample: color frame with the teacher crop, the crop, the colored points (+caption)."""
    from pkd.preprocess import show as viewer

    sample = viewer.load_sample(store, split, index)
    text = _caption(sample.prefix, clipcap_weights, tokenizer, beam=5) if clipcap_weights else None
    typer.echo(f"wrote {viewer.render(sample, viewer.color_frame(store, sample), out, text)}")


@app.command()
def caption(
    store: Store,
    clipcap_weights: Annotated[str, typer.Option(help="ClipCap weights file holding the gpt.* keys.")],
    tokenizer: Annotated[str, typer.Option(help="GPT-2 tokenizer folder (HF format, e.g. a saved 'gpt2').")],
    index: Index = 0,
    split: Split = "train",
    beam: Annotated[int, typer.Option(help="Beam width (1 = greedy).")] = 5,
) -> None:
    """Turn a cached prefix back into text with ClipCap's GPT-2 (inspection only)."""
    from pkd.preprocess.show import load_sample

    typer.echo(_caption(load_sample(store, split, index).prefix, clipcap_weights, tokenizer, beam))


def _caption(prefix, clipcap_weights: str, tokenizer: str | None, beam: int) -> str:
    from pkd.preprocess.caption import load_captioner

    if tokenizer is None:
        raise ConfigError("a caption needs --tokenizer: a GPT-2 tokenizer folder (save one with "
                          "`transformers.GPT2TokenizerFast.from_pretrained('gpt2').save_pretrained(DIR)`).")
    return load_captioner(clipcap_weights, tokenizer).caption(prefix, beam=beam)


@app.command()
def ply(
    store: Store,
    out: Annotated[Path, typer.Option(help="PLY file to write.")] = Path("sample.ply"),
    index: Index = 0,
    split: Split = "train",
) -> None:
    """Write one sample's colored points as PLY (open3d) for any point-cloud viewer."""
    from pkd.preprocess.show import load_sample, write_ply

    typer.echo(f"wrote {write_ply(load_sample(store, split, index), out)}")


def main() -> None:
    """Console-script entry point."""
    run_app(app)
