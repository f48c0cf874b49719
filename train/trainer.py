"""The training loop: AdamW, linear warm-up + cosine per step, metrics, plots, atomic resumable checkpoints.

Read ``train`` top to bottom: open the data, build the student, restore or record the run, then loop
over epochs and batches. Every random draw is reproducible: the loader's order from (seed, epoch), the
augmentation and masks from (seed, micro-batch index), drop-path from the torch RNG saved in checkpoints,
so a resumed run continues bit-identically.

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
import json
import logging
import math
import random
import shutil
import subprocess
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkd.common import lock
from pkd.common.errors import ConfigError, TrainingError
from pkd.common.logs import progress_bar
from pkd.common.store import open_split, open_store, store_path, teacher_crop
from pkd.train import distributed
from pkd.train.augment import augment
from pkd.train.checkpoint import (
    LAST,
    atomic_save,
    last_good,
    load_checkpoint,
    load_training_state,
    rng_state,
    set_rng_state,
)
from pkd.train.config import TrainConfig
from pkd.train.data import LoaderConfig, StoreLoader, target_stats
from pkd.train.distributed import DistInfo, unwrap
from pkd.train.export import load_pointmae_checkpoint
from pkd.train.heldout import HeldOut
from pkd.train.losses import CropBox, LossSettings, compute_loss
from pkd.train.metrics import TENSORBOARD, MetricsLog, TensorBoardSink
from pkd.train.model import Student, variant_spec
from pkd.train.options import option_values, run_option_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, current epoch, micro-batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps of warm-up and of the whole schedule, and where this launch stops."""

    warmup: int
    total: int
    stop: int

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
        """``epochs`` × ``steps_per_epoch`` steps, or ``max_steps`` with warm-up the same fraction of them."""
        if cfg.max_steps:
            total, warmup = cfg.max_steps, round(cfg.max_steps * cfg.warmup_epochs / cfg.epochs)
        else:
            total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
        return cls(warmup=min(warmup, total), total=total, stop=min(total, cfg.stop_after or total))


def lr_at(step: int, cfg: TrainConfig, warmup: int, total: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of data stream ``stream``'s chunk of micro-batch ``index``: its augmentation and
    masks depend on nothing else (stream 0 keeps the seeding of single-stream runs)."""
    entropy = [seed, index] if stream == 0 else [seed, index, stream]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Torch seed of rank ``rank`` > 0 (drop-path masks) when it starts, or resumes at ``step`` without its state."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Point-MAE's split: no weight decay on biases, norms and learned tokens/queries."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.endswith("token") or name.endswith("queries")
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def code_version() -> dict[str, str | None]:
    """pkd's version and, when run from a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        pkd_version = version("pkd")
    except PackageNotFoundError:
        pkd_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"pkd": pkd_version, "git_commit": commit}


