"""The training loop: AdamW, linear warm-up + cosine per step, metrics, plots, atomic resumable checkpoints.

Read ``_train`` top to bottom: ``_setup`` opens the data and builds the student, ``_start`` restores or
records the run, then the loop runs over epochs and micro-batches (``_micro_batch``, ``_optimizer_step``)
and ``_finish`` ends the launch; the run folder, resume rule and checkpoint format are ``pkd.train.runs``'s,
the learning rate ``pkd.train.schedule``'s. Every random draw is reproducible: the loader's order from
(seed, epoch), the augmentation and masks from (seed, micro-batch index), drop-path from the torch RNG
saved in checkpoints, so a resumed run continues bit-identically.

Under ``torchrun`` (see ``pkd.train.distributed``) every process runs ``train``: the model is wrapped in
DistributedDataParallel, ``batch_size`` stays the global batch and each rank reads whole shards of its
own data streams (``pkd.train.data``), augmenting and masking each stream's chunk with the generator of
(seed, micro-batch, stream). The global batch is therefore the same for any world size dividing
``streams``, and so is the loss curve (up to float rounding and drop-path, whose masks come from each
rank's torch RNG). Rank 0 alone writes config.json, metrics and checkpoints; the loss it logs is the mean
over ranks; checkpoints hold the unwrapped model and the position in global steps, so a run resumes
under any world size that divides ``streams``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.nn.parallel import DistributedDataParallel

from pkd.common.errors import ConfigError
from pkd.common.logs import progress_bar
from pkd.common.store import open_split, open_store, store_path, teacher_crop
from pkd.train import distributed, runs
from pkd.train.augment import augment
from pkd.train.checkpoint import LAST, load_checkpoint, rng_state, set_rng_state
from pkd.train.config import TrainConfig
from pkd.train.data import LoaderConfig, StoreLoader, target_stats
from pkd.train.distributed import DistInfo, unwrap
from pkd.train.export import load_pointmae_checkpoint
from pkd.train.heldout import HeldOut, has_heldout
from pkd.train.losses import CropBox, LossSettings, compute_loss
from pkd.train.metrics import TENSORBOARD, MetricsLog, TensorBoardSink
from pkd.train.model import Student, variant_spec
from pkd.train.runs import batch_generator, param_groups, prepare_run_dir, rank_seed, run_fields
from pkd.train.schedule import Schedule, lr_at

log = logging.getLogger(__name__)
NAN_FIX = "Check the store's targets for NaN/inf or lower --lr."


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where training stands: optimizer steps done, current epoch, micro-batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What the loop needs, built by ``_setup``: the resolved config, data, loss settings, schedule, model."""

    cfg: TrainConfig
    loader: StoreLoader
    settings: LossSettings
    heldout: HeldOut | None
    sched: Schedule
    epoch_batches: int
    device: torch.device
    model: Student
    optimizer: torch.optim.Optimizer

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast under ``amp`` (CUDA only), else nothing."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cfg.amp else nullcontext()


