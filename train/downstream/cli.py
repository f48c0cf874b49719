"""Typer sub-apps for ``pkd-train``: ``finetune modelnet40|shapenetpart|scanobjectnn|fewshot|scannet-seg``,
``probe modelnet40``, ``test modelnet40|scannet-seg`` and the ``compare`` command.

Wire them with ``app.add_typer(finetune_app, name="finetune")``, ``app.add_typer(probe_app, name="probe")``,
``app.add_typer(test_app, name="test")`` and ``app.command("compare")(compare_runs)``.

The finetune and probe options are ``FinetuneConfig``'s and ``ProbeConfig``'s fields (their help is the
field's); ``TASK_OPTIONS`` says which of them each finetune subcommand takes, and a subcommand's defaults
are its task's Point-MAE defaults (``TASK_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from pkd.common.options import dataclass_options, given_on_command_line, with_options
from pkd.train.downstream.config import FinetuneConfig, resume_options, task_default
from pkd.train.downstream.probe import ProbeConfig
from pkd.train.encoder import EncoderConfig

finetune_app = typer.Typer(
    help="Finetune an encoder on a downstream benchmark (Point-MAE's protocols).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
probe_app = typer.Typer(
    help="Score frozen encoder features with a linear SVM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
test_app = typer.Typer(
    help="Re-score a finished fine-tuning run with a benchmark's test protocol.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Every finetune subcommand takes the schedule and encoder options; TASK_OPTIONS adds each task's own.
COMMON_OPTIONS = (
    "epochs",
    "warmup_epochs",
    "decay_epochs",
    "batch_size",
    "lr",
    "min_lr",
    "weight_decay",
    "grad_clip",
    "seed",
    "device",
    "max_steps",
    "num_points",
    *(f.name for f in dataclasses.fields(EncoderConfig)),
)
SHAPE_OPTIONS = ("splits", "allow_missing")
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "modelnet40": (*SHAPE_OPTIONS, "votes", "pool_points", "cache_dir", "trust_pickle"),
    "shapenetpart": SHAPE_OPTIONS,
    "scanobjectnn": ("variant",),
    "fewshot": (*SHAPE_OPTIONS, "way", "shot", "cache_dir", "trust_pickle"),
    "scannet-seg": (*SHAPE_OPTIONS, "cache_dir", "crop_size", "repeats"),
}
# on the command line a GPU is used when there is one, and the FPS pools / parsed meshes are cached
CLI_DEFAULTS = {"device": "auto", "cache_dir": "runs/cache"}
FINETUNE_OPTIONS = dataclass_options(FinetuneConfig)
PROBE_OPTIONS = {k: v for k, v in dataclass_options(ProbeConfig).items() if k != "drop_path"}  # eval mode only


def task_parameters(task: str) -> list[inspect.Parameter]:
    """The options of ``finetune TASK``, with the task's defaults."""
    return [
        FINETUNE_OPTIONS[name].parameter(name, CLI_DEFAULTS.get(name, task_default(task, name)))
        for name in (*COMMON_OPTIONS, *TASK_OPTIONS[task])
    ]


def probe_parameters() -> Iterable[inspect.Parameter]:
    """The options of ``probe modelnet40``, with ProbeConfig's defaults."""
    return (opt.parameter(name, CLI_DEFAULTS.get(name, dataclasses.MISSING)) for name, opt in PROBE_OPTIONS.items())


