"""``pkd-train ablate``: the paper's ablation tables from one call (Tables 5-6 read out on ModelNet40).

For every variant and seed (and, with ``--targets a/embed,b/embed``, every listed target set for each variant that
regresses a target; reconstruction rows once): pre-train on the store (``<out>/<variant>-seed<k>/``, or
``<out>/<variant>-<set>-<array>-seed<k>/`` per target, a normal run folder),
export its encoder (``encoder.pth`` there), and read it out on ModelNet40: ``probe`` (linear SVM on frozen
features, ``probe/``) or ``finetune`` (the registered ``modelnet40`` benchmark without voting,
``finetune/``, plus a ``scratch`` row per seed: the readout of a randomly initialised encoder).
``PAPER_VARIANTS`` are the rows of the paper's Tables 5 and 6 (``--paper``).

Every input is checked before the first pre-training (the store's splits, sets and arrays per row, ``--init``,
the readout's data through its benchmark's ``check``, the output folders), so bad input costs seconds, not
hours. A stage that fails later marks its row ``failed`` with the reason and the other rows still run;
``table.json`` is rewritten after every stage, so ``--resume`` redoes only what is not done (a failed
readout is retried, a finished encoder never trained again), and a call with more variants or seeds adds
rows without dropping any. Losses are labelled with their objective: they are not comparable across
variants; the readout accuracy is.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkd.common.errors import ConfigError, PkdError, StoreError
from pkd.common.logs import progress_bar
from pkd.common.store import DEFAULT_SET, open_split, open_store, parse_target, splits_of, teacher_crop
from pkd.train import table
from pkd.train.checkpoint import LAST
from pkd.train.config import TrainConfig, upgrade_config
from pkd.train.distributed import launched
from pkd.train.encoder import PointEncoder
from pkd.train.export import export_encoder, load_pointmae_checkpoint
from pkd.train.options import option_values, run_option_names
from pkd.train.trainer import train, with_target
from pkd.train.variants import ObjectiveConfig, variant_spec

READOUTS = ("probe", "finetune", "none")
READOUT_TASK = "modelnet40"  # the registered benchmark whose fine-tuning is the ``finetune`` readout
SCRATCH = "scratch"
# Table 5 (from scratch, w/o concept extraction, w/o caption model, direct local alignment, distillation),
# then Table 6's reconstruction rows (its "only distillation" row is Table 5's distillation)
PAPER_VARIANTS = (SCRATCH, "no-concept", "clip-target", "local", "distill", "recon", "recon+distill")
READOUT_FLAGS = re.compile(r"--(data|splits|batch-size)\b")  # ablate's --eval-data, --eval-splits, --eval-batch-size


@dataclass(frozen=True)
class Readout:
    """How each pre-trained encoder is scored on ModelNet40 (always without voting, as the paper's ablations)."""

    kind: str = "probe"
    data: str | None = None
    splits: str | None = None  # folder of the split lists, if not inside ``data``
    allow_missing: bool = False
    epochs: int | None = None  # fine-tuning epochs (default: the protocol's 300)
    batch_size: int | None = None  # fine-tuning batch (default: the protocol's 32)
    cache_dir: str | None = "runs/cache"
    pool_points: int = 8192  # the protocol's FPS pool and input size (smaller only for tests)
    num_points: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in READOUTS:
            raise ConfigError(f"unknown readout {self.kind!r}; use one of {', '.join(READOUTS)}.")
        if self.kind != "none" and not (self.data and Path(self.data).is_dir()):
            raise ConfigError(
                f"--eval {self.kind} reads ModelNet40 ({self.data or 'no --eval-data given'}): pass "
                "--eval-data path/to/modelnet40_normal_resampled, or --eval none for losses only."
            )

    def config(self, base: TrainConfig, init: str, seed: int) -> Any:
        """The probe's or the ``modelnet40`` benchmark's config reading out the encoder ``init``."""
        from pkd.train.downstream.run import FinetuneConfig, ProbeConfig

        m = base.model
        shared: dict[str, Any] = dict(
            init=init,
            seed=seed,
            device=base.device,
            splits=self.splits,
            allow_missing=self.allow_missing,
            cache_dir=self.cache_dir,
            pool_points=self.pool_points,
            num_points=self.num_points,
            dim=m.dim,
            depth=m.depth,
            heads=m.heads,
        )
        if self.kind == "probe":
            return ProbeConfig(data=str(self.data), **shared)
        return FinetuneConfig.for_task(
            READOUT_TASK, str(self.data), epochs=self.epochs, batch_size=self.batch_size, votes=0, **shared
        )

    def check(self, base: TrainConfig) -> None:
        """What the readout would refuse after hours of pre-training, found now: its config and, through the
        benchmark's ``check``, its data (folder, split lists, a sample of the files)."""
        if self.kind == "none":
            return
        from pkd.train.downstream.classification import check_modelnet_data
        from pkd.train.downstream.registry import benchmark

        cfg = self.config(base, SCRATCH, 0)
        try:
            if self.kind == "probe":
                check_modelnet_data(cfg)
            else:
                benchmark(READOUT_TASK).check_data(cfg)
        except PkdError as exc:
            message = READOUT_FLAGS.sub(r"--eval-\1", str(exc))  # the benchmark's flags as ablate spells them
            raise type(exc)(f"the ModelNet40 readout (--eval {self.kind}) cannot run: {message}") from exc


Cell = tuple[str, str | None, int]  # (variant, targets, seed): one row; targets None is the variant's own array


def cell_name(variant: str, seed: int, targets: str | None = None) -> str:
    """The folder of one row under the ablation folder."""
    return f"{variant}-{targets.replace('/', '-')}-seed{seed}" if targets else f"{variant}-seed{seed}"


def row_cell(row: dict[str, Any]) -> Cell:
    """The (variant, targets, seed) of a table row (rows without ``targets`` train the variant's own array)."""
    return row["variant"], row.get("targets"), row["seed"]


def cells_of(variants: list[str], targets: list[str], seeds: list[int]) -> list[Cell]:
    """The rows of a call: every variant per seed, once per listed target if it regresses one."""
    return [
        (v, t, s)
        for v in variants
        for t in (targets if targets and v != SCRATCH and variant_spec(v).target else [None])
        for s in seeds
    ]


def run_ablation(
    base: TrainConfig,
    variants: list[str],
    seeds: list[int],
    out_dir: str | Path,
    readout: Readout = Readout(kind="none"),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    require_val: bool = False,
    targets: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Pre-train, export and read out every (variant, seed) under ``out_dir``, per target set of ``targets``
    (``SET/ARRAY`` names; None: each variant's own array of the default set); returns the table's rows.

    Every input is checked first (a pkd error, nothing written); ``require_val`` also asks for the store's
    held-out split (``--paper``: every row's held-out loss). A stage that fails later marks its row
    ``failed`` (``status``, ``error``) and the others still run; the caller reports the failure.
    """
    if launched():
        raise ConfigError(
            "ablate runs in one process; train a variant under torchrun with `pkd-train distill` "
            "and read it out with `pkd-train probe` / `finetune`."
        )
    targets = targets or []
    _check_cells(variants, seeds, readout, targets)
    out_dir = Path(out_dir)
    base = _neutral(base)
    _check_outputs(out_dir, readout, resume, overwrite)
    cells = cells_of(variants, targets, seeds)
    _check_store(base, [(v, t) for v, t, _ in cells if v != SCRATCH], require_val)
    _check_init(base)
    readout.check(base)
    rows = _start(out_dir, base, resume, overwrite)
    if readout.kind == "finetune" and SCRATCH not in variants:
        cells += [(SCRATCH, None, s) for s in seeds]
    for variant, target, seed in cells:
        objective = ObjectiveConfig(variant=variant, targets=target).spec.objective if variant != SCRATCH else None
        row = rows.get((variant, target, seed))
        if row is None:
            row = table.new_row(variant, seed, objective, out_dir / cell_name(variant, seed, target), target)
            rows[(variant, target, seed)] = row
        _run_cell(base, row, readout, progress)
        table.write(out_dir, base.to_dict(), list(rows.values()))
    return list(rows.values())


def _check_cells(variants: list[str], seeds: list[int], readout: Readout, targets: list[str]) -> None:
    """Known variants (or ``scratch``, which needs a readout), seeds, variants and targets (``SET/ARRAY``) without
    repeats."""
    for name in variants:
        if name != SCRATCH:
            variant_spec(name)
    for target in targets:
        parse_target(target)
    if not variants or not seeds or len(set(seeds)) != len(seeds) or len(set(variants)) != len(variants):
        raise ConfigError(f"--variants and --seeds must be non-empty lists without repeats (got {variants}, {seeds}).")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"--targets must list each SET/ARRAY once (got {', '.join(targets)}).")
    if SCRATCH in variants and readout.kind == "none":
        raise ConfigError(
            f"the {SCRATCH} row is the readout of an untrained encoder; with --eval none it has nothing to "
            f"do: pass --eval finetune or probe, or leave {SCRATCH} out of --variants."
        )


def _neutral(cfg: TrainConfig) -> TrainConfig:
    """The settings shared by every cell (variant, targets and seed are the cell's)."""
    return dataclasses.replace(cfg, seed=0, model=dataclasses.replace(cfg.model, variant="distill", targets=None))


def _cell_config(base: TrainConfig, variant: str, targets: str | None, seed: int = 0) -> TrainConfig:
    """The config one row trains."""
    return dataclasses.replace(base, seed=seed, model=dataclasses.replace(base.model, variant=variant, targets=targets))


def _check_outputs(out_dir: Path, readout: Readout, resume: bool, overwrite: bool) -> None:
    """Refuse a call that would clobber an ablation or other files silently, or could not write its outputs."""
    has_table = (out_dir / table.TABLE_JSON).is_file()
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both.")
    if resume and not has_table:
        raise ConfigError(f"nothing to resume in {out_dir} (no {table.TABLE_JSON}); drop --resume.")
    if not resume and not overwrite:
        if has_table:
            raise ConfigError(
                f"{out_dir} holds an ablation already; pass --resume to finish or extend it, "
                "--overwrite to replace it, or choose another --name."
            )
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise ConfigError(
                f"{out_dir} holds files but no {table.TABLE_JSON} (it is no ablation of this pkd); pass "
                "--overwrite to replace it, or choose another --name or --out."
            )
    _check_writable(out_dir, "--out (or --name)")
    if readout.kind != "none" and readout.cache_dir:
        _check_writable(Path(readout.cache_dir), "--eval-cache-dir")


def _check_writable(path: Path, flag: str) -> None:
    """``path`` exists as a writable folder or can be created in one; ConfigError naming ``flag`` otherwise."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write {path}: {existing} is a file, not a folder; pass {flag} with a folder.")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path}: {existing} is not writable ({exc.strerror or exc}); pass {flag} with a "
            "folder you can write, or fix its permissions or free space."
        ) from exc


def _check_store(base: TrainConfig, cells: list[tuple[str, str | None]], require_val: bool) -> None:
    """Each row's target set and arrays in the training split (``trainer.with_target``: an unknown set or array,
    a shape its variant cannot train on) and, where it exists (or ``require_val``), the held-out one."""
    held = splits_of(open_store(base.store))
    if require_val and base.val_split not in held:
        raise StoreError(
            f"{base.store} has no {base.val_split!r} split ({', '.join(held) or 'no splits'}), which --paper needs "
            "for every row's held-out loss; prep the store with `pkd-prep scannet --split all` (train and val "
            "scenes), or pass --val-split with a split it holds."
        )
    for name, targets in dict.fromkeys(cells):
        cfg = _cell_config(base, name, targets)
        spec, target = cfg.model.spec, cfg.model.target
        try:
            with_target(cfg)
            for split in (base.split, *([base.val_split] if base.val_split in held else [])):
                open_split(base.store, split, require=spec.arrays)
            if spec.needs_crop:
                teacher_crop(base.store, base.split, target[0] if target else DEFAULT_SET)
        except PkdError as exc:
            what = f"variant {name}" + (f" on --targets {targets}" if targets else "")
            leave = "that target out (--targets)" if targets else f"{name} out (--variants)"
            fix = "Prep the store again with that flag, or" if isinstance(exc, StoreError) else "Fix it, or"
            raise type(exc)(f"{what} cannot train on this store: {exc} {fix} leave {leave}.") from exc


def _check_init(base: TrainConfig) -> None:
    """``--init`` loads into the encoder every variant starts from."""
    if base.init:
        load_pointmae_checkpoint(base.init, PointEncoder.from_config(base.model))


def _start(out_dir: Path, base: TrainConfig, resume: bool, overwrite: bool) -> dict[Cell, dict]:
    """The rows of an earlier call (``--resume``), or a fresh table; refuses to mix settings."""
    path = out_dir / table.TABLE_JSON
    if not resume:
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        table.write(out_dir, base.to_dict(), [])
        return {}
    recorded = json.loads(path.read_text())
    saved = option_values(TrainConfig.from_dict(upgrade_config(recorded["config"]), str(path)))
    mine = option_values(base)
    differ = [k for k in mine if k not in run_option_names() and saved.get(k) != mine[k]]
    if differ or recorded["config"]["store"] != base.store:
        raise ConfigError(
            f"{out_dir} was run with other settings ({', '.join(differ) or 'store'}); resume with the "
            "same options, or choose another --name."
        )
    return {row_cell(r): table.upgrade_row(r) for r in recorded["rows"]}


def _run_cell(base: TrainConfig, row: dict[str, Any], readout: Readout, progress: bool) -> None:
    """The stages of one row that are not done yet: pre-train, export, readout. A stage that fails marks the
    row failed with its reason; the stages done stay done (a finished pre-training is never repeated)."""
    variant, seed, cell = row["variant"], row["seed"], Path(row["run_dir"])
    label = table.row_label(row) + f" seed {seed}"
    row.update(status="running", error=None)
    stage = "pre-training"
    try:
        init = SCRATCH
        if variant != SCRATCH:
            if row["steps"] is None:
                _pretrain(base, row, progress, label)
            stage = "export"
            encoder = cell / "encoder.pth"
            if not encoder.is_file():
                export_encoder(cell, encoder)
            init = str(encoder)
        if readout.kind != "none" and row[f"{readout.kind}_oa"] is None:
            stage = f"{readout.kind} readout"
            tic = time.perf_counter()
            with progress_bar(total=1, desc=f"{label} {readout.kind}", disable=not progress) as bar:
                row[f"{readout.kind}_oa"] = _readout(readout, readout.config(base, init, seed), cell, progress)
                bar.update(1)
            row["wall_s"] += time.perf_counter() - tic
    except PkdError as exc:
        row.update(status="failed", error=f"{stage} failed: {exc}")
        return
    row["status"] = "done"


def _pretrain(base: TrainConfig, row: dict[str, Any], progress: bool, label: str) -> None:
    """Train (or continue) the row's encoder and record its losses and steps."""
    cell = Path(row["run_dir"])
    tic = time.perf_counter()
    cfg = _cell_config(base, row["variant"], row.get("targets"), row["seed"])
    resume = (cell / LAST).is_file()
    summary = train(
        cfg, cell, resume=resume, overwrite=cell.exists() and not resume, progress=progress, desc=f"{label} pretrain"
    )
    row.update(
        train_loss=summary["final_loss"],
        val_loss=summary["val_loss"],
        steps=summary["steps"],
        in_warmup=summary["in_warmup"],
        wall_s=row["wall_s"] + time.perf_counter() - tic,
    )


def _readout(readout: Readout, cfg: Any, cell: Path, progress: bool) -> float:
    """ModelNet40 overall accuracy (percent, no voting) of the encoder ``cfg.init``."""
    from pkd.train.downstream.run import probe_modelnet40, run_finetune

    run_dir = cell / readout.kind  # an unfinished readout of this row (none is recorded) is ours to replace
    if readout.kind == "probe":
        results = probe_modelnet40(cfg, run_dir, overwrite=run_dir.exists())
    else:
        resume = (run_dir / LAST).is_file()
        results = run_finetune(
            cfg, run_dir, resume=resume, overwrite=run_dir.exists() and not resume, progress=progress
        )
    return float(results["test"]["overall_acc"])  # percent, as results.json holds it