def open_data(cfg: TrainConfig, rank_info: DistInfo = DistInfo()) -> tuple[StoreLoader, LossSettings, HeldOut | None]:
    """The loader, loss settings and held-out data of a run; StoreError/ConfigError if the store cannot serve
    the variant."""
    spec = variant_spec(cfg.variant)
    group = open_split(cfg.store, cfg.split, require=spec.arrays)
    crop = CropBox(*teacher_crop(cfg.store, cfg.split)) if spec.head == "token" else None
    stats = {spec.target: target_stats(group, spec.target)} if cfg.normalize_targets and spec.target else {}
    loader = StoreLoader(
        LoaderConfig(
            cfg.store,
            cfg.split,
            spec.arrays,
            cfg.batch_size,
            cfg.model.num_points,
            cfg.seed,
            cfg.shuffle_shards,
            rank_info.rank,
            rank_info.world_size,
            cfg.streams or rank_info.world_size,
        ),
        cfg.loader_workers,
        stats,
    )
    settings = LossSettings.of(cfg.model, cfg.recon_weight, crop)
    heldout = None
    if has_heldout(cfg):
        heldout = HeldOut(cfg, spec.arrays, stats, settings, max(1, cfg.batch_size // rank_info.world_size))
    return loader, settings, heldout


def write_config(run_dir: Path, cfg: TrainConfig, loader: StoreLoader, world_size: int = 1) -> None:
    """Record the run: its config, the store it reads (teacher, prep, samples) and the launch's world size."""
    root = open_store(cfg.store)
    num_samples = int(cast(int, loader.group.attrs["num_samples"]))
    runs.write_config(
        run_dir,
        cfg.to_dict(),
        store={
            "path": cfg.store,
            "split": cfg.split,
            "teacher": root.attrs.get("teacher"),
            "prep": root.attrs.get("prep"),
            "num_samples": num_samples,
        },
        launch={"world_size": world_size},
    )


def read_config(run_dir: Path) -> TrainConfig:
    """The config a run recorded in its config.json; ConfigError when there is none."""
    return TrainConfig.from_dict(runs.read_config(run_dir))


def restore(
    ckpt: dict[str, Any],
    run_dir: Path,
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_info: DistInfo = DistInfo(),
) -> Position:
    """Load checkpoint ``ckpt`` into model and optimizer, restore RNGs; refuse a checkpoint of other settings
    (``runs.check_resume``: only run options may differ).

    Rank r > 0 restores its own RNG state when the checkpoint was written by as many processes, else it
    reseeds from (seed, rank, step): only drop-path draws from it.
    """
    pos = Position(**ckpt["position"])
    saved = TrainConfig.from_dict({"streams": 1, **ckpt["config"]}).to_dict()
    runs.restore_training({**ckpt, "config": saved}, cfg.to_dict(), run_fields(TrainConfig), run_dir, model, optimizer)
    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(ranks) == rank_info.world_size:
        set_rng_state(ranks[rank_info.rank])
    elif rank_info.main:
        set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(rank_seed(cfg.seed, rank_info.rank, pos.step))
    return pos


def save(
    run_dir: Path, cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, pos: Position
) -> None:
    """Write ``last.pt`` (rank 0; under DDP every rank must call this: it gathers their RNG states).

    ``optimizer`` None leaves the optimizer state out (a finished run under ``--no-keep-optimizer``).
    """
    states = distributed.all_gather_object(rng_state())
    if distributed.is_main():
        runs.save_checkpoint(
            run_dir / LAST,
            unwrap(model),
            optimizer,
            cfg.to_dict(),
            states[0],
            position=dataclasses.asdict(pos),
            rng_ranks=states if len(states) > 1 else [],
        )


def resolve_streams(cfg: TrainConfig, ckpt: dict[str, Any] | None, world_size: int) -> TrainConfig:
    """``streams`` made explicit: as recorded in a resumed run, else one per process of this launch."""
    if cfg.streams is not None:
        return cfg
    streams = (ckpt["config"].get("streams") or 1) if ckpt is not None else world_size
    return dataclasses.replace(cfg, streams=streams)


def with_device(cfg: TrainConfig) -> TrainConfig:
    """``device`` made explicit (``runs.resolve_device``) and ``amp`` false where it does nothing (CPU)."""
    device = runs.resolve_device(cfg.device)
    return dataclasses.replace(cfg, device=device, amp=cfg.amp and device.startswith("cuda"))


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    desc: str | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary (final and held-out loss, steps, samples/s, run_dir, whether
    it stopped inside warm-up). ``desc`` labels the progress bar (default: "train <variant>").

    ``tensorboard`` also writes the metrics as TensorBoard scalars under ``run_dir/tensorboard``.

    Under torchrun every process calls this; it joins (and afterwards leaves) the process group.
    """
    with distributed.session(cfg.device) as rank_info, runs.run_lock(Path(run_dir), rank_info):
        return _train(
            cfg, Path(run_dir), resume, overwrite, progress, desc or f"train {cfg.variant}", rank_info, tensorboard
        )


def _setup(
    cfg: TrainConfig, run_dir: Path, resume: bool, overwrite: bool, rank_info: DistInfo
) -> tuple[Setup, dict[str, Any] | None]:
    """Check the run directory (every rank alike), open the data, build the student and its optimizer; returns
    them with the checkpoint to resume from (None for a new run). Rank 0 prepares the run directory."""
    cfg = with_device(dataclasses.replace(cfg, store=store_path(cfg.store)))
    distributed.check_global_batch(cfg.batch_size, rank_info)
    prepare_run_dir(run_dir, resume, overwrite, act=False)
    ckpt = load_checkpoint(run_dir / LAST) if resume else None
    cfg = resolve_streams(cfg, ckpt, rank_info.world_size)
    loader, settings, heldout = open_data(cfg, rank_info)
    steps_per_epoch = loader.steps_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--grad-accum {cfg.grad_accum} needs more batches than the {loader.steps_per_epoch} "
            "an epoch has; lower it or the batch size."
        )
    sched = Schedule.of(
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        max_steps=cfg.max_steps,
        stop_after=cfg.stop_after,
    )
    if ckpt is not None and "optimizer" not in ckpt and ckpt["position"]["step"] < sched.stop:
        raise ConfigError(
            f"{run_dir / LAST} was saved without its optimizer state (--no-keep-optimizer) and cannot "
            "be trained further; export it, or start a new run."
        )
    distributed.barrier()  # every rank has checked the run directory before rank 0 changes it
    if rank_info.main:
        prepare_run_dir(run_dir, resume, overwrite)

    runs.seed_everything(cfg.seed)
    device = distributed.local_device(cfg.device, rank_info)
    model = Student(cfg.model).to(device)
    if cfg.init and not resume:
        load_pointmae_checkpoint(cfg.init, model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    return Setup(
        cfg=cfg,
        loader=loader,
        settings=settings,
        heldout=heldout,
        sched=sched,
        epoch_batches=steps_per_epoch * cfg.grad_accum,
        device=device,
        model=model,
        optimizer=optimizer,
    ), ckpt


def _start(run: Setup, ckpt: dict[str, Any] | None, run_dir: Path, rank_info: DistInfo) -> Position:
    """Where the loop starts: the checkpoint's position restored, or step 0 of a new run (whose config rank 0
    records)."""
    if ckpt is not None:
        return restore(ckpt, run_dir, run.cfg, run.model, run.optimizer, rank_info)
    if rank_info.main:
        write_config(run_dir, run.cfg, run.loader, rank_info.world_size)
    else:
        torch.manual_seed(rank_seed(run.cfg.seed, rank_info.rank, 0))
    return Position()


def _micro_batch(
    run: Setup, ddp: torch.nn.Module, batch: dict[str, torch.Tensor], pos: Position, run_dir: Path
) -> tuple[float, dict[str, float]]:
    """Forward and backward of the micro-batch at ``pos``; returns its loss and loss parts, averaged over ranks.

    Gradients are synchronised on the last micro-batch of an optimizer step only; a NaN/inf loss stops the
    run (``runs.check_finite``).
    """
    cfg = run.cfg
    micro = pos.step * cfg.grad_accum + pos.batch % cfg.grad_accum
    generators = [batch_generator(cfg.seed, micro, s) for s in run.loader.cfg.own_streams]
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    batch["points"] = torch.cat(
        [augment(points, cfg.augment, g) for points, g in zip(batch["points"].split(run.loader.cfg.chunk), generators)]
    )
    last_micro = (pos.batch + 1) % cfg.grad_accum == 0
    with ddp.no_sync() if isinstance(ddp, DistributedDataParallel) and not last_micro else nullcontext():
        with run.autocast():
            loss, parts = compute_loss(ddp, batch, run.settings, generators[0] if len(generators) == 1 else generators)
        means = distributed.all_reduce_mean(torch.tensor([float(loss.detach()), *parts.values()], dtype=torch.float64))
        runs.check_finite(means[0], pos.step + 1, run_dir, NAN_FIX, f" (epoch {pos.epoch})")
        (loss / cfg.grad_accum).backward()
    return float(means[0]), {k: float(v) for k, v in zip(parts, means[1:])}


def _optimizer_step(run: Setup, step: int) -> float:
    """Set the learning rate of ``step`` (``schedule.lr_at``), step the optimizer and clear the gradients."""
    lr = lr_at(step, lr=run.cfg.lr, min_lr=run.cfg.min_lr, warmup=run.sched.warmup, total=run.sched.total)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    desc: str,
    rank_info: DistInfo,
    tensorboard: bool = False,
) -> dict[str, Any]:
    main = rank_info.main
    run, ckpt = _setup(cfg, run_dir, resume, overwrite, rank_info)
    pos = _start(run, ckpt, run_dir, rank_info)
    del ckpt
    cfg, sched = run.cfg, run.sched
    distributed.barrier()  # the run directory is ready
    ddp = distributed.wrap_model(run.model, rank_info, run.device)
    sinks = [TensorBoardSink(run_dir / TENSORBOARD, pos.step)] if tensorboard and main else []
    log_ = MetricsLog(run_dir, keep_until_step=pos.step, write=main, sinks=sinks)
    evaluate = _evaluator(run, log_, main)
    samples_per_step = cfg.batch_size * cfg.grad_accum

    ddp.train()
    bar = progress_bar(
        total=sched.stop, initial=pos.step, disable=not (progress and main), unit="step", desc=desc, dynamic_ncols=True
    )
    saved_at = pos.step if resume else -1
    while pos.step < sched.stop:
        tic, step_loss = time.perf_counter(), 0.0
        step_parts: dict[str, float] = {}
        for batch in run.loader.epoch(pos.epoch, start_batch=pos.batch):
            loss, parts = _micro_batch(run, ddp, batch, pos, run_dir)
            step_loss += loss / cfg.grad_accum
            step_parts = {k: step_parts.get(k, 0.0) + v / cfg.grad_accum for k, v in parts.items()}
            pos = dataclasses.replace(pos, batch=pos.batch + 1)
            if pos.batch % cfg.grad_accum:
                continue
            lr = _optimizer_step(run, pos.step)
            pos = dataclasses.replace(pos, step=pos.step + 1)
            rate = samples_per_step / (time.perf_counter() - tic)
            log_.step(step=pos.step, epoch=pos.epoch, loss=step_loss, lr=lr, samples_per_s=rate, **step_parts)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4g}", samples_s=f"{rate:.1f}")
            epoch_done = pos.batch >= run.epoch_batches
            if cfg.val_every and pos.step % cfg.val_every == 0 and not epoch_done:
                evaluate(pos)
            if cfg.save_every and pos.step % cfg.save_every == 0 and pos.step < sched.total:
                save(run_dir, cfg, ddp, run.optimizer, pos)
                saved_at = pos.step
            tic, step_loss, step_parts = time.perf_counter(), 0.0, {}
            if pos.step >= sched.stop or epoch_done:
                break
        if pos.batch >= run.epoch_batches:
            log_.epoch(epoch=pos.epoch, step=pos.step)
            evaluate(pos)
            pos = Position(step=pos.step, epoch=pos.epoch + 1, batch=0)
            if pos.step < sched.total:
                save(run_dir, cfg, ddp, run.optimizer, pos)
                saved_at = pos.step
            log_.plot(f"{run_dir.name} ({cfg.variant})")
    bar.close()
    return _finish(run, ddp, log_, evaluate, pos, saved_at, run_dir, rank_info)


def _evaluator(run: Setup, log_: MetricsLog, main: bool) -> Callable[[Position], None]:
    """``evaluate(pos)``: log the held-out loss at ``pos`` once (rank 0 computes it; the others wait)."""

    def evaluate(pos: Position) -> None:
        if run.heldout is not None and main and not log_.has("val", pos.step):
            log_.val(epoch=pos.epoch, step=pos.step, **run.heldout.evaluate(run.model, run.device, run.autocast))
        distributed.barrier()

    return evaluate


def _finish(
    run: Setup,
    ddp: torch.nn.Module,
    log_: MetricsLog,
    evaluate: Callable[[Position], None],
    pos: Position,
    saved_at: int,
    run_dir: Path,
    rank_info: DistInfo,
) -> dict[str, Any]:
    """The end of a launch: the last held-out loss and checkpoint, the plot, a warm-up warning; the summary."""
    cfg, sched = run.cfg, run.sched
    if pos.step >= sched.total and pos.batch:  # the schedule ended mid-epoch: its held-out loss too
        evaluate(pos)
    if saved_at != pos.step:  # the final state (the schedule's end or --stop-after)
        keep = cfg.keep_optimizer or pos.step < sched.total
        save(run_dir, cfg, ddp, run.optimizer if keep else None, pos)
    log_.plot(f"{run_dir.name} ({cfg.variant})")
    in_warmup = pos.step < sched.warmup
    if in_warmup and rank_info.main:
        log.warning(
            "%s stopped at step %d, inside the %d warm-up steps: its learning rate never reached --lr %g.",
            run_dir,
            pos.step,
            sched.warmup,
            cfg.lr,
        )
    distributed.barrier()  # rank 0 has written everything before any rank returns
    return {
        "run_dir": str(run_dir),
        "variant": cfg.variant,
        "steps": pos.step,
        "schedule_steps": sched.total,
        "warmup_steps": sched.warmup,
        "in_warmup": in_warmup,
        "world_size": rank_info.world_size,
        "rank": rank_info.rank,
        **log_.summary(),
    }