Data = Annotated[Path, typer.Option(help="dataset folder (modelnet40_normal_resampled or ShapeNetPart)")]
Init = Annotated[
    str,
    typer.Option(help="encoder.pth (pkd-train export or any Point-MAE checkpoint), a pkd run directory, or 'scratch'"),
]
RunDir = Annotated[Path | None, typer.Option(help="output folder (default runs/<task>-<init name>)")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
Resume = Annotated[
    bool,
    typer.Option(
        help="continue the run in --run-dir from its last.pt (flags not typed take the run's recorded values)"
    ),
]
Overwrite = Annotated[bool, typer.Option(help="replace an existing --run-dir")]


def _run_dir(task: str, init: str, run_dir: Path | None) -> Path:
    """``run_dir``, or runs/<task>-<init name>."""
    return run_dir or Path("runs") / f"{task}-{Path(init).stem or 'scratch'}"


def _summary(results: dict[str, Any]) -> str:
    """The run's schema records as 'metric value %', and how much of the test split was used (ScanNet: val
    scenes, and of their vertices how many were predicted)."""
    from pkd.train.downstream.engine import describe_data

    values = ", ".join(f"{r['metric']} {r['value']:.2f} {r['unit']}" for r in results["records"])
    if "data" not in results:
        return values
    note = describe_data(results)
    vertices = (results.get("test") or {}).get("vertex_coverage")
    if vertices:
        note += f", {vertices['predicted_vertices']} of {vertices['vertices']} vertices predicted"
    return f"{values} ({note})"


def _finetune(
    task: str, data: Path, init: str, run_dir: Path, resume: bool, overwrite: bool, options: dict[str, Any]
) -> None:
    """Finetune (or resume, taking the untyped options from the run's config.json) and report."""
    from pkd.train.downstream.run import run_finetune

    if resume:
        options = resume_options(run_dir, options, given_on_command_line())
    cfg = FinetuneConfig.for_task(task, data, init=init, **options)
    results = run_finetune(cfg, run_dir, resume=resume, overwrite=overwrite)
    if results["test"] is None:  # a DDP rank other than 0: rank 0 reports
        return
    init_note = results["init"]
    typer.echo(
        f"{task} from {init_note['init']} ({init_note['used']} encoder tensors loaded, "
        f"{init_note['unexpected']} other keys ignored): {_summary(results)}, best epoch "
        f"{results['best']['epoch']} → {run_dir}/results.json"
    )


@finetune_app.command("modelnet40")
@with_options(task_parameters("modelnet40"))
def finetune_modelnet40(
    data: Data, init: Init, run_dir: RunDir = None, resume: Resume = False, overwrite: Overwrite = False, **options: Any
) -> None:
    """ModelNet40 classification: OA and mean-class accuracy after every epoch, with and without voting
    (best plain epoch → best.pt, best voting epoch → best_vote.pt, as Point-MAE's ckpt-best / ckpt-best_vote)."""
    _finetune("modelnet40", data, init, _run_dir("modelnet40", init, run_dir), resume, overwrite, options)


@finetune_app.command("shapenetpart")
@with_options(task_parameters("shapenetpart"))
def finetune_shapenetpart(
    data: Data, init: Init, run_dir: RunDir = None, resume: Resume = False, overwrite: Overwrite = False, **options: Any
) -> None:
    """ShapeNetPart part segmentation: instance and class mIoU."""
    _finetune("shapenetpart", data, init, _run_dir("shapenetpart", init, run_dir), resume, overwrite, options)


ScanNetData = Annotated[
    Path, typer.Option(help="ScanNet tree holding scans/<scene>/<scene>_vh_clean_2.ply and _vh_clean_2.labels.ply")
]
ScanNetSplits = Annotated[
    Path | None, typer.Option(help="folder with scannetv2_train.txt / scannetv2_val.txt (default: the official lists)")
]


@finetune_app.command("scannet-seg")
@with_options(task_parameters("scannet-seg"))
def finetune_scannet_seg(
    data: ScanNetData,
    init: Init,
    run_dir: RunDir = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    **options: Any,
) -> None:
    """ScanNet v2 semantic segmentation (20 classes): mIoU over every vertex of the val scenes.

    The official per-scene meshes are read once into a Zarr cache (--cache-dir).
    Training draws random 8192-point columns of the scenes; the README's "ScanNet semantic segmentation" has it all."""
    _finetune("scannet-seg", data, init, _run_dir("scannet-seg", init, run_dir), resume, overwrite, options)


@finetune_app.command("scanobjectnn")
@with_options(task_parameters("scanobjectnn"))
def finetune_scanobjectnn(
    data: Annotated[Path, typer.Option(help="ScanObjectNN h5_files folder (with main_split/, main_split_nobg/)")],
    init: Init,
    run_dir: RunDir = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    **options: Any,
) -> None:
    """ScanObjectNN classification (15 classes, 2048 points, 128 groups), Point-MAE's finetune_scan_*.yaml."""
    out = _run_dir(f"scanobjectnn-{options['variant']}", init, run_dir)
    _finetune("scanobjectnn", data, init, out, resume, overwrite, options)


@finetune_app.command("fewshot")
@with_options(task_parameters("fewshot"))
def finetune_fewshot(
    init: Init,
    data: Annotated[
        Path | None, typer.Option(help="modelnet40_normal_resampled, to generate folds (not needed with --fold-files)")
    ] = None,
    fold_files: Annotated[
        Path | None,
        typer.Option(help="folder of the published {way}way_{shot}shot/{fold}.pkl files (read without running code)"),
    ] = None,
    fold: Annotated[list[int] | None, typer.Option(help="fold to run (repeatable; default all 10)")] = None,
    run_dir: RunDir = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    **options: Any,
) -> None:
    """Few-shot ModelNet40 (Point-MAE's cfgs/fewshot.yaml, 150 epochs): one run per fold, mean ± std over folds."""
    from pkd.common.errors import ConfigError
    from pkd.train.downstream.fewshot import FOLDS
    from pkd.train.downstream.run import run_fewshot

    sources = [p for p in (data, fold_files) if p is not None]
    if len(sources) != 1:
        raise ConfigError("pass either --fold-files (the published folds) or --data (ModelNet40, to generate them).")
    cfg = FinetuneConfig.for_task(
        "fewshot", sources[0], init=init, folds=str(fold_files) if fold_files else None, **options
    )
    out = _run_dir(f"fewshot-{cfg.way}way{cfg.shot}shot", init, run_dir)
    results = run_fewshot(cfg, out, fold or list(range(FOLDS)), resume=resume, overwrite=overwrite)
    typer.echo(
        f"{cfg.way}-way {cfg.shot}-shot from {init}: {_summary(results)} over folds "
        f"{', '.join(results['folds'])} ({results['fold_source']}) → {out}/results.json"
    )


@test_app.command("modelnet40")
def test_modelnet40(
    run: Annotated[Path, typer.Argument(help="folder of a finished `pkd-train finetune modelnet40` run")],
    votes: Annotated[int, typer.Option(help="draws averaged per pass (Point-MAE: 10)")] = 10,
    passes: Annotated[int, typer.Option(help="voting passes (Point-MAE's test mode: 299)")] = 299,
    weights: Annotated[str, typer.Option(help="best | best_vote | last")] = "best",
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing RUN/test_votes.json")] = False,
) -> None:
    """Point-MAE's test mode: mean, std and best accuracy over repeated voting passes → RUN/test_votes.json."""
    from pkd.train.downstream.run import test_modelnet40 as run_test

    results = run_test(run, votes=votes, passes=passes, weights=weights, device=device, overwrite=overwrite)
    typer.echo(f"{passes} passes of {votes} votes ({weights} weights): {_summary(results)} → {run}/test_votes.json")


@test_app.command("scannet-seg")
def test_scannet_seg(
    run: Annotated[Path, typer.Argument(help="run directory of `pkd-train finetune scannet-seg`")],
    data: ScanNetData,
    splits: ScanNetSplits = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default RUN/test)")] = None,
    device: Device = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="mesh cache folder (default: the run's)")] = None,
    allow_missing: Annotated[bool, typer.Option(help="score only the val scenes present")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing OUT/results.json")] = False,
) -> None:
    """Score RUN's best weights on every vertex of the ScanNet val scenes: results.json, IoU chart, top view."""
    from pkd.train.downstream.run import run_test
    from pkd.train.downstream.scannet_seg import ScanNetSegTask

    results = run_test(
        lambda cfg: ScanNetSegTask(cfg, train=False),
        run,
        out,
        overwrite=overwrite,
        data=data,
        splits=splits,
        device=device,
        cache_dir=cache_dir,
        allow_missing=allow_missing,
    )
    typer.echo(f"scannet-seg {run}: {_summary(results)} → {out or run / 'test'}/results.json")


