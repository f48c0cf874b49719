"""The finetuning loop shared by classification, part segmentation and scene segmentation.

A ``Task`` owns its data and model and knows how to compute a training loss, a per-epoch score and the
final test report; ``finetune`` does the rest, top to bottom: prepare the run directory, initialise the
encoder from ``--init``, the config's optimizer (AdamW unless the protocol says otherwise) with Point-MAE's
per-epoch schedule (linear warm-up from ``min_lr``, then cosine, as timm's ``CosineLRScheduler``), gradient
clipping (after a first, unclipped step where the config's ``unclipped_step`` says so, as Point-MAE's
ShapeNetPart loop), an evaluation after every epoch with the best
weights kept in ``best.pt`` (and, for tasks that vote, the best voting epoch's in ``best_vote.pt``), an
atomic ``last.pt`` (``--resume`` continues bit-identically; folder, records, state and resume rule are
``pkd.train.runs.Run``'s), ``curves.png`` (loss and test score per
epoch), and finally the test report of the best weights in ``results.json`` (schema: ``results``), with the
best over all epochs of each of the benchmark's ``best_of`` metrics.

Model selection follows Point-MAE: the best epoch is chosen on the test split (the benchmarks have no
validation split; ScanNet's is val, the split it reports); ``results.json`` says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn

from pkd.common.errors import ConfigError
from pkd.common.logs import progress_bar
from pkd.common.signals import Interrupts
from pkd.train import distributed
from pkd.train.checkpoint import atomic_save, load_checkpoint, rng_state
from pkd.train.downstream.config import FinetuneConfig
from pkd.train.downstream.models import init_encoder
from pkd.train.downstream.plots import plot_curves
from pkd.train.downstream.registry import Task, benchmarks
from pkd.train.downstream.results import coverage_note, make_records, write_results
from pkd.train.encoder import PointEncoder
from pkd.train.runs import (
    FINETUNE_CHECKPOINT,
    FINETUNE_RUN,
    Run,
    State,
    batch_generator,
    check_finite,
    code_version,
    open_run,
    resolve_device,
    run_fields,
    seed_everything,
)
from pkd.train.schedule import epoch_lr

BEST = "best.pt"
BEST_VOTE = "best_vote.pt"
CURVES = "curves.png"
RESULTS = "results.json"
SELECTION = "best epoch chosen on the test split, as Point-MAE does (these benchmarks have no validation split)"


@dataclass(frozen=True, kw_only=True)
class FinetuneState(State):
    """A fine-tuning run's ``State`` with the best evaluation so far and every epoch's scores."""

    best_score: float = -1.0
    best_epoch: int = -1
    best_vote_score: float = -1.0
    best_vote_epoch: int = -1
    history: tuple[dict[str, float], ...] = ()


def finetune(
    build_task: Callable[[Any], Task],
    cfg: FinetuneConfig,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Finetune (or resume) one run, under torchrun too; writes ``results.json`` and returns its content."""
    kinds = (FINETUNE_RUN, FINETUNE_CHECKPOINT)
    with open_run(Path(run_dir), resolve_device(cfg.device), kinds, resume, overwrite) as run:
        return _finetune(build_task, cfg, run, progress)


