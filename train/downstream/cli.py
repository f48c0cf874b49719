"""Typer sub-apps for ``pkd-train``: ``finetune modelnet40|shapenetpart|scanobjectnn|fewshot|scannet-seg``,
``probe modelnet40``, ``test modelnet40|scannet-seg`` and the ``compare`` command.

Wire them with ``app.add_typer(finetune_app, name="finetune")``, ``app.add_typer(probe_app, name="probe")``,
``app.add_typer(test_app, name="test")`` and ``app.command("compare")(compare_runs)``.
Options left unset take the task's Point-MAE defaults (``engine.TASK_DEFAULTS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

finetune_app = typer.Typer(help="Finetune an encoder on a downstream benchmark (Point-MAE's protocols).",
                           no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
probe_app = typer.Typer(help="Score frozen encoder features with a linear SVM.", no_args_is_help=True,
                        add_completion=False, pretty_exceptions_enable=False)
test_app = typer.Typer(help="Re-score a finished fine-tuning run with a benchmark's test protocol.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

Data = Annotated[Path, typer.Option(help="dataset folder (modelnet40_normal_resampled or ShapeNetPart)")]
Init = Annotated[str, typer.Option(help="encoder.pth (pkd-train export or any Point-MAE checkpoint), a pkd run "
                                        "directory, or 'scratch'")]
Splits = Annotated[Path | None, typer.Option(help="folder with the split lists, if not inside --data")]
RunDir = Annotated[Path | None, typer.Option(help="output folder (default runs/<task>-<init name>)")]
Epochs = Annotated[int | None, typer.Option(help="default 300")]
BatchSize = Annotated[int | None, typer.Option(help="default 32 (ModelNet40) / 16 (ShapeNetPart)")]
Lr = Annotated[float | None, typer.Option(help="peak learning rate, default 5e-4 / 2e-4")]
MaxSteps = Annotated[int | None, typer.Option(help="stop after this many optimizer steps")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
AllowMissing = Annotated[bool, typer.Option(help="use only the listed shapes that exist")]
Resume = Annotated[bool, typer.Option(help="continue the run in --run-dir from its last.pt")]
Overwrite = Annotated[bool, typer.Option(help="replace an existing --run-dir")]
TrustPickle = Annotated[bool, typer.Option(help="read Point-MAE's modelnet40_*_fps.dat pickles (runs their code)")]
CacheDir = Annotated[Path | None, typer.Option(help="cache of the 8192-point FPS per shape (.npz)")]
NumPoints = Annotated[int | None, typer.Option(help="points per shape fed to the model (1024 / 2048)")]
NumGroup = Annotated[int | None, typer.Option(help="patches per shape (64 / 128)")]
Dim = Annotated[int | None, typer.Option(help="encoder width (384)")]
Depth = Annotated[int | None, typer.Option(help="encoder blocks (12)")]
Heads = Annotated[int | None, typer.Option(help="attention heads (6)")]


def _run_dir(task: str, init: str, run_dir: Path | None) -> Path:
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


def _finetune(task: str, data: Path, init: str, run_dir: Path | None, resume: bool, overwrite: bool,
              **options: Any) -> None:
    from pkd.common.options import given_on_command_line
    from pkd.train.downstream.config import resume_options
    from pkd.train.downstream.run import FinetuneConfig, run_finetune

    out = _run_dir(task, init, run_dir)
    paths = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    if resume:
        paths = resume_options(out, paths, given_on_command_line())
    cfg = FinetuneConfig.for_task(task, data, init=init, **paths)
    results = run_finetune(cfg, out, resume=resume, overwrite=overwrite)
    if results["test"] is None:  # a DDP rank other than 0: rank 0 reports
        return
    init_note = results["init"]
    typer.echo(f"{task} from {init_note['init']} ({init_note['used']} encoder tensors loaded, "
               f"{init_note['unexpected']} other keys ignored): {_summary(results)}, best epoch "
               f"{results['best']['epoch']} → {out}/results.json")


@finetune_app.command("modelnet40")
def finetune_modelnet40(data: Data, init: Init, splits: Splits = None, run_dir: RunDir = None, epochs: Epochs = None,
                        batch_size: BatchSize = None, lr: Lr = None, max_steps: MaxSteps = None,
                        device: Device = "auto", seed: int = 0,
                        votes: Annotated[int, typer.Option(help="voting draws per evaluation (0: no voting)")] = 10,
                        allow_missing: AllowMissing = False,
                        trust_pickle: TrustPickle = False, cache_dir: CacheDir = Path("runs/cache"),
                        pool_points: Annotated[int, typer.Option(help="FPS points kept per shape")] = 8192,
                        num_points: NumPoints = None, num_group: NumGroup = None, dim: Dim = None,
                        depth: Depth = None, heads: Heads = None, resume: Resume = False,
                        overwrite: Overwrite = False) -> None:
    """ModelNet40 classification: OA and mean-class accuracy after every epoch, with and without voting
    (best plain epoch → best.pt, best voting epoch → best_vote.pt, as Point-MAE's ckpt-best / ckpt-best_vote)."""
    _finetune("modelnet40", data, init, run_dir, resume, overwrite, splits=splits, epochs=epochs,
              batch_size=batch_size, lr=lr, max_steps=max_steps, device=device, seed=seed, votes=votes,
              allow_missing=allow_missing, trust_pickle=trust_pickle, cache_dir=cache_dir, pool_points=pool_points,
              num_points=num_points, num_group=num_group, dim=dim, depth=depth, heads=heads)


@finetune_app.command("shapenetpart")
def finetune_shapenetpart(data: Data, init: Init, splits: Splits = None, run_dir: RunDir = None,
                          epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
                          max_steps: MaxSteps = None, device: Device = "auto", seed: int = 0,
                          allow_missing: AllowMissing = False, num_points: NumPoints = None,
                          num_group: NumGroup = None, dim: Dim = None, depth: Depth = None, heads: Heads = None,
                          resume: Resume = False, overwrite: Overwrite = False) -> None:
    """ShapeNetPart part segmentation: instance and class mIoU."""
    _finetune("shapenetpart", data, init, run_dir, resume, overwrite, splits=splits, epochs=epochs,
              batch_size=batch_size, lr=lr, max_steps=max_steps, device=device, seed=seed,
              allow_missing=allow_missing, num_points=num_points, num_group=num_group, dim=dim, depth=depth,
              heads=heads)


ScanNetData = Annotated[Path, typer.Option(help="ScanNet tree holding scans/<scene>/<scene>_vh_clean_2.ply and "
                                              "_vh_clean_2.labels.ply")]
ScanNetSplits = Annotated[Path | None, typer.Option(help="folder with scannetv2_train.txt / scannetv2_val.txt "
                                                           "(default: the official lists)")]
SegCache = Annotated[Path, typer.Option(help="folder of the parsed-mesh cache scannet_seg.zarr (built on first use)")]
CropSize = Annotated[float | None, typer.Option(help="side in metres of the vertical column each input is drawn "
                                                        "from (3.0)")]


@finetune_app.command("scannet-seg")
def finetune_scannet_seg(data: ScanNetData, init: Init, splits: ScanNetSplits = None, run_dir: RunDir = None,
                         epochs: Annotated[int | None, typer.Option(help="default 200")] = None,
                         batch_size: Annotated[int | None, typer.Option(help="global batch, default 16")] = None,
                         lr: Annotated[float | None, typer.Option(help="peak learning rate, default 1e-3")] = None,
                         max_steps: MaxSteps = None, device: Device = "auto", seed: int = 0,
                         allow_missing: Annotated[bool, typer.Option(help="use only the listed scenes present")]
                         = False, cache_dir: SegCache = Path("runs/cache"), crop_size: CropSize = None,
                         repeats: Annotated[int | None, typer.Option(help="random columns per train scene and "
                                                                            "epoch (1)")] = None,
                         num_points: Annotated[int | None, typer.Option(help="points per input (8192)")] = None,
                         num_group: Annotated[int | None, typer.Option(help="patches per input (256)")] = None,
                         dim: Dim = None, depth: Depth = None, heads: Heads = None, resume: Resume = False,
                         overwrite: Overwrite = False) -> None:
    """ScanNet v2 semantic segmentation (20 classes): mIoU over every vertex of the val scenes.

    The official per-scene meshes are read once into a Zarr cache (--cache-dir).
    Training draws random 8192-point columns of the scenes; the README's "ScanNet semantic segmentation" has it all."""
    _finetune("scannet-seg", data, init, run_dir, resume, overwrite, splits=splits, epochs=epochs,
              batch_size=batch_size, lr=lr, max_steps=max_steps, device=device, seed=seed,
              allow_missing=allow_missing, cache_dir=cache_dir, crop_size=crop_size, repeats=repeats,
              num_points=num_points, num_group=num_group, dim=dim, depth=depth, heads=heads)


@finetune_app.command("scanobjectnn")
def finetune_scanobjectnn(
        data: Annotated[Path, typer.Option(help="ScanObjectNN h5_files folder (with main_split/, main_split_nobg/)")],
        init: Init,
        variant: Annotated[str, typer.Option(help="obj_bg | obj_only | pb_t50_rs (the hardest)")] = "pb_t50_rs",
        run_dir: RunDir = None, epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
        max_steps: MaxSteps = None, device: Device = "auto", seed: int = 0, num_points: NumPoints = None,
        num_group: NumGroup = None, dim: Dim = None, depth: Depth = None, heads: Heads = None,
        resume: Resume = False, overwrite: Overwrite = False) -> None:
    """ScanObjectNN classification (15 classes, 2048 points, 128 groups), Point-MAE's finetune_scan_*.yaml."""
    _finetune("scanobjectnn", data, init, run_dir or _run_dir(f"scanobjectnn-{variant}", init, None), resume,
              overwrite, variant=variant, epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps,
              device=device, seed=seed, num_points=num_points, num_group=num_group, dim=dim, depth=depth, heads=heads)


@finetune_app.command("fewshot")
def finetune_fewshot(
        init: Init,
        data: Annotated[Path | None, typer.Option(
            help="modelnet40_normal_resampled, to generate folds (not needed with --fold-files)")] = None,
        fold_files: Annotated[Path | None, typer.Option(
            help="folder of the published {way}way_{shot}shot/{fold}.pkl files (read without running code)")] = None,
        way: Annotated[int, typer.Option(help="classes per fold (5 or 10)")] = 5,
        shot: Annotated[int, typer.Option(help="training shapes per class (10 or 20)")] = 10,
        fold: Annotated[list[int] | None, typer.Option(help="fold to run (repeatable; default all 10)")] = None,
        splits: Splits = None, run_dir: RunDir = None,
        epochs: Annotated[int | None, typer.Option(help="default 150")] = None, batch_size: BatchSize = None,
        lr: Lr = None, max_steps: MaxSteps = None,
        device: Device = "auto",
        seed: Annotated[int, typer.Option(help="training seed; also draws generated folds")] = 0,
        allow_missing: AllowMissing = False, trust_pickle: TrustPickle = False,
        cache_dir: CacheDir = Path("runs/cache"),
        num_points: NumPoints = None, num_group: NumGroup = None, dim: Dim = None, depth: Depth = None,
        heads: Heads = None, resume: Resume = False, overwrite: Overwrite = False) -> None:
    """Few-shot ModelNet40 (Point-MAE's cfgs/fewshot.yaml, 150 epochs): one run per fold, mean ± std over folds."""
    from pkd.common.errors import ConfigError
    from pkd.train.downstream.fewshot import FOLDS
    from pkd.train.downstream.run import FinetuneConfig, run_fewshot

    sources = [p for p in (data, fold_files) if p is not None]
    if len(sources) != 1:
        raise ConfigError("pass either --fold-files (the published folds) or --data (ModelNet40, to generate them).")
    options = dict(splits=splits, epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, device=device,
                   seed=seed, allow_missing=allow_missing, trust_pickle=trust_pickle, cache_dir=cache_dir,
                   num_points=num_points, num_group=num_group, dim=dim, depth=depth, heads=heads, way=way, shot=shot,
                   folds=fold_files)
    cfg = FinetuneConfig.for_task("fewshot", sources[0], init=init,
                                  **{k: str(v) if isinstance(v, Path) else v for k, v in options.items()})
    out = _run_dir(f"fewshot-{way}way{shot}shot", init, run_dir)
    results = run_fewshot(cfg, out, fold or list(range(FOLDS)), resume=resume, overwrite=overwrite)
    typer.echo(f"{way}-way {shot}-shot from {init}: {_summary(results)} over folds {', '.join(results['folds'])} "
               f"({results['fold_source']}) → {out}/results.json")


@test_app.command("modelnet40")
def test_modelnet40(
        run: Annotated[Path, typer.Argument(help="folder of a finished `pkd-train finetune modelnet40` run")],
        votes: Annotated[int, typer.Option(help="draws averaged per pass (Point-MAE: 10)")] = 10,
        passes: Annotated[int, typer.Option(help="voting passes (Point-MAE's test mode: 299)")] = 299,
        weights: Annotated[str, typer.Option(help="best | best_vote | last")] = "best",
        device: Device = "auto",
        overwrite: Annotated[bool, typer.Option(help="replace an existing RUN/test_votes.json")] = False) -> None:
    """Point-MAE's test mode: mean, std and best accuracy over repeated voting passes → RUN/test_votes.json."""
    from pkd.train.downstream.run import test_modelnet40 as run_test

    results = run_test(run, votes=votes, passes=passes, weights=weights, device=device, overwrite=overwrite)
    typer.echo(f"{passes} passes of {votes} votes ({weights} weights): {_summary(results)} → {run}/test_votes.json")


@test_app.command("scannet-seg")
def test_scannet_seg(run: Annotated[Path, typer.Argument(help="run directory of `pkd-train finetune scannet-seg`")],
                     data: ScanNetData, splits: ScanNetSplits = None,
                     out: Annotated[Path | None, typer.Option(help="output folder (default RUN/test)")] = None,
                     device: Device = "auto",
                     cache_dir: Annotated[Path | None, typer.Option(help="mesh cache folder (default: the run's)")]
                     = None, allow_missing: Annotated[bool, typer.Option(help="score only the val scenes present")]
                     = False, overwrite: Annotated[bool, typer.Option(help="replace an existing OUT/results.json")]
                     = False) -> None:
    """Score RUN's best weights on every vertex of the ScanNet val scenes: results.json, IoU chart, top view."""
    from pkd.train.downstream.run import run_test
    from pkd.train.downstream.scannet_seg import ScanNetSegTask

    results = run_test(lambda cfg: ScanNetSegTask(cfg, train=False), run, out, overwrite=overwrite, data=data,
                       splits=splits, device=device, cache_dir=cache_dir, allow_missing=allow_missing)
    typer.echo(f"scannet-seg {run}: {_summary(results)} → {out or run / 'test'}/results.json")


def compare_runs(
        runs: Annotated[list[Path], typer.Argument(help="run folders (searched recursively) or results files")],
        out: Annotated[Path, typer.Option(help="Markdown table; .json and .png are written beside it")] = Path(
            "runs/compare/table.md"),
        overwrite: Annotated[bool, typer.Option(help="replace an existing table")] = False) -> None:
    """One table across runs: every results.json / test_votes.json, mean ± std over seeds of equal settings."""
    from pkd.train.downstream.compare import format_markdown
    from pkd.train.downstream.run import compare

    rows, skipped = compare(runs, out, overwrite=overwrite)
    for line in skipped:
        typer.echo(f"skipped {line}", err=True)
    typer.echo(format_markdown(rows) + f"→ {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


@probe_app.command("modelnet40")
def probe_modelnet40(data: Data, init: Init, splits: Splits = None, run_dir: RunDir = None,
                     svm_c: Annotated[float, typer.Option(help="LinearSVC regularisation C")] = 0.01,
                     device: Device = "auto", allow_missing: AllowMissing = False, trust_pickle: TrustPickle = False,
                     cache_dir: CacheDir = Path("runs/cache"),
                     pool_points: Annotated[int, typer.Option(help="FPS points kept per shape")] = 8192,
                     num_points: int = 1024, num_group: int = 64, dim: int = 384, depth: int = 12,
                     heads: int = 6, overwrite: Overwrite = False) -> None:
    """Linear SVM on frozen max+mean token features: ModelNet40 test accuracy."""
    from pkd.train.downstream.run import ProbeConfig
    from pkd.train.downstream.run import probe_modelnet40 as probe

    cfg = ProbeConfig(data=str(data), init=init, splits=str(splits) if splits else None, svm_c=svm_c, device=device,
                      allow_missing=allow_missing, trust_pickle=trust_pickle,
                      cache_dir=str(cache_dir) if cache_dir else None, pool_points=pool_points,
                      num_points=num_points, num_group=num_group, dim=dim, depth=depth, heads=heads)
    out = _run_dir("probe-modelnet40", init, run_dir)
    typer.echo(f"linear probe: {_summary(probe(cfg, out, overwrite=overwrite))} → {out}/results.json")
