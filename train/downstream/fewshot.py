"""Few-shot ModelNet40 (way × shot, 10 folds) with Point-MAE's ``cfgs/fewshot.yaml``.

Folds come from the published files or are generated. A published fold
(``<folds>/{way}way_{shot}shot/{fold}.pkl``, written by Point-BERT's ``datasets/generate_few_shot_data.py``)
is a pickle of ``{'train': [(points (8192, 6) float32, i, key), …], 'test': […]}``: ``i`` is the
fold's label 0…way-1, ``key`` the ModelNet40 class, ``test`` holds 20 shapes per class. Unpickling can run
code, so ``read_fold`` admits only numpy arrays and scalars inside lists, tuples, dicts, ints and strings,
and refuses anything else before it is built. Without fold files, ``generate_fold`` draws the same layout
from the full ModelNet40 (8192-point FPS pools) with a seeded generator: ``way`` classes, ``shot`` training
and 20 test shapes each. Points are normalised to the unit sphere and training clouds shuffled, as
Point-BERT's ``datasets/ModelNetDatasetFewShot.py``. The fold's test shapes are its validation set and the
reported number is the best epoch's accuracy on them (``tools/runner_finetune.py``); the head has 40
outputs (``cls_dim: 40``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from pkd.common.config import option
from pkd.common.errors import ConfigError, DataError
from pkd.common.options import with_options
from pkd.train.checkpoint import LAST
from pkd.train.downstream import metrics
from pkd.train.downstream.classification import ClassificationTask, load_modelnet_split
from pkd.train.downstream.commands import Init, Overwrite, Resume, RunDir, option_parameters, run_dir_for, summary
from pkd.train.downstream.config import ClassificationConfig, ModelNetData, redefault
from pkd.train.downstream.engine import RESULTS, finetune
from pkd.train.downstream.files import normalize_unit_sphere, require_file
from pkd.train.downstream.modelnet import ShapeSet
from pkd.train.downstream.registry import Benchmark, register
from pkd.train.downstream.results import make_records, write_results

FOLDS = 10
TEST_PER_CLASS = 20  # generate_few_shot_data.py: eval_sample=20
NUM_OUTPUTS = 40  # cfgs/fewshot.yaml: cls_dim 40
PROTOCOL = "Point-MAE cfgs/fewshot.yaml, tools/runner_finetune.py"
SAFE_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class FoldUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and scalars and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a few-shot fold file")


def fold_path(folds: str | Path, way: int, shot: int, fold: int) -> Path:
    return Path(folds) / f"{way}way_{shot}shot" / f"{fold}.pkl"


def _shapes(path: Path, items: Any, split: str) -> ShapeSet:
    if not isinstance(items, list) or not items:
        raise DataError(
            f"{path}: '{split}' is not a non-empty list of (points, label, class) tuples; use the published fold files."
        )
    points, labels = [], []
    for item in items:
        if not (
            isinstance(item, tuple)
            and len(item) == 3
            and isinstance(item[0], np.ndarray)
            and item[0].ndim == 2
            and item[0].shape[1] >= 3
        ):
            raise DataError(
                f"{path}: a '{split}' entry is not (points (P, ≥3), label, class); use the published fold files."
            )
        points.append(normalize_unit_sphere(np.asarray(item[0][:, :3], dtype=np.float32)))
        labels.append(int(item[1]))
    if len({p.shape for p in points}) != 1:
        raise DataError(f"{path}: the '{split}' clouds differ in size; use the published fold files.")
    return ShapeSet(
        np.stack(points),
        np.asarray(labels, dtype=np.int64),
        [f"{path.name}:{split}:{i}" for i in range(len(labels))],
        [],
    )


def read_fold(path: str | Path) -> tuple[ShapeSet, ShapeSet, str]:
    """(train, test, sha256) of a published fold file, loaded without running code."""
    path = require_file(
        Path(path),
        "a few-shot fold file ({way}way_{shot}shot/{fold}.pkl)",
        "Pass --fold-files pointing at the folder holding the {way}way_{shot}shot/ folders, "
        "or leave it out to generate folds from --data.",
    )
    raw = path.read_bytes()
    try:
        fold = FoldUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(
            f"refused {path}: {exc}. A fold file may hold only numpy arrays, lists, tuples, dicts, "
            "ints and strings; use the published fold files or generate folds (leave out "
            "--fold-files)."
        ) from exc
    if not isinstance(fold, dict) or set(fold) != {"train", "test"}:
        raise DataError(f"{path} is not a few-shot fold (a dict with 'train' and 'test'); use the published files.")
    return _shapes(path, fold["train"], "train"), _shapes(path, fold["test"], "test"), hashlib.sha256(raw).hexdigest()


def generate_fold(
    train: ShapeSet, test: ShapeSet, way: int, shot: int, fold: int, seed: int
) -> tuple[ShapeSet, ShapeSet]:
    """A fold drawn from full ModelNet40 splits: ``way`` classes, ``shot`` train and 20 test shapes each,
    relabelled 0…way-1 in draw order; fixed by (seed, way, shot, fold)."""
    rng = np.random.default_rng([seed, way, shot, fold])
    classes = sorted(set(train.labels.tolist()))
    if len(classes) < way:
        raise DataError(f"{way}-way folds need {way} classes; the ModelNet40 training shapes cover {len(classes)}.")
    picked = rng.permutation(classes)[:way]
    parts: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for label, key in enumerate(picked):
        for split, shapes, count in (("train", train, shot), ("test", test, TEST_PER_CLASS)):
            members = np.flatnonzero(shapes.labels == key)
            if len(members) < count:
                raise DataError(
                    f"class {shapes.classes[key]} has {len(members)} {split} shapes, fewer than the "
                    f"{count} a {way}-way {shot}-shot fold needs; use the full ModelNet40."
                )
            parts[split] += [(shapes.points[i], label) for i in rng.choice(members, count, replace=False)]
    out = []
    for split, items in parts.items():
        order = rng.permutation(len(items))
        out.append(
            ShapeSet(
                np.stack([items[i][0] for i in order]),
                np.asarray([items[i][1] for i in order]),
                [f"generated:{split}:{i}" for i in order],
                [],
            )
        )
    return out[0], out[1]


@dataclass(frozen=True, kw_only=True)
class FewShotConfig(ModelNetData, ClassificationConfig):
    """Point-MAE's ``cfgs/fewshot.yaml``: 150 epochs, 1024 points, 64 groups, 40 outputs, run without --vote;
    5-way 10-shot is the first of the four settings papers report. ``fold`` is the fold index (the CLI runs one
    per ``--fold``), ``folds`` the folder of published ``{way}way_{shot}shot/{fold}.pkl`` (None: generated)."""

    epochs: int = redefault(ClassificationConfig, "epochs", 150)
    way: int = option(5, "classes per fold (5 or 10)")
    shot: int = option(10, "training shapes per class (10 or 20)")
    fold: int = 0
    folds: str | None = None


def fewshot_task(cfg: FewShotConfig) -> ClassificationTask:
    """One fold of ``cfg.way``-way ``cfg.shot``-shot ModelNet40, from a fold file or generated."""
    if cfg.way < 2 or cfg.shot < 1:
        raise DataError(f"few-shot needs --way ≥ 2 and --shot ≥ 1, got {cfg.way} and {cfg.shot}.")
    if cfg.folds:
        train, test, digest = read_fold(fold_path(cfg.folds, cfg.way, cfg.shot, cfg.fold))
        source: dict[str, Any] = {"source": str(fold_path(cfg.folds, cfg.way, cfg.shot, cfg.fold)), "sha256": digest}
    else:
        train, test = generate_fold(
            load_modelnet_split(cfg, "train"), load_modelnet_split(cfg, "test"), cfg.way, cfg.shot, cfg.fold, cfg.seed
        )
        source = {"source": "generated from ModelNet40", "seed": cfg.seed}
    classes = [f"fold class {i}" if i < cfg.way else f"unused {i}" for i in range(NUM_OUTPUTS)]
    return ClassificationTask(
        cfg,
        train,
        test,
        classes,
        f"fewshot/{cfg.way}way{cfg.shot}shot",
        PROTOCOL,
        extra={"fold": {"index": cfg.fold, **source}},
    )


def run_fewshot(
    cfg: FewShotConfig,
    run_dir: str | Path,
    folds: list[int],
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune every fold in ``folds`` under ``run_dir/fold<k>``; ``run_dir/results.json`` then holds the
    accuracy of every finished fold in ``run_dir`` (these and earlier ones) and their mean ± std (population).
    ``resume`` continues folds that have a ``last.pt`` and starts the others."""
    run_dir = Path(run_dir)
    for fold in folds:
        fold_dir = run_dir / f"fold{fold}"
        result = finetune(
            fewshot_task,
            dataclasses.replace(cfg, fold=fold),
            fold_dir,
            resume=resume and (fold_dir / LAST).is_file(),
            overwrite=overwrite,
            progress=progress,
        )
    per_fold = finished_folds(run_dir, result["records"][0]["settings"])
    summary = metrics.mean_std_best(list(per_fold.values()))
    records = make_records(
        result["records"][0]["benchmark"],
        {"fold_mean": summary["mean"], "fold_std": summary["std"]},
        init_report=result["init"],
        config=result["config"],
        data={"used": len(per_fold), "listed": FOLDS, "split": "folds"},
        protocol=PROTOCOL,
        run_dir=run_dir,
    )
    payload = {
        "task": "fewshot",
        "folds": {str(k): v for k, v in sorted(per_fold.items())},
        "summary": summary,
        "fold_source": result["data"]["fold"]["source"],
        "config": result["config"],
    }
    return write_results(run_dir / RESULTS, payload, records)