def open_data(cfg: TrainConfig, rank_info: DistInfo = DistInfo()) -> tuple[StoreLoader, LossSettings, HeldOut | None]:
    """The loader, loss settings and held-out data of a run; StoreError/ConfigError if the store cannot serve
    the variant."""
    spec = variant_spec(cfg.variant)
    group = open_split(cfg.store, cfg.split, require=spec.arrays)
    crop = CropBox(*teacher_crop(cfg.store, cfg.split)) if spec.head == "token" else None
    stats = {spec.target: target_stats(group, spec.target)} if cfg.normalize_targets and spec.target else {}
    loader = StoreLoader(LoaderConfig(cfg.store, cfg.split, spec.arrays, cfg.batch_size, cfg.model.num_points,
                                      cfg.seed, cfg.shuffle_shards, rank_info.rank, rank_info.world_size,
                                      cfg.streams or rank_info.world_size), cfg.num_workers, stats)
    settings = LossSettings.of(cfg.model, cfg.recon_weight, crop)
    heldout = HeldOut.open(cfg, spec.arrays, stats, settings, max(1, cfg.batch_size // rank_info.world_size))
    return loader, settings, heldout


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, act: bool = True) -> None:
    """Refuse to clobber an existing run unless told to resume it or overwrite it; ``act=False`` only checks."""
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both.")
    started = (run_dir / "config.json").is_file() and not (run_dir / LAST).is_file()
    if resume:
        if not (run_dir / LAST).is_file():
            fix = ("it stopped before its first checkpoint: pass --overwrite instead of --resume to start it again"
                   if started else "drop --resume to start a new run")
            raise ConfigError(f"nothing to resume in {run_dir} (no {LAST}); {fix}.")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            fix = ("it stopped before its first checkpoint, so pass --overwrite to start it again" if started else
                   "pass --resume to continue it, --overwrite to replace it")
            raise ConfigError(f"run directory {run_dir} already exists; {fix}, or choose another --run-dir.")
        if not ((run_dir / "config.json").is_file() or (run_dir / LAST).is_file()):
            raise ConfigError(f"{run_dir} is not empty and is not a pkd-train run (no config.json or {LAST}); "
                              "--overwrite only replaces run directories. Choose another --run-dir.")
        if act:
            shutil.rmtree(run_dir)
    if act:
        run_dir.mkdir(parents=True, exist_ok=True)


def write_config(run_dir: Path, cfg: TrainConfig, loader: StoreLoader, world_size: int = 1) -> None:
    root = open_store(cfg.store)
    record = {
        "config": cfg.to_dict(),
        "store": {"path": cfg.store, "split": cfg.split, "teacher": root.attrs.get("teacher"),
                  "prep": root.attrs.get("prep"), "num_samples": int(loader.group.attrs["num_samples"])},
        "code": code_version(),
        "launch": {"world_size": world_size},
    }
    (run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def read_config(run_dir: Path) -> TrainConfig:
    """The config a run recorded in its config.json; ConfigError when there is none."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"nothing to resume in {run_dir} (no config.json); drop --resume to start a new run.")
    return TrainConfig.from_dict(json.loads(path.read_text())["config"])


def restore(ckpt: dict, run_dir: Path, cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            rank_info: DistInfo = DistInfo()) -> Position:
    """Load checkpoint ``ckpt`` into model and optimizer, restore RNGs; refuse a checkpoint of a different config.

    Rank r > 0 restores its own RNG state when the checkpoint was written by as many processes, else it
    reseeds from (seed, rank, step): only drop-path draws from it.
    """
    pos = Position(**ckpt["position"])
    saved = TrainConfig.from_dict({"streams": 1, **ckpt["config"]})
    load_training_state(ckpt, {"store": saved.store, **option_values(saved)},
                        {"store": cfg.store, **option_values(cfg)}, run_option_names(), run_dir, model, optimizer)
    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(ranks) == rank_info.world_size:
        set_rng_state(ranks[rank_info.rank])
    elif rank_info.main:
        set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(rank_seed(cfg.seed, rank_info.rank, pos.step))
    return pos


def save(run_dir: Path, cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         pos: Position) -> None:
    """Write ``last.pt`` (rank 0; under DDP every rank must call this: it gathers their RNG states).

    ``optimizer`` None leaves the optimizer state out (a finished run under ``--no-keep-optimizer``).
    """
    states = distributed.all_gather_object(rng_state())
    if not distributed.is_main():
        return
    state = {"model": unwrap(model).state_dict(), "position": dataclasses.asdict(pos), "rng": states[0],
             "rng_ranks": states if len(states) > 1 else [], "config": cfg.to_dict(), "code": code_version()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    atomic_save(state, run_dir / LAST)


def resolve_streams(cfg: TrainConfig, ckpt: dict | None, world_size: int) -> TrainConfig:
    """``streams`` made explicit: as recorded in a resumed run, else one per process of this launch."""
    if cfg.streams is not None:
        return cfg
    streams = (ckpt["config"].get("streams") or 1) if ckpt is not None else world_size
    return dataclasses.replace(cfg, streams=streams)


def resolve_device(cfg: TrainConfig) -> TrainConfig:
    """``device`` made explicit (auto: cuda when torch sees one) and ``amp`` false where it does nothing (CPU)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; pass --device cpu.")
    return dataclasses.replace(cfg, device=device, amp=cfg.amp and device.startswith("cuda"))


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, desc: str | None = None, tensorboard: bool = False) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary (final and held-out loss, steps, samples/s, run_dir, whether
    it stopped inside warm-up). ``desc`` labels the progress bar (default: "train <variant>").

    ``tensorboard`` also writes the metrics as TensorBoard scalars under ``run_dir/tensorboard``.

    Under torchrun every process calls this; it joins (and afterwards leaves) the process group.
    """
    with distributed.session(cfg.device) as rank_info, run_lock(Path(run_dir), rank_info):
        return _train(cfg, Path(run_dir), resume, overwrite, progress, desc or f"train {cfg.variant}", rank_info,
                      tensorboard)


def run_lock(run_dir: Path, rank_info: DistInfo) -> AbstractContextManager:
    """Rank 0 holds the kernel lock ``<run_dir>.lock`` for the whole run: a second run on it is refused."""
    return lock.exclusive(run_dir, "run", ConfigError) if rank_info.main else nullcontext()


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, overwrite: bool, progress: bool, desc: str,
           rank_info: DistInfo, tensorboard: bool = False) -> dict[str, Any]:
    main, world = rank_info.main, rank_info.world_size
    cfg = resolve_device(dataclasses.replace(cfg, store=store_path(cfg.store)))
    distributed.check_global_batch(cfg.batch_size, rank_info)
    prepare_run_dir(run_dir, resume, overwrite, act=False)
    ckpt = load_checkpoint(run_dir / LAST) if resume else None
    cfg = resolve_streams(cfg, ckpt, world)
    loader, settings, heldout = open_data(cfg, rank_info)
    steps_per_epoch = loader.steps_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"--grad-accum {cfg.grad_accum} needs more batches than the {loader.steps_per_epoch} "
                          "an epoch has; lower it or the batch size.")
    sched = Schedule.of(cfg, steps_per_epoch)
    if ckpt is not None and "optimizer" not in ckpt and ckpt["position"]["step"] < sched.stop:
        raise ConfigError(f"{run_dir / LAST} was saved without its optimizer state (--no-keep-optimizer) and cannot "
                          "be trained further; export it, or start a new run.")
    distributed.barrier()  # every rank has checked the run directory before rank 0 changes it
    if main:
        prepare_run_dir(run_dir, resume, overwrite)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = distributed.local_device(cfg.device, rank_info)
    model = Student(cfg.model).to(device)
    if cfg.init and not resume:
        load_pointmae_checkpoint(cfg.init, model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    if ckpt is not None:
        pos = restore(ckpt, run_dir, cfg, model, optimizer, rank_info)
        del ckpt
    else:
        pos = Position()
        if not main:
            torch.manual_seed(rank_seed(cfg.seed, rank_info.rank, 0))
    if main and not resume:
        write_config(run_dir, cfg, loader, world)
    distributed.barrier()  # the run directory is ready
    ddp = distributed.wrap_model(model, rank_info, device)
    sinks = [TensorBoardSink(run_dir / TENSORBOARD, pos.step)] if tensorboard and main else []
    log_ = MetricsLog(run_dir, keep_until_step=pos.step, write=main, sinks=sinks)

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp else nullcontext()

    def evaluate() -> None:
        """Log the held-out loss at the current step (rank 0 computes it; the others wait)."""
        if heldout is not None and main and not log_.has("val", pos.step):
            log_.val(epoch=pos.epoch, step=pos.step, **heldout.evaluate(model, device, autocast))
        distributed.barrier()

    samples_per_step = cfg.batch_size * cfg.grad_accum
    epoch_batches = steps_per_epoch * cfg.grad_accum
    streams, chunk = loader.cfg.own_streams, loader.cfg.chunk

    ddp.train()
    bar = progress_bar(total=sched.stop, initial=pos.step, disable=not (progress and main), unit="step", desc=desc,
                       dynamic_ncols=True)
    saved_at = pos.step if resume else -1
    while pos.step < sched.stop:
        tic, step_loss, step_parts = time.perf_counter(), 0.0, {}
        for batch in loader.epoch(pos.epoch, start_batch=pos.batch):
            micro = pos.step * cfg.grad_accum + pos.batch % cfg.grad_accum
            generators = [batch_generator(cfg.seed, micro, s) for s in streams]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["points"] = torch.cat([augment(points, cfg.augment, g)
                                         for points, g in zip(batch["points"].split(chunk), generators)])
            last_micro = (pos.batch + 1) % cfg.grad_accum == 0
            with ddp.no_sync() if rank_info.distributed and not last_micro else nullcontext():
                with autocast():
                    loss, parts = compute_loss(ddp, batch, settings,
                                               generators[0] if len(generators) == 1 else generators)
                means = distributed.all_reduce_mean(
                    torch.tensor([float(loss.detach()), *parts.values()], dtype=torch.float64))
                if not torch.isfinite(means[0]):
                    raise TrainingError(f"loss became {float(means[0])} at step {pos.step + 1} (epoch {pos.epoch}); "
                                        f"training stopped, {last_good(run_dir)}. "
                                        "Check the store's targets for NaN/inf or lower --lr.")
                (loss / cfg.grad_accum).backward()
            step_loss += float(means[0]) / cfg.grad_accum
            step_parts = {k: step_parts.get(k, 0.0) + float(v) / cfg.grad_accum for k, v in zip(parts, means[1:])}
            pos = dataclasses.replace(pos, batch=pos.batch + 1)
            if pos.batch % cfg.grad_accum:
                continue

            lr = lr_at(pos.step, cfg, sched.warmup, sched.total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pos = dataclasses.replace(pos, step=pos.step + 1)
            rate = samples_per_step / (time.perf_counter() - tic)
            log_.step(step=pos.step, epoch=pos.epoch, loss=step_loss, lr=lr, samples_per_s=rate, **step_parts)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4g}", samples_s=f"{rate:.1f}")
            epoch_done = pos.batch >= epoch_batches
            if cfg.val_every and pos.step % cfg.val_every == 0 and not epoch_done:
                evaluate()
            if cfg.save_every and pos.step % cfg.save_every == 0 and pos.step < sched.total:
                save(run_dir, cfg, ddp, optimizer, pos)
                saved_at = pos.step
            tic, step_loss, step_parts = time.perf_counter(), 0.0, {}
            if pos.step >= sched.stop or epoch_done:
                break
        if pos.batch >= epoch_batches:
            log_.epoch(epoch=pos.epoch, step=pos.step)
            evaluate()
            pos = Position(step=pos.step, epoch=pos.epoch + 1, batch=0)
            if pos.step < sched.total:
                save(run_dir, cfg, ddp, optimizer, pos)
                saved_at = pos.step
            log_.plot(f"{run_dir.name} ({cfg.variant})")
    bar.close()
    if pos.step >= sched.total and pos.batch:  # the schedule ended mid-epoch: its held-out loss too
        evaluate()
    if saved_at != pos.step:  # the final state (the schedule's end or --stop-after)
        keep = cfg.keep_optimizer or pos.step < sched.total
        save(run_dir, cfg, ddp, optimizer if keep else None, pos)
    log_.plot(f"{run_dir.name} ({cfg.variant})")
    in_warmup = pos.step < sched.warmup
    if in_warmup and main:
        log.warning("%s stopped at step %d, inside the %d warm-up steps: its learning rate never reached --lr %g.",
                    run_dir, pos.step, sched.warmup, cfg.lr)
    distributed.barrier()  # rank 0 has written everything before any rank returns
    return {"run_dir": str(run_dir), "variant": cfg.variant, "steps": pos.step, "schedule_steps": sched.total,
            "warmup_steps": sched.warmup, "in_warmup": in_warmup, "world_size": world, "rank": rank_info.rank,
            **log_.summary()}