def _finetune(build_task: Callable[[Any], Task], cfg: FinetuneConfig, run: Run, progress: bool) -> dict[str, Any]:
    """The loop. Under DDP every rank takes rows rank, rank+W, … of each global batch (``--batch-size`` stays
    global); rank 0 alone evaluates-to-disk, logs and checkpoints."""
    main, world, rank, run_dir = run.main, run.rank_info.world_size, run.rank_info.rank, run.dir
    device = distributed.local_device(resolve_device(cfg.device), run.rank_info)
    cfg = dataclasses.replace(cfg, device=str(device))
    distributed.check_global_batch(cfg.batch_size, run.rank_info)
    seed_everything(cfg.seed)
    task = build_task(cfg)
    model = task.model
    batches_per_epoch = len(task.epoch_batches(0))
    if batches_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training set "
            f"({task.data_summary()['train_shapes']} shapes); lower it."
        )
    init_report = {} if run.resume else init_encoder(cast(PointEncoder, model.MAE_encoder), cfg.init)
    run.check()
    run.prepare()
    distributed.barrier()
    optimizer = cfg.build_optimizer(model)
    state, ckpt = FinetuneState(), run.last()
    if ckpt is not None:
        state = run.restore(ckpt, FinetuneState, dataclasses.asdict(cfg), run_fields(type(cfg)), model, optimizer)
        init_report = ckpt["init_report"]
    else:
        run.write_config(dataclasses.asdict(cfg), init=init_report, data=task.data_summary())
    del ckpt
    ddp = distributed.wrap_model(model, run.rank_info, device)
    log = run.metrics(state)
    limit = min(cfg.epochs * batches_per_epoch, cfg.max_steps or cfg.epochs * batches_per_epoch)
    bar = progress_bar(
        total=limit,
        initial=state.step,
        disable=not (progress and main),
        unit="step",
        desc=f"finetune {cfg.task}",
        dynamic_ncols=True,
    )
    while state.step < limit:
        bar.set_description(f"{run_dir.name}: {cfg.task} fine-tuning, epoch {state.epoch + 1}/{cfg.epochs}")
        lr = epoch_lr(
            state.epoch, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_epochs, total=cfg.decay_epochs or cfg.epochs
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        for batch in task.epoch_batches(state.epoch)[state.batch :]:
            Interrupts.check()
            tic = time.perf_counter()
            generator = batch_generator(cfg.seed, state.step * world + rank)
            local_loss = task.loss(ddp, batch[rank::world], generator)
            loss = distributed.all_reduce_mean(local_loss.detach())  # DDP averages the gradients likewise
            check_finite(loss, state.step + 1, run_dir, "Lower --lr or check the data.")
            optimizer.zero_grad(set_to_none=True)
            local_loss.backward()
            if cfg.unclipped_step():
                optimizer.step()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            state = dataclasses.replace(state, step=state.step + 1, batch=state.batch + 1)
            log.step(
                step=state.step,
                epoch=state.epoch,
                loss=float(loss),
                lr=lr,
                samples_per_s=len(batch) / (time.perf_counter() - tic),
            )
            bar.update(1)
            if state.step >= limit:
                break
        state = _evaluate(task, state, run_dir, write=main)
        if state.batch == batches_per_epoch:
            log.epoch(epoch=state.epoch, step=state.step)
            state = dataclasses.replace(state, epoch=state.epoch + 1, batch=0)
        if main:  # curves first: a run killed between the two redraws them when it redoes the epoch
            plot_curves(log.records, list(state.history), run_dir / CURVES, f"{run_dir.name}: {cfg.task} fine-tuning")
            run.save(model, optimizer, dataclasses.asdict(cfg), state, rng_state(), init_report=init_report)
    bar.close()
    distributed.barrier()
    if (run_dir / BEST).is_file():
        model.load_state_dict(load_checkpoint(run_dir / BEST)["model"])
    best: dict[str, Any] = {"epoch": state.best_epoch, "score": state.best_score}
    if state.best_vote_epoch >= 0:
        best.update(vote_epoch=state.best_vote_epoch, vote_score=state.best_vote_score)
    registered = benchmarks().get(cfg.task)
    if registered and registered.best_of:
        best["over_epochs"] = best_over_epochs(list(state.history), registered.best_of)
    results = {
        "task": cfg.task,
        "init": init_report,
        "selection": SELECTION,
        "best": best,
        "steps": state.step,
        "test": task.report(run_dir) if main else None,
        "history": list(state.history),
        "data": task.data_summary(),
        "config": dataclasses.asdict(cfg),
        "code": code_version(),
        "world_size": world,
    }
    if main:
        results = write_results(run_dir / RESULTS, results, task_records(task, results, run_dir))
    distributed.barrier()
    return results


def task_records(task: Task, results: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """The schema records of a finished run (or a re-scoring without ``best``): the task's headline test
    metrics, plus the best voting epoch."""
    test = results["test"]
    values = {k: test[k] for k in task.headline if k in test}
    if "vote_score" in results.get("best", {}):
        values["best_vote_overall_acc"] = results["best"]["vote_score"]
    data = results["data"].get("coverage") or {
        "used": results["data"]["test_shapes"],
        "listed": results["data"]["test_shapes"],
        "split": "test",
    }
    return make_records(
        task.benchmark,
        values,
        init_report=results["init"],
        config=results["config"],
        data=data,
        protocol=task.protocol,
        run_dir=run_dir,
    )


def best_over_epochs(history: list[dict[str, float]], metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Each of ``metrics``' best value over the evaluations in ``history``, and the first epoch that reached it
    (as Point-MAE tracks its best instance and class mIoU, each on its own)."""
    tops = {metric: max(history, key=lambda h: h[metric]) for metric in metrics} if history else {}
    return {metric: {"value": top[metric], "epoch": top["epoch"]} for metric, top in tops.items()}


def describe_data(results: dict[str, Any]) -> str:
    """Console note on how much of the test split (ScanNet: val scenes) a run used."""
    data = results["data"]
    if "coverage" not in data:
        return f"{data['test_shapes']} test shapes"
    registered = benchmarks().get(results["task"])  # the probe and voting passes are no registered benchmark
    return coverage_note(data["coverage"], registered.items if registered else "shapes")


def _evaluate(task: Task, state: FinetuneState, run_dir: Path, write: bool = True) -> FinetuneState:
    """Score the current weights (every rank, same result); keep them in best.pt when they beat the best so far."""
    metrics = task.evaluate(state.epoch)
    state = dataclasses.replace(state, history=state.history + ({"epoch": state.epoch, "step": state.step, **metrics},))
    weights = {"model": task.model.state_dict(), "epoch": state.epoch, "metrics": metrics}
    if metrics["score"] > state.best_score:
        if write:
            atomic_save(weights, run_dir / BEST)
        state = dataclasses.replace(state, best_score=metrics["score"], best_epoch=state.epoch)
    if metrics.get("vote_score", -1.0) > state.best_vote_score:
        if write:
            atomic_save(weights, run_dir / BEST_VOTE)
        state = dataclasses.replace(state, best_vote_score=metrics["vote_score"], best_vote_epoch=state.epoch)
    return state