def finished_folds(run_dir: Path, settings: str) -> dict[int, float]:
    """fold → test accuracy of every ``fold<k>/results.json`` in ``run_dir``; ConfigError for a fold run with
    other settings (its accuracy would not belong in the mean)."""
    found = {}
    for path in run_dir.glob("fold*/" + RESULTS):
        result = json.loads(path.read_text())
        if result["records"][0]["settings"] != settings:
            raise ConfigError(
                f"{path.parent} was run with other settings than this run; use another --run-dir "
                "for these settings, or --overwrite that fold."
            )
        found[int(result["config"]["fold"])] = result["test"]["overall_acc"]
    return found


@with_options(option_parameters(FewShotConfig))
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
    sources = [p for p in (data, fold_files) if p is not None]
    if len(sources) != 1:
        raise ConfigError("pass either --fold-files (the published folds) or --data (ModelNet40, to generate them).")
    given = {k: v for k, v in options.items() if v is not None}
    cfg = FewShotConfig(
        task="fewshot", data=str(sources[0]), init=init, folds=str(fold_files) if fold_files else None, **given
    )
    out = run_dir_for(FEWSHOT, cfg, run_dir)
    results = run_fewshot(cfg, out, fold or list(range(FOLDS)), resume=resume, overwrite=overwrite)
    typer.echo(
        f"{cfg.way}-way {cfg.shot}-shot from {init}: {summary(results)} over folds "
        f"{', '.join(results['folds'])} ({results['fold_source']}) → {out}/results.json"
    )


FEWSHOT = register(
    Benchmark(
        name="fewshot",
        config=FewShotConfig,
        build=fewshot_task,
        summary=finetune_fewshot.__doc__ or "",
        data_help="modelnet40_normal_resampled, to generate folds",
        finetune_command=finetune_fewshot,
        run_name=lambda cfg: f"fewshot-{cfg.way}way{cfg.shot}shot",
    )
)
