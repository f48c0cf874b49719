"""pkd-train: train students from a pair store, run ablations, export Point-MAE encoder weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pkd.common import logs
from pkd.common.cli import run_app
from pkd.train.downstream.cli import compare_runs, finetune_app, probe_app, test_app
from pkd.train.options import config_options

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.callback()(logs.cli_options)

DEFAULT_VARIANTS = ("distill", "no-concept", "clip-target", "recon", "recon+distill")
Store = Annotated[Path, typer.Argument(help="pair store written by pkd-prep (pairs.zarr)")]
Resume = Annotated[
    bool,
    typer.Option(
        help="continue with the run's recorded settings (options given must match "
        "them, except run options such as --loader-workers, --device, "
        "--stop-after)"
    ),
]


@app.command()
@config_options()
def distill(
    ctx: typer.Context,
    store: Store,
    run_dir: Annotated[Path | None, typer.Option(help="output folder (default runs/<store>-<variant>)")] = None,
    resume: Resume = False,
    overwrite: Annotated[bool, typer.Option(help="delete an existing --run-dir first")] = False,
    tensorboard: Annotated[
        bool,
        typer.Option(
            help="also write metrics.jsonl's scalars to RUN_DIR/tensorboard (needs pip install 'pkd[tensorboard]')"
        ),
    ] = False,
    **options: Any,
) -> None:
    """Train one student on STORE (no teacher is loaded: targets come from the store)."""
    from pkd.common.store import store_path
    from pkd.train.options import build_config, given_options, resume_config
    from pkd.train.trainer import recorded_config, train

    run_dir = run_dir or Path("runs") / f"{Path(store).stem}-{options['variant']}"
    if resume:
        cfg = resume_config(recorded_config(run_dir), store_path(store), given_options(ctx, options), str(run_dir))
    else:
        cfg = build_config(str(store), options)
    summary = train(cfg, run_dir, resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    if summary["rank"]:
        return  # under torchrun only rank 0 reports
    held_out = "" if summary["val_loss"] is None else f", held-out loss {summary['val_loss']:.4g}"
    warmup = " (stopped inside warm-up)" if summary["in_warmup"] else ""
    typer.echo(
        f"{summary['variant']}: {summary['steps']} of {summary['schedule_steps']} steps{warmup}, final loss "
        f"{summary['final_loss']:.4g}{held_out}, {summary['samples_per_s']:.1f} samples/s → {run_dir}"
    )


@app.command()
@config_options(exclude=("variant", "seed", "targets"))
def ablate(
    ctx: typer.Context,
    store: Store,
    paper: Annotated[
        bool,
        typer.Option(
            help="every row of the paper's Tables 5 and 6 (scratch, no-concept, clip-target, local, distill, recon, "
            "recon+distill), read out by ModelNet40 fine-tuning without voting; the store needs a val split and "
            "patch tokens (pkd-prep scannet --split all --patch-tokens)"
        ),
    ] = False,
    variants: Annotated[
        str | None,
        typer.Option(
            help=f"comma-separated variants ('scratch': the readout of an untrained encoder) [default: "
            f"{','.join(DEFAULT_VARIANTS)}]"
        ),
    ] = None,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds: every variant (and readout) once per seed")] = "0",
    targets: Annotated[
        str | None,
        typer.Option(
            help="comma-separated SET/ARRAY target sets (e.g. clipcap/clip_embed,dino/embed): every variant that "
            "regresses a target once per listed target, recon rows once [default: each variant's own array of the "
            "clipcap set]"
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="writes runs/ablate-NAME (default: the store's name)")] = None,
    out: Annotated[Path | None, typer.Option(help="the ablation's folder (default runs/ablate-NAME)")] = None,
    readout: Annotated[
        str | None,
        typer.Option(
            "--eval",
            help="readout per encoder on ModelNet40, without voting: probe (linear SVM), "
            "finetune (adds scratch rows) or none [default: probe; finetune with --paper]",
        ),
    ] = None,
    eval_data: Annotated[Path | None, typer.Option(help="ModelNet40 folder (modelnet40_normal_resampled)")] = None,
    eval_splits: Annotated[Path | None, typer.Option(help="ModelNet40 split lists, if not inside --eval-data")] = None,
    allow_missing: Annotated[bool, typer.Option(help="readout on the listed ModelNet40 shapes that exist")] = False,
    eval_epochs: Annotated[int | None, typer.Option(help="fine-tuning epochs of the readout (default 300)")] = None,
    eval_batch_size: Annotated[int | None, typer.Option(help="fine-tuning batch of the readout (default 32)")] = None,
    eval_cache_dir: Annotated[Path, typer.Option(help="cache of the readout's ModelNet40 FPS pools")] = Path(
        "runs/cache"
    ),
    resume: Annotated[
        bool,
        typer.Option(
            help="finish or extend the ablation of an earlier call (its settings are used; new --variants/--seeds "
            "add rows; failed stages are retried, finished encoders never trained again)"
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing ablation folder")] = False,
    **options: Any,
) -> None:
    """Pre-train every variant (per seed) with the same settings, read each encoder out on ModelNet40, and
    write table.json, table.md and table.png under runs/ablate-NAME. Every input is checked before the first
    pre-training (exit 2); a stage that fails later marks its row failed and the command exits 1."""
    from pkd.common.errors import ConfigError
    from pkd.common.store import store_path
    from pkd.train.ablate import PAPER_VARIANTS, Readout, run_ablation
    from pkd.train.config import TrainConfig, upgrade_config
    from pkd.train.options import build_config, given_options, resume_config
    from pkd.train.table import TABLE_JSON, markdown, row_label

    if paper and (variants is not None or readout not in (None, "finetune")):
        raise ConfigError(
            "--paper runs the paper's rows with the fine-tune readout; drop --variants and --eval, or drop --paper."
        )
    out = out or Path("runs") / f"ablate-{name or Path(store).stem}"
    base = build_config(str(store), options)
    if resume and (out / TABLE_JSON).is_file():
        recorded = json.loads((out / TABLE_JSON).read_text())["config"]  # tables are version-1 records
        saved = TrainConfig.from_dict(upgrade_config(recorded), str(out / TABLE_JSON))
        base = resume_config(saved, store_path(store), given_options(ctx, options), str(out))
    rows = run_ablation(
        base,
        list(PAPER_VARIANTS) if paper else _split(variants or ",".join(DEFAULT_VARIANTS), str),
        _split(seeds, int),
        out,
        Readout(
            readout or ("finetune" if paper else "probe"),
            str(eval_data) if eval_data else None,
            str(eval_splits) if eval_splits else None,
            allow_missing,
            eval_epochs,
            eval_batch_size,
            str(eval_cache_dir),
        ),
        resume=resume,
        overwrite=overwrite,
        require_val=paper,
        targets=_split(targets, str) if targets else None,
    )
    typer.echo(markdown(rows) + f"→ {out}/table.md")
    failed = [f"{row_label(r)} seed {r['seed']}: {r['error']}" for r in rows if r.get("status") == "failed"]
    if failed:
        typer.echo(
            f"error: {len(failed)} of {len(rows)} rows failed ({'; '.join(failed)}). Fix the cause and rerun the "
            "same command with --resume: it redoes the failed stages only.",
            err=True,
        )
        raise typer.Exit(1)


def _split(values: str, kind: type) -> list:
    try:
        return [kind(v.strip()) for v in values.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{values!r} is not a comma-separated list of {kind.__name__} ({exc})") from exc


@app.command()
def export(
    run: Annotated[
        Path,
        typer.Argument(help="run directory (uses its last.pt, with or without optimizer state) or a checkpoint file"),
    ],
    out: Annotated[Path, typer.Option(help="where to write the Point-MAE checkpoint")] = Path("encoder.pth"),
) -> None:
    """Write the student's encoder as {'base_model': {'MAE_encoder.<key>': tensor}} for Point-MAE finetuning."""
    from pkd.train.export import export_encoder

    typer.echo(f"wrote {export_encoder(run, out)}")


app.add_typer(finetune_app, name="finetune")
app.add_typer(probe_app, name="probe")
app.add_typer(test_app, name="test")
app.command("compare")(compare_runs)


def main() -> None:
    """Console entry: pkd errors print as one 'error: …' paragraph and exit 2, without a traceback."""
    run_app(app)
