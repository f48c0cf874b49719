"""``pkd-train ablate``: the paper's ablation table from one call (Tables 5-6 read out on ModelNet40).

For every variant and seed: pre-train on the store (``<out>/<variant>-seed<k>/``, a normal run folder),
export its encoder (``encoder.pth`` there), and read it out on ModelNet40: ``probe`` (linear SVM on frozen
features, ``probe/``) or ``finetune`` (fine-tuning without voting, ``finetune/``, plus a ``scratch`` row per
seed). ``table.json`` is rewritten after every stage, so ``--resume`` finishes what an interrupted call
left, and a call with more variants or seeds adds rows without dropping any. Losses are labelled with
their objective: they are not comparable across variants; the readout accuracy is.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkd.common.errors import ConfigError, PkdError
from pkd.common.logs import progress_bar
from pkd.train import table
from pkd.train.checkpoint import LAST
from pkd.train.config import TrainConfig, upgrade_config
from pkd.train.distributed import launched
from pkd.train.export import export_encoder
from pkd.train.options import option_values, run_option_names
from pkd.train.trainer import train
from pkd.train.variants import variant_spec

READOUTS = ("probe", "finetune", "none")
SCRATCH = "scratch"


@dataclass(frozen=True)
class Readout:
    """How each pre-trained encoder is scored on ModelNet40."""

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


def cell_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def run_ablation(
    base: TrainConfig,
    variants: list[str],
    seeds: list[int],
    out_dir: str | Path,
    readout: Readout = Readout(kind="none"),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Pre-train, export and read out every (variant, seed) under ``out_dir``; returns the table's rows.

    A variant the store cannot serve (e.g. ``local`` without patch tokens) gets a row with its error and
    the others still run.
    """
    if launched():
        raise ConfigError(
            "ablate runs in one process; train a variant under torchrun with `pkd-train distill` "
            "and read it out with `pkd-train probe` / `finetune`."
        )
    for name in variants:
        variant_spec(name)
    if not variants or not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--variants and --seeds must be non-empty lists without repeats (got {variants}, {seeds}).")
    out_dir = Path(out_dir)
    base = _neutral(base)
    rows = _start(out_dir, base, resume, overwrite)
    cells = [(v, s) for v in variants for s in seeds]
    if readout.kind == "finetune":
        cells += [(SCRATCH, s) for s in seeds]
    for variant, seed in cells:
        key = (variant, seed)
        row = rows.setdefault(
            key,
            table.new_row(
                variant,
                seed,
                variant_spec(variant).objective if variant != SCRATCH else None,
                out_dir / cell_name(variant, seed),
            ),
        )
        try:
            _run_cell(base, row, readout, progress)
        except PkdError as exc:
            row["error"] = str(exc)
        table.write(out_dir, base.to_dict(), list(rows.values()))
    return list(rows.values())


def _neutral(cfg: TrainConfig) -> TrainConfig:
    """The settings shared by every cell (variant and seed are the cell's)."""
    return dataclasses.replace(cfg, seed=0, model=dataclasses.replace(cfg.model, variant="distill"))


def _start(out_dir: Path, base: TrainConfig, resume: bool, overwrite: bool) -> dict[tuple[str, int], dict]:
    """The rows of an earlier call (``--resume``), or none; refuses to mix settings or clobber silently."""
    path = out_dir / table.TABLE_JSON
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both.")
    if path.is_file() and not resume:
        if not overwrite:
            raise ConfigError(
                f"{out_dir} holds an ablation already; pass --resume to finish or extend it, "
                "--overwrite to replace it, or choose another --name."
            )
        shutil.rmtree(out_dir)
    if not path.is_file():
        if resume:
            raise ConfigError(f"nothing to resume in {out_dir} (no {table.TABLE_JSON}); drop --resume.")
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
    return {(r["variant"], r["seed"]): r for r in recorded["rows"]}


def _run_cell(base: TrainConfig, row: dict[str, Any], readout: Readout, progress: bool) -> None:
    """The stages of one row that are not done yet: pre-train, export, readout."""
    variant, seed, cell = row["variant"], row["seed"], Path(row["run_dir"])
    label = f"{variant} seed {seed}"
    init = SCRATCH
    if variant != SCRATCH:
        if row["steps"] is None or row.get("error"):
            row.pop("error", None)
            tic = time.perf_counter()
            cfg = dataclasses.replace(base, seed=seed, model=dataclasses.replace(base.model, variant=variant))
            resume = (cell / LAST).is_file()
            summary = train(
                cfg,
                cell,
                resume=resume,
                overwrite=cell.exists() and not resume,
                progress=progress,
                desc=f"{label} pretrain",
            )
            row.update(
                train_loss=summary["final_loss"],
                val_loss=summary["val_loss"],
                steps=summary["steps"],
                in_warmup=summary["in_warmup"],
                wall_s=row["wall_s"] + time.perf_counter() - tic,
            )
        encoder = cell / "encoder.pth"
        if not encoder.is_file():
            export_encoder(cell, encoder)
        init = str(encoder)
    if readout.kind == "none" or row[f"{readout.kind}_oa"] is not None:
        return
    tic = time.perf_counter()
    with progress_bar(total=1, desc=f"{label} {readout.kind}", disable=not progress) as bar:
        row[f"{readout.kind}_oa"] = _readout(base, readout, init, seed, cell, progress)
        bar.update(1)
    row["wall_s"] += time.perf_counter() - tic


def _readout(base: TrainConfig, readout: Readout, init: str, seed: int, cell: Path, progress: bool) -> float:
    """ModelNet40 overall accuracy (percent, no voting) of the encoder ``init``."""
    from pkd.train.downstream.run import FinetuneConfig, ProbeConfig, probe_modelnet40, run_finetune

    m = base.model
    shared: dict[str, Any] = dict(
        init=init,
        seed=seed,
        device=base.device,
        splits=readout.splits,
        allow_missing=readout.allow_missing,
        cache_dir=readout.cache_dir,
        pool_points=readout.pool_points,
        num_points=readout.num_points,
        dim=m.dim,
        depth=m.depth,
        heads=m.heads,
    )
    run_dir = cell / readout.kind  # an unfinished readout of this row (none is recorded) is ours to replace
    if readout.kind == "probe":
        results = probe_modelnet40(ProbeConfig(data=str(readout.data), **shared), run_dir, overwrite=run_dir.exists())
    else:
        cfg = FinetuneConfig.for_task(
            "modelnet40", str(readout.data), epochs=readout.epochs, batch_size=readout.batch_size, votes=1, **shared
        )
        resume = (run_dir / LAST).is_file()
        results = run_finetune(
            cfg, run_dir, resume=resume, overwrite=run_dir.exists() and not resume, progress=progress
        )
    return float(results["test"]["overall_acc"])  # percent, as results.json holds it
