"""The training loop: AdamW, linear warm-up + cosine per step, metrics, plots, atomic resumable checkpoints.

Read ``_train`` top to bottom: ``_setup`` opens the data and builds the student, ``_start`` restores or
records the run, then the loop runs over epochs and micro-batches (``_micro_batch``, ``_optimizer_step``)
and ``_finish`` ends the launch; the run folder, resume rule, state and checkpoint format are those of
``pkd.train.runs.Run`` (record kinds ``DISTILL_RUN``, ``DISTILL_CHECKPOINT``), the learning rate
``pkd.train.schedule``'s. Every random draw is reproducible: the loader's order from
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

The hot loop makes no host sync: each step's loss and parts stay on the device (``_Pending``) and are read
back together every ``--log-every`` steps and before every held-out evaluation, checkpoint and epoch end
(``_log_steps``), then logged one record per step as before; the NaN guard checks them there, naming the
step, before anything is saved. Under ``--compile on`` the forward is ``torch.compile``d
(``pkd.train.compiled``); the held-out pass and the monitor run the eager model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.nn.parallel import DistributedDataParallel

from pkd.common.errors import ConfigError
from pkd.common.logs import progress_bar
from pkd.common.signals import Interrupts
from pkd.common.store import DEFAULT_SET, open_split, open_store, store_path, target_set, teacher_crop
from pkd.train import distributed, runs
from pkd.train.augment import augment
from pkd.train.checkpoint import LAST, rng_state
from pkd.train.compiled import compile_forward, resolve
from pkd.train.config import TrainConfig
from pkd.train.data import LoaderConfig, StoreLoader, target_stats
from pkd.train.distributed import DistInfo, unwrap
from pkd.train.export import load_pointmae_checkpoint
from pkd.train.heldout import HeldOut, has_heldout
from pkd.train.loss_terms import CropBox
from pkd.train.losses import LossSettings, compute_loss
from pkd.train.metrics import TENSORBOARD, MetricsLog, TensorBoardSink
from pkd.train.model import Student
from pkd.train.monitor import ReconMonitor
from pkd.train.runs import (
    DISTILL_CHECKPOINT,
    DISTILL_RUN,
    Run,
    State,
    batch_generator,
    open_run,
    param_groups,
    rank_seed,
    run_fields,
)
from pkd.train.schedule import Schedule, lr_at

log = logging.getLogger(__name__)
NAN_FIX = "Check the store's targets for NaN/inf or lower --lr."
LOG_EVERY_CUDA = 50  # steps between host syncs on a GPU by default (CPU: every step, a sync costs nothing there)


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What the loop needs, built by ``_setup``: the resolved config, data, loss settings, schedule, model."""

    cfg: TrainConfig
    loader: StoreLoader
    settings: LossSettings
    heldout: HeldOut | None
    monitor: ReconMonitor | None
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
    spec, target = cfg.model.spec, cfg.model.target
    group = open_split(cfg.store, cfg.split, require=spec.arrays)
    crop = (
        CropBox(*teacher_crop(cfg.store, cfg.split, target[0] if target else DEFAULT_SET)) if spec.needs_crop else None
    )
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
            cfg.subsample,
        ),
        cfg.loader_workers,
        stats,
    )
    settings = LossSettings.of(cfg.model, crop)
    heldout = None
    if has_heldout(cfg):
        heldout = HeldOut(cfg, spec.arrays, stats, settings, max(1, cfg.batch_size // rank_info.world_size))
    return loader, settings, heldout


def with_target(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its model's ``target_shape`` read from the store: the sample shape the store records for the
    array it regresses (whether the split holds it is ``open_split``'s check, which every caller makes).

    StoreError naming the store's sets for an unknown set; an unknown array is ``TargetSet.path``'s error."""
    target = cfg.model.target
    if target is None:
        return cfg
    chosen = target_set(open_store(cfg.store), target[0], cfg.store)
    chosen.path(target[1])
    shape = tuple(chosen.arrays[target[1]].shape)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, target_shape=shape))


def store_record(cfg: TrainConfig, loader: StoreLoader) -> dict[str, Any]:
    """What config.json records of the store a run reads: path, split, the target set trained on (``targets``,
    ``SET/ARRAY``) and its teacher's identity (the root ``teacher`` for the default set), prep and samples."""
    root = open_store(cfg.store)
    target = cfg.model.target
    teacher = root.attrs.get("teacher")
    if target is not None and target[0] != DEFAULT_SET:
        teacher = dict(target_set(root, target[0], cfg.store).teacher)
    return {
        "path": cfg.store,
        "split": cfg.split,
        "targets": cfg.model.target_name,
        "teacher": teacher,
        "prep": root.attrs.get("prep"),
        "num_samples": int(cast(int, loader.group.attrs["num_samples"])),
    }


def recorded_config(run_dir: Path) -> TrainConfig:
    """The config a distill run recorded in its config.json (upgraded, read strictly); ConfigError when there
    is none."""
    return TrainConfig.from_dict(runs.read_config(run_dir, DISTILL_RUN), str(run_dir / runs.CONFIG))


def save(
    run: Run, cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, pos: State
) -> None:
    """Write ``last.pt`` (rank 0; under DDP every rank must call this: it gathers their RNG states).

    ``optimizer`` None leaves the optimizer state out (a finished run under ``--no-keep-optimizer``).
    """
    states = distributed.all_gather_object(rng_state())
    if run.main:
        run.save(unwrap(model), optimizer, cfg.to_dict(), pos, states[0], rng_ranks=states if len(states) > 1 else [])


def resolve_streams(cfg: TrainConfig, ckpt: dict[str, Any] | None, world_size: int) -> TrainConfig:
    """``streams`` made explicit: as recorded in a resumed run, else one per process of this launch."""
    if cfg.streams is not None:
        return cfg
    return dataclasses.replace(cfg, streams=ckpt["config"]["streams"] if ckpt is not None else world_size)


def with_device(cfg: TrainConfig) -> TrainConfig:
    """``device`` made explicit (``runs.resolve_device``), ``amp`` false where it does nothing (CPU), ``compile``
    on or off there (``pkd.train.compiled.resolve``) and ``log_every`` its default for the device."""
    device = runs.resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    return dataclasses.replace(
        cfg,
        device=device,
        amp=cfg.amp and cuda,
        compile=resolve(cfg.compile, torch.device(device)),
        log_every=cfg.log_every or (LOG_EVERY_CUDA if cuda else 1),
    )


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
    kinds = (DISTILL_RUN, DISTILL_CHECKPOINT)
    with open_run(Path(run_dir), cfg.device, kinds, resume, overwrite) as run:
        return _train(cfg, run, progress, desc or f"train {cfg.variant}", tensorboard)


def _setup(cfg: TrainConfig, run: Run) -> tuple[Setup, dict[str, Any] | None]:
    """Check the run directory (every rank alike), open the data, build the student and its optimizer; returns
    them with the checkpoint to resume from (None for a new run). Rank 0 prepares the run directory."""
    cfg = with_device(dataclasses.replace(cfg, store=store_path(cfg.store)))
    distributed.check_global_batch(cfg.batch_size, run.rank_info)
    run.check()
    ckpt = run.last()
    cfg = with_target(resolve_streams(cfg, ckpt, run.rank_info.world_size))
    loader, settings, heldout = open_data(cfg, run.rank_info)
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
            f"{run.dir / LAST} was saved without its optimizer state (--no-keep-optimizer) and cannot "
            "be trained further; export it, or start a new run."
        )
    runs.seed_everything(cfg.seed)
    device = distributed.local_device(cfg.device, run.rank_info)
    model = Student(cfg.model).to(device)
    if cfg.init and not run.resume:
        load_pointmae_checkpoint(cfg.init, model)  # a bad --init is refused before the run folder is made
    run.prepare()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    return Setup(
        cfg=cfg,
        loader=loader,
        settings=settings,
        heldout=heldout,
        monitor=ReconMonitor(cfg, settings) if cfg.monitor_recon else None,
        sched=sched,
        epoch_batches=steps_per_epoch * cfg.grad_accum,
        device=device,
        model=model,
        optimizer=optimizer,
    ), ckpt


def _start(setup: Setup, ckpt: dict[str, Any] | None, run: Run) -> State:
    """Where the loop starts: the checkpoint's state restored (``Run.restore``: only run options may differ;
    ranks > 0 without their own RNG state reseed from (seed, rank, step), only drop-path draws from it), or
    step 0 of a new run (whose config rank 0 records)."""
    cfg = setup.cfg
    if ckpt is not None:
        saved = TrainConfig.from_dict(ckpt["config"], str(run.dir / LAST)).to_dict()
        ckpt = {**ckpt, "config": saved}
        return run.restore(ckpt, State, cfg.to_dict(), run_fields(TrainConfig), setup.model, setup.optimizer, cfg.seed)
    run.write_config(
        cfg.to_dict(), store=store_record(cfg, setup.loader), launch={"world_size": run.rank_info.world_size}
    )
    if not run.main:
        torch.manual_seed(rank_seed(cfg.seed, run.rank_info.rank, 0))
    return State()


@dataclass
class _Pending:
    """Optimizer steps whose losses are still on the device, read back together by ``_log_steps``."""

    since: float = field(default_factory=time.perf_counter)  # when the first of them started
    micro: list[torch.Tensor] = field(default_factory=list)  # [loss, *parts] of each micro-batch
    steps: list[tuple[State, float]] = field(default_factory=list)  # each step's position after it, and its lr
    names: tuple[str, ...] = ()


def _micro_batch(
    setup: Setup, ddp: torch.nn.Module, forward: torch.nn.Module, batch: dict[str, torch.Tensor], pos: State
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Forward (``forward``: ``ddp``, or it compiled) and backward of the micro-batch at ``pos``; returns
    [loss, *parts] on the device, unsynchronised, and the parts' names.

    With ``--monitor-recon`` the parts hold ``monitor_recon``, measured on the augmented batch before the
    forward (``pkd.train.monitor``; a host sync). Gradients are synchronised on the last micro-batch of an
    optimizer step only.
    """
    cfg = setup.cfg
    micro = pos.step * cfg.grad_accum + pos.batch % cfg.grad_accum
    generators = [batch_generator(cfg.seed, micro, s) for s in setup.loader.cfg.own_streams]
    batch = {k: v.to(setup.device, non_blocking=True) for k, v in batch.items()}
    batch["points"] = torch.cat(
        [
            augment(points, cfg.augment, g)
            for points, g in zip(batch["points"].split(setup.loader.cfg.chunk), generators)
        ]
    )
    last_micro = (pos.batch + 1) % cfg.grad_accum == 0
    monitored: dict[str, torch.Tensor] = {}
    if setup.monitor is not None:
        probe = setup.monitor.generators(micro, setup.loader.cfg.own_streams)
        with setup.autocast():
            monitored["monitor_recon"] = torch.tensor(setup.monitor.loss(setup.model, batch["points"], probe))
    with ddp.no_sync() if isinstance(ddp, DistributedDataParallel) and not last_micro else nullcontext():
        with setup.autocast():
            loss, parts = compute_loss(
                forward, batch, setup.settings, generators[0] if len(generators) == 1 else generators
            )
        parts = {**parts, **monitored}
        (loss / cfg.grad_accum).backward()
    values = torch.stack([loss.detach().float(), *(v.to(loss.device, torch.float32) for v in parts.values())])
    return values, tuple(parts)


def _read(pending: _Pending) -> torch.Tensor:
    """The pending micro-batches' [loss, *parts] on the host in float64, averaged over ranks: the host sync."""
    return distributed.all_reduce_mean(torch.stack(pending.micro).to("cpu", torch.float64))


def _step_values(rows: torch.Tensor, pending: _Pending, pos: State, run_dir: Path) -> tuple[float, dict[str, float]]:
    """One optimizer step's loss and parts, the mean of its micro-batches' ``rows``; a NaN/inf loss stops the
    run naming the step (``runs.check_finite``)."""
    loss, parts, accum = 0.0, dict[str, float](), len(rows)
    for row in rows:
        runs.check_finite(row[0], pos.step, run_dir, NAN_FIX, f" (epoch {pos.epoch})")
        loss += float(row[0]) / accum
        parts = {k: parts.get(k, 0.0) + float(v) / accum for k, v in zip(pending.names, row[1:])}
    return loss, parts


def _log_steps(setup: Setup, pending: _Pending, log_: MetricsLog, bar: Any, run_dir: Path) -> None:
    """Read the pending steps back (``_read``) and log one record each, in order; their samples/s is the
    interval's (the device's pace, which single steps, unsynchronised, do not show). Empties ``pending``."""
    if pending.steps:
        rows, accum = _read(pending), setup.cfg.grad_accum
        rate = setup.cfg.batch_size * accum * len(pending.steps) / (time.perf_counter() - pending.since)
        for i, (pos, lr) in enumerate(pending.steps):
            loss, parts = _step_values(rows[i * accum : (i + 1) * accum], pending, pos, run_dir)
            log_.step(step=pos.step, epoch=pos.epoch, loss=loss, lr=lr, samples_per_s=rate, **parts)
        bar.update(len(pending.steps))
        bar.set_postfix(loss=f"{loss:.4g}", samples_s=f"{rate:.1f}")
    pending.micro, pending.steps, pending.since = [], [], time.perf_counter()


def _optimizer_step(setup: Setup, step: int) -> float:
    """Set the learning rate of ``step`` (``schedule.lr_at``), step the optimizer and clear the gradients."""
    lr = lr_at(step, lr=setup.cfg.lr, min_lr=setup.cfg.min_lr, warmup=setup.sched.warmup, total=setup.sched.total)
    for group in setup.optimizer.param_groups:
        group["lr"] = lr
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return lr


def _train(cfg: TrainConfig, run: Run, progress: bool, desc: str, tensorboard: bool = False) -> dict[str, Any]:
    main, run_dir = run.main, run.dir
    setup, ckpt = _setup(cfg, run)
    pos = _start(setup, ckpt, run)
    del ckpt
    cfg, sched = setup.cfg, setup.sched
    distributed.barrier()  # the run directory is ready
    ddp = distributed.wrap_model(setup.model, run.rank_info, setup.device)
    forward = compile_forward(ddp) if cfg.compile == "on" else ddp
    log_ = run.metrics(pos, [TensorBoardSink(run_dir / TENSORBOARD, pos.step)] if tensorboard and main else [])
    evaluate = _evaluator(setup, log_, main)
    samples_per_step = cfg.batch_size * cfg.grad_accum

    ddp.train()
    bar = progress_bar(
        total=sched.stop, initial=pos.step, disable=not (progress and main), unit="step", desc=desc, dynamic_ncols=True
    )
    saved_at = pos.step if run.resume else -1
    first, every, pending = pos.step + 1, cfg.log_every or 1, _Pending()
    while pos.step < sched.stop:
        pending.since = time.perf_counter()
        for batch in setup.loader.epoch(pos.epoch, start_batch=pos.batch):
            Interrupts.check()
            values, pending.names = _micro_batch(setup, ddp, forward, batch, pos)
            pending.micro.append(values)
            pos = dataclasses.replace(pos, batch=pos.batch + 1)
            if pos.batch % cfg.grad_accum:
                continue
            if pos.step == 0 and setup.monitor is not None:
                _, untrained = _step_values(_read(pending), pending, State(step=1, epoch=pos.epoch), run_dir)
                _log_untrained(setup, log_, main, untrained["monitor_recon"], samples_per_step)
            lr = _optimizer_step(setup, pos.step)
            pos = dataclasses.replace(pos, step=pos.step + 1)
            pending.steps.append((pos, lr))
            epoch_done = pos.batch >= setup.epoch_batches
            evaluating = bool(cfg.val_every) and pos.step % (cfg.val_every or 1) == 0 and not epoch_done
            saving = bool(cfg.save_every) and pos.step % (cfg.save_every or 1) == 0 and pos.step < sched.total
            ending = pos.step >= sched.stop or epoch_done
            if pos.step % every == 0 or pos.step == first or evaluating or saving or ending:
                _log_steps(setup, pending, log_, bar, run_dir)  # the first step alone: it holds any compile time
            if evaluating:
                evaluate(pos)
            if saving:
                save(run, cfg, ddp, setup.optimizer, pos)
                saved_at = pos.step
            pending.since = time.perf_counter() if evaluating or saving else pending.since
            if ending:
                break
        if pos.batch >= setup.epoch_batches:
            if not log_.has("epoch", pos.step):  # a run killed after this record but before the next save
                log_.epoch(epoch=pos.epoch, step=pos.step)
            evaluate(pos)
            pos = State(step=pos.step, epoch=pos.epoch + 1, batch=0)
            if pos.step < sched.total:
                save(run, cfg, ddp, setup.optimizer, pos)
                saved_at = pos.step
            log_.plot(f"{run_dir.name} ({cfg.variant})")
    bar.close()
    return _finish(setup, run, ddp, log_, evaluate, pos, saved_at)


def _log_untrained(setup: Setup, log_: MetricsLog, main: bool, monitor_recon: float, samples: int) -> None:
    """The step-0 ``monitor`` record, before the first update (the paper's Table 7 "No training" row): the
    frozen decoder's Chamfer on the first training batch and, with a held-out split, on that split."""
    values: dict[str, float] = {"monitor_recon": monitor_recon, "samples": samples}
    if setup.heldout is not None and main:
        held = setup.heldout.evaluate(setup.model, setup.device, setup.autocast)
        if held:
            values.update(val_monitor_recon=held["monitor_recon"], val_samples=held["samples"])
    if main:
        log_.monitor(epoch=0, step=0, **values)
    distributed.barrier()


def _evaluator(setup: Setup, log_: MetricsLog, main: bool) -> Callable[[State], None]:
    """``evaluate(pos)``: log the held-out loss at ``pos`` once (rank 0 computes it; the others wait)."""

    def evaluate(pos: State) -> None:
        if setup.heldout is not None and main and not log_.has("val", pos.step):
            log_.val(
                epoch=pos.epoch, step=pos.step, **setup.heldout.evaluate(setup.model, setup.device, setup.autocast)
            )
        distributed.barrier()

    return evaluate


def _finish(
    setup: Setup,
    run: Run,
    ddp: torch.nn.Module,
    log_: MetricsLog,
    evaluate: Callable[[State], None],
    pos: State,
    saved_at: int,
) -> dict[str, Any]:
    """The end of a launch: the last held-out loss and checkpoint, the plot, a warm-up warning; the summary."""
    cfg, sched, run_dir, rank_info = setup.cfg, setup.sched, run.dir, run.rank_info
    if pos.step >= sched.total and pos.batch:  # the schedule ended mid-epoch: its held-out loss too
        evaluate(pos)
    if saved_at != pos.step:  # the final state (the schedule's end or --stop-after)
        keep = cfg.keep_optimizer or pos.step < sched.total
        save(run, cfg, ddp, setup.optimizer if keep else None, pos)
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
