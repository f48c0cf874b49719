"""`pkd-prep`: turn ScanNet RGB-D sequences into a pair store, and inspect stores."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from pkd.common import lock, logs
from pkd.common.cli import run_app
from pkd.common.errors import ConfigError, StoreError
from pkd.common.options import (
    Option,
    alias_parameter,
    apply_aliases,
    by_section,
    cli_type,
    dataclass_options,
    with_options,
)
from pkd.common.seg_cache import is_seg_cache, verify_cache
from pkd.common.verify import store_info, verify_store
from pkd.preprocess.config import CLIP_FILE, CLIPCAP_FILE, PrepConfig, RunOptions, TeacherConfig
from pkd.preprocess.frame_sample import GeometryConfig

if TYPE_CHECKING:
    import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    help="Pay for the teacher once: ScanNet frames -> (point cloud, ClipCap target) pairs in a Zarr store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.callback()(logs.cli_options)


Store = Annotated[str, typer.Argument(help="Pair store path.")]
Split = Annotated[str, typer.Option(help="Split of the store.")]
Index = Annotated[int, typer.Option(help="Sample index within the split.")]

# The options of `scannet` and `teacher`, derived from the fields of their dataclasses (one declaration each).
PREP_OPTIONS = dataclass_options(PrepConfig, "prep")
GEOMETRY_OPTIONS = dataclass_options(GeometryConfig, "geometry")
TEACHER_OPTIONS = dataclass_options(TeacherConfig, "teacher", {"kind": "teacher"})
RUN_OPTIONS = dataclass_options(RunOptions, "run")
# The deprecation map: old spellings (hidden) → their names, accepted with a warning until pkd ALIASES_REMOVED_IN.
ALIASES = {"points": "num_points", "workers": "dask_workers"}
ALIASES_REMOVED_IN = "0.2.0"
WEIGHTS_DIR = inspect.Parameter(
    "weights_dir",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[cli_type(Path | None), typer.Option(help=f"Folder holding {CLIP_FILE} and {CLIPCAP_FILE}.")],
)


def prep_options(options: Mapping[str, Option]) -> Callable[[F], F]:
    """Decorate a command taking ``**options``: it gains ``options``, ``--weights-dir`` and the old spellings."""
    aliases = [alias_parameter(old, options[new]) for old, new in ALIASES.items() if new in options]
    return with_options([*(opt.parameter(name) for name, opt in options.items()), WEIGHTS_DIR, *aliases])


def configs(options: Mapping[str, Option], values: Mapping[str, Any], seed: int) -> dict[str | None, Any]:
    """The keyword values of a command's ``options`` by section, with ``teacher`` and ``run`` built (a random
    teacher uses ``seed``; ``--weights-dir`` supplies the weight files not given)."""
    values = apply_aliases(values, ALIASES, ALIASES_REMOVED_IN)
    parts: dict[str | None, Any] = by_section(options, values)
    teacher = parts["teacher"]
    if values["weights_dir"] is not None:
        teacher["clip_weights"] = teacher["clip_weights"] or str(values["weights_dir"] / CLIP_FILE)
        teacher["clipcap_weights"] = teacher["clipcap_weights"] or str(values["weights_dir"] / CLIPCAP_FILE)
    return {**parts, "teacher": TeacherConfig(**teacher, seed=seed), "run": RunOptions(**parts["run"])}


SCANNET_OPTIONS = {**PREP_OPTIONS, **GEOMETRY_OPTIONS, **TEACHER_OPTIONS, **RUN_OPTIONS}
TEACHER_RUN_OPTIONS = {**TEACHER_OPTIONS, **{k: v for k, v in RUN_OPTIONS.items() if k != "overwrite"}}


@app.command()
@prep_options(SCANNET_OPTIONS)
def scannet(
    root: Annotated[Path, typer.Option(help="ScanNet tree (with scans/, scans_test/) or a single scene folder.")],
    out: Annotated[str, typer.Option(help="Store path or fsspec URL (e.g. pairs.zarr, s3://bucket/pairs.zarr).")],
    scenes: Annotated[str | None, typer.Option(help="Comma-separated scene names to keep.")] = None,
    **options: Any,
) -> None:
    """Read ScanNet (.sens or exported frames), back-project every 25th frame and cache teacher targets.

    Rerunning the same command resumes an interrupted run; other arguments on an existing store are refused.
    """
    from pkd.preprocess.prep import run_prep

    parts = configs(SCANNET_OPTIONS, options, options["seed"])
    geometry = GeometryConfig(**parts["geometry"], min_valid_pixels=parts["geometry"]["num_points"])
    cfg = PrepConfig(
        root=str(root.resolve()),
        scenes=tuple(scenes.split(",")) if scenes else None,
        geometry=geometry,
        **parts["prep"],
    )
    summary = run_prep(cfg, out, parts["teacher"], parts["run"])
    for name, s in summary.items():
        typer.echo(f"{name}: {s['valid']} valid of {s['samples']} planned samples, skipped {s['skipped'] or 'none'}")
    typer.echo(f"wrote {out}")


@app.command("demo-scene")
def demo_scene(
    out: Annotated[Path, typer.Option(help="Folder to write a ScanNet-format tree into (out/scans/<scene>).")],
    frames: Annotated[int, typer.Option(help="Frames in the sequence.")] = 250,
    layout: Annotated[str, typer.Option(help="both | sens | exported.")] = "both",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic room.")] = 0,
    val_scene: Annotated[
        bool, typer.Option(help="Also write a second capture under a val-list name (the store's held-out split).")
    ] = True,
) -> None:
    """Write a small synthetic scene in real ScanNet format (a .sens file and/or exported frames) and, by default,
    a second capture of it under a val-list name, so a prep of OUT has a held-out split."""
    from pkd.preprocess.demo import write_demo_scene, write_demo_scenes

    if val_scene:
        scenes = write_demo_scenes(out, num_frames=frames, layout=layout, seed=seed)
    else:
        scenes = [write_demo_scene(out, num_frames=frames, layout=layout, seed=seed)]
    for scene in scenes:
        typer.echo(f"wrote {scene}")


@app.command("scannet-seg")
def scannet_seg(
    root: Annotated[Path, typer.Option(help="ScanNet tree with scans/<scene>/<scene>_vh_clean_2[.labels].ply.")],
    out: Annotated[Path, typer.Option(help="Cache to create or complete (e.g. seg.zarr).")],
    split: Annotated[str, typer.Option(help="train | val | all (train and val: the scenes with labels).")] = "all",
    splits: Annotated[
        Path | None, typer.Option(help="Folder with scannetv2_train/val.txt (default: official).")
    ] = None,
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
    typer.echo(
        f"{out}: {summary['written']} scenes written, {summary['kept']} already cached"
        + (f", {len(summary['missing'])} missing" if summary["missing"] else "")
    )


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
    typer.echo(
        f"teacher: {teacher.get('clip_model')} + {teacher.get('mapper')}  random={teacher.get('random')}  "
        f"precision={teacher.get('precision')}"
    )
    if teacher.get("random"):
        typer.echo("WARNING: this store's targets come from a RANDOM teacher (tests/demos only).")
    prep = report["prep"] or {}
    geometry = prep.get("geometry", {})
    typer.echo(
        f"prep: {prep.get('root')} (split {prep.get('split')}, source {prep.get('source')}), frame skip "
        f"{prep.get('frame_skip')}, limit {prep.get('limit')}, {geometry.get('num_points')} points "
        f"({geometry.get('sampling')}), depth {geometry.get('min_depth')}-{geometry.get('max_depth')} m, "
        f"depth scale {prep.get('depth_scale') or 'default (exported frames: 1000, .sens: its header)'}, "
        f"seed {prep.get('seed')}, shard size {prep.get('shard_size')}"
    )
    for name, s in report["splits"].items():
        typer.echo(
            f"{name}: {s['samples']} samples ({s['valid']} valid), {s['scenes']} scenes, "
            f"{s['shards']} shards (done {s['shards_done']}), skipped {s['skipped'] or 'none'}"
        )
    typer.echo("target sets (train on one with --targets SET/ARRAY):")
    for name, t in report["targets"].items():
        arrays = ", ".join(f"{a} {tuple(spec['shape'])}" for a, spec in t["arrays"].items())
        random = "  RANDOM WEIGHTS" if t["teacher"].get("random") else ""
        typer.echo(
            f"  {name}: {t['teacher'].get('kind')}{random}  [{arrays}]  {t['bytes_per_sample'] / 1024:.1f} KiB/sample"
            f"  shards done {t['shards_done']}{'' if t['complete'] else '  (incomplete)'}"
        )


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
@prep_options(TEACHER_RUN_OPTIONS)
def teacher_cmd(
    store: Store,
    seed: Annotated[int, typer.Option(help="Seed of a random teacher.")] = 0,
    name: Annotated[
        str | None,
        typer.Option(
            help="Add (or resume) the target set NAME beside the default one, computed by --teacher KIND: "
            "clipcap, open_clip:MODEL (e.g. open_clip:ViT-B-16) or dinov2:SIZE (small|base|large|giant). "
            "Train on it with `pkd-train distill STORE --targets NAME/ARRAY`."
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="With --name: the teacher's local weights (open_clip: a state dict file; dinov2: a Hugging Face "
            "folder; clipcap: the folder holding ViT-B-32.pt and conceptual_weights.pt)."
        ),
    ] = None,
    random_weights: Annotated[
        bool, typer.Option(help="With --name: seeded random weights (--seed), recorded as random: tests and demos.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="With --name: recompute a set that holds another teacher's targets.")
    ] = False,
    **options: Any,
) -> None:
    """Recompute only the teacher targets of a store, or add a named target set (geometry kept; the dataset must
    still be reachable: the images are re-read from it).

    Without --name it recomputes the default (ClipCap) set: targets already computed by the same teacher identity
    are kept; another teacher replaces them all. With --name it adds or resumes that set, shard by shard,
    without touching the geometry or any other set.
    """
    if name is None:
        from pkd.preprocess.prep import run_teacher

        if weights is not None or random_weights or overwrite:
            raise ConfigError("--weights, --random-weights and --overwrite go with --name SET (a set to add).")
        parts = configs(TEACHER_RUN_OPTIONS, options, seed)
        summary = run_teacher(store, parts["teacher"], parts["run"])
        for split, s in summary.items():
            typer.echo(f"{split}: teacher targets for {s['shards_written']} shards written")
        return
    from pkd.common.store import open_store
    from pkd.preprocess.target_pass import check_set_name, run_target_set
    from pkd.preprocess.teachers import build_target_teacher

    check_set_name(name, store)
    open_store(store)  # a missing or foreign store is refused before the teacher is built
    parts = by_section(TEACHER_RUN_OPTIONS, apply_aliases(options, ALIASES, ALIASES_REMOVED_IN))
    teacher = parts["teacher"]
    if teacher["clip_weights"] or teacher["clipcap_weights"] or options["weights_dir"] is not None:
        raise ConfigError("with --name, pass the teacher's weights as --weights (file or folder, per kind).")
    kind, random = ("clipcap", True) if teacher["kind"] == "random" else (teacher["kind"], random_weights)
    built = build_target_teacher(
        kind,
        weights=weights,
        random=random,
        seed=seed,
        device=teacher["device"],
        precision=teacher["precision"],
        patch_tokens=teacher["patch_tokens"],
    )
    summary = run_target_set(store, name, built, teacher["device"], RunOptions(**parts["run"], overwrite=overwrite))
    for split, s in summary.items():
        typer.echo(f"{split}: target set {name}: {s['shards_written']} shards written ({s['valid']} valid samples)")


@app.command()
def show(
    store: Store,
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("sample.png"),
    index: Index = 0,
    split: Split = "train",
    clipcap_weights: Annotated[
        str | None, typer.Option(help="ClipCap weights with gpt.* keys: adds the caption.")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help="GPT-2 tokenizer folder (HF format) for the caption.")] = None,
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


def _caption(prefix: np.ndarray, clipcap_weights: str, tokenizer: str | None, beam: int) -> str:
    from pkd.preprocess.caption import load_captioner

    if tokenizer is None:
        raise ConfigError(
            "a caption needs --tokenizer: a GPT-2 tokenizer folder (save one with "
            "`transformers.GPT2TokenizerFast.from_pretrained('gpt2').save_pretrained(DIR)`)."
        )
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
