"""pkd-train: train students from a pair store, run ablations, export Point-MAE encoder weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pkd.common import logs
from pkd.common.cli import run_app
from pkd.train.downstream.cli import compare_runs, finetune_app, probe_app, test_app

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.callback()(logs.cli_options)

Store = Annotated[Path, typer.Argument(help="pair store written by pkd-prep (pairs.zarr)")]


def _config(store: Path, variant: str, *, num_points: int, num_group: int, group_size: int, dim: int, depth: int,
            heads: int, device: str, no_augment: bool = False, init: Optional[Path] = None,
            drop_path: float = 0.1, **train: object):
    """A TrainConfig from CLI options; ``train`` holds options named exactly as TrainConfig fields."""
    import torch

    from pkd.train.augment import AugmentConfig
    from pkd.train.model import StudentConfig
    from pkd.train.trainer import TrainConfig

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = StudentConfig(num_points=num_points, num_group=num_group, group_size=group_size, dim=dim, depth=depth,
                          heads=heads, drop_path=drop_path, variant=variant)
    return TrainConfig(store=str(store), model=model, device=device, augment=AugmentConfig(enabled=not no_augment),
                       init=str(init) if init else None, **train)


@app.command()
def distill(
    store: Store,
    variant: Annotated[str, typer.Option(help="distill | no-concept | clip-target | local | recon | recon+distill")] = "distill",
    run_dir: Annotated[Optional[Path], typer.Option(help="output folder (default runs/<store>-<variant>)")] = None,
    split: str = "train",
    epochs: int = 250,
    warmup_epochs: int = 10,
    batch_size: Annotated[int, typer.Option(help="global batch (split over torchrun processes)")] = 32,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    num_workers: Annotated[int, typer.Option(help="loader worker processes (each reads whole shards)")] = 0,
    shuffle_shards: Annotated[int, typer.Option(help="shuffle samples within windows of this many shards")] = 4,
    normalize_targets: Annotated[bool, typer.Option(help="standardise targets with the store's stats")] = False,
    recon_weight: Annotated[float, typer.Option(help="weight of the reconstruction loss in recon+distill")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option(help="stop after this many optimizer steps")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="also checkpoint every N steps")] = None,
    num_points: Annotated[int, typer.Option(help="points per cloud fed to the student (subsampled)")] = 4096,
    num_group: Annotated[int, typer.Option(help="patches (FPS centres) per cloud")] = 64,
    group_size: Annotated[int, typer.Option(help="points per patch (kNN)")] = 32,
    dim: int = 384,
    depth: int = 12,
    heads: int = 6,
    drop_path: Annotated[float, typer.Option(help="stochastic depth (its masks differ between world sizes)")] = 0.1,
    streams: Annotated[Optional[int], typer.Option(
        help="data streams (a multiple of the torchrun process count); default: one per process")] = None,
    init: Annotated[Optional[Path], typer.Option(help="initialise the encoder from a Point-MAE checkpoint")] = None,
    no_augment: Annotated[bool, typer.Option(help="only normalise clouds, no scale/translate")] = False,
    resume: Annotated[bool, typer.Option(help="continue the run in --run-dir from its last.pt")] = False,
    overwrite: Annotated[bool, typer.Option(help="delete an existing --run-dir first")] = False,
    tensorboard: Annotated[bool, typer.Option(help="also write metrics.jsonl's scalars to RUN_DIR/tensorboard "
                                                   "(needs pip install 'pkd[tensorboard]')")] = False,
) -> None:
    """Train one student on STORE (no teacher is loaded: targets come from the store)."""
    from pkd.train.trainer import train

    cfg = _config(store, variant, num_points=num_points, num_group=num_group, group_size=group_size, dim=dim,
                  depth=depth, heads=heads, device=device, no_augment=no_augment, init=init, drop_path=drop_path,
                  streams=streams, split=split,
                  epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                  weight_decay=weight_decay, seed=seed, num_workers=num_workers, shuffle_shards=shuffle_shards,
                  normalize_targets=normalize_targets, recon_weight=recon_weight, max_steps=max_steps,
                  save_every=save_every)
    run_dir = run_dir or Path("runs") / f"{Path(store).stem}-{variant}"
    summary = train(cfg, run_dir, resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    if summary["rank"]:
        return  # under torchrun only rank 0 reports
    typer.echo(f"{summary['variant']}: {summary['steps']} steps, final loss {summary['final_loss']:.4g}, "
               f"{summary['samples_per_s']:.1f} samples/s → {run_dir}")


@app.command()
def ablate(
    store: Store,
    variants: Annotated[str, typer.Option(help="comma-separated variants")] = "distill,no-concept,clip-target,recon",
    name: Annotated[Optional[str], typer.Option(help="writes runs/ablate-NAME (default: the store's name)")] = None,
    epochs: int = 250,
    warmup_epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    num_workers: int = 0,
    normalize_targets: bool = False,
    recon_weight: float = 1.0,
    max_steps: Optional[int] = None,
    num_points: int = 4096,
    num_group: int = 64,
    group_size: int = 32,
    dim: int = 384,
    depth: int = 12,
    heads: int = 6,
    overwrite: Annotated[bool, typer.Option(help="replace existing per-variant run folders")] = False,
) -> None:
    """Train every variant with the same settings; write table.md and table.json under runs/ablate-NAME."""
    from pkd.train.run import format_table, run_ablation

    cfg = _config(store, "distill", num_points=num_points, num_group=num_group, group_size=group_size, dim=dim,
                  depth=depth, heads=heads, device=device, epochs=epochs, warmup_epochs=warmup_epochs,
                  batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers,
                  normalize_targets=normalize_targets, recon_weight=recon_weight, max_steps=max_steps)
    out = Path("runs") / f"ablate-{name or Path(store).stem}"
    rows = run_ablation(cfg, [v.strip() for v in variants.split(",") if v.strip()], out, overwrite=overwrite)
    typer.echo(format_table(rows) + f"→ {out}/table.md")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="run directory (uses its last.pt) or a checkpoint file")],
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