def compare_runs(
    runs: Annotated[list[Path], typer.Argument(help="run folders (searched recursively) or results files")],
    out: Annotated[Path, typer.Option(help="Markdown table; .json and .png are written beside it")] = Path(
        "runs/compare/table.md"
    ),
    overwrite: Annotated[bool, typer.Option(help="replace an existing table")] = False,
) -> None:
    """One table across runs: every results.json / test_votes.json, mean ± std over seeds of equal settings."""
    from pkd.train.downstream.compare import format_markdown
    from pkd.train.downstream.run import compare

    rows, skipped = compare(runs, out, overwrite=overwrite)
    for line in skipped:
        typer.echo(f"skipped {line}", err=True)
    typer.echo(format_markdown(rows) + f"→ {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


@probe_app.command("modelnet40")
@with_options(probe_parameters())
def probe_modelnet40(
    data: Data, init: Init, run_dir: RunDir = None, overwrite: Overwrite = False, **options: Any
) -> None:
    """Linear SVM on frozen max+mean token features: ModelNet40 test accuracy."""
    from pkd.train.downstream.run import probe_modelnet40 as probe

    out = _run_dir("probe-modelnet40", init, run_dir)
    cfg = ProbeConfig(data=str(data), init=init, **options)
    typer.echo(f"linear probe: {_summary(probe(cfg, out, overwrite=overwrite))} → {out}/results.json")
