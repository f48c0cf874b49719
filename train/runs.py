"""The run lifecycle pre-training (``pkd.train.trainer``) and fine-tuning (``pkd.train.downstream.engine``) share.

``open_run`` joins the process group and holds the run folder's lock; the ``Run`` it yields owns the folder:
it is refused unless new, resumed or overwritten (``Run.check``, ``Run.prepare``: ``prepare_run_dir``), records
its config with the code version (``Run.record``: ``config.json``), reads the checkpoint to resume from
(``Run.last``), restores it under the one resume rule (``Run.restore``: ``check_resume``, only run options
may change), saves checkpoints (``Run.save``: model, optimizer, RNG state, the loop's ``State``, config) and
opens the metrics log (``Run.metrics``). Both record files are versioned (``pkd.train.records``; the kinds are
declared below with their upgrade steps). ``resume_values`` is the same rule on command-line options: what a
``--resume`` takes from the record. Seeding, parameter groups, device resolution and the NaN guard live here
too, so both loops behave alike.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from pkd.common import lock
from pkd.common.config import config_diff, from_plain, to_plain
from pkd.common.errors import ConfigError, TrainingError
from pkd.train import distributed
from pkd.train.checkpoint import LAST, atomic_save, last_good, load_checkpoint, set_rng_state
from pkd.train.config import upgrade_config_v1, upgrade_config_v2, upgrade_config_v3
from pkd.train.distributed import DistInfo
from pkd.train.metrics import MetricsLog
from pkd.train.records import Record, RecordKind, read_record, write_record

CONFIG = "config.json"
S = TypeVar("S", bound="State")

# The record kinds of both loops, each with its upgrade table (version 1: records written before versioning).
DISTILL_RUN = RecordKind("pkd-distill-run", required=("config", "store", "launch", "code"))
DISTILL_CHECKPOINT = RecordKind(
    "pkd-distill-checkpoint",
    required=("model", "rng", "rng_ranks", "position", "config", "code"),
    optional=("optimizer",),
)
FINETUNE_RUN = RecordKind("pkd-finetune-run", required=("config", "init", "data", "code"))
FINETUNE_CHECKPOINT = RecordKind(
    "pkd-finetune-checkpoint",
    required=("model", "rng", "position", "init_report", "config", "code"),
    optional=("optimizer",),
)


@DISTILL_RUN.step
def _distill_run_v1(record: Record) -> Record:
    """v1 → v2: the config's own upgrade (``pkd.train.config.upgrade_config_v1``)."""
    return {**record, "config": upgrade_config_v1(record["config"])}


@DISTILL_CHECKPOINT.step
def _distill_checkpoint_v1(record: Record) -> Record:
    """v1 → v2: the config's own upgrade; single-process checkpoints of early v1 had no ``rng_ranks``."""
    return {"rng_ranks": [], **record, "config": upgrade_config_v1(record["config"])}


@DISTILL_RUN.step
@DISTILL_CHECKPOINT.step
def _distill_v2(record: Record) -> Record:
    """v2 → v3: one objective config inside ``model``; older runs read as the pairing and subsampling they
    trained with (``pkd.train.config.upgrade_config_v2``)."""
    return {**record, "config": upgrade_config_v2(record["config"])}


@DISTILL_RUN.step
@DISTILL_CHECKPOINT.step
def _distill_v3(record: Record) -> Record:
    """v3 → v4: target sets; older runs read as the default set's array and shape they trained on
    (``pkd.train.config.upgrade_config_v3``)."""
    return {**record, "config": upgrade_config_v3(record["config"])}


@FINETUNE_RUN.step
def _finetune_run_v1(record: Record) -> Record:
    """v1 → v2: the format and version only."""
    return record


@FINETUNE_CHECKPOINT.step
def _finetune_checkpoint_v1(record: Record) -> Record:
    """v1 → v2: the loop's state is kept under ``position``, as in pre-training checkpoints (v1: ``state``)."""
    body = dict(record)
    body["position"] = body.pop("state")
    return body


# What the fields added in record version 3 were before: the behaviour of runs recorded earlier.
BEFORE_V3: dict[str, dict[str, Any]] = {
    "scannet-seg": {"head": "interp", "optimizer": "adamw"},
    "shapenetpart": {"double_step": False},
}


def upgrade_finetune_config_v2(config: dict[str, Any]) -> dict[str, Any]:
    """v2 → v3: a recorded config gains the fields its benchmark added since, as the run trained (ScanNet
    segmentation: the interpolating head and AdamW; ShapeNetPart: one step per batch)."""
    return {**BEFORE_V3.get(config.get("task", ""), {}), **config}


@FINETUNE_RUN.step
def _finetune_run_v2(record: Record) -> Record:
    """v2 → v3: the config's own upgrade (``upgrade_finetune_config_v2``)."""
    return {**record, "config": upgrade_finetune_config_v2(record["config"])}


@FINETUNE_CHECKPOINT.step
def _finetune_checkpoint_v2(record: Record) -> Record:
    """v2 → v3: the config's own upgrade (``upgrade_finetune_config_v2``)."""
    return {**record, "config": upgrade_finetune_config_v2(record["config"])}


@dataclass(frozen=True, kw_only=True)
class State:
    """Where a run stands: optimizer steps done, current epoch, micro-batches consumed in that epoch.

    Checkpoints keep it under ``position``; a loop that tracks more (fine-tuning's best scores) extends it.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The plain (JSON-able, torch-loadable) state, as checkpoints hold it."""
        plain: dict[str, Any] = to_plain(self)
        return plain

    @classmethod
    def of(cls: type[S], plain: Mapping[str, Any], where: str) -> S:
        """The state ``to_dict`` wrote (read from ``where``); ConfigError for other fields."""
        return from_plain(cls, plain, where)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, act: bool = True) -> None:
    """Refuse to clobber an existing run unless told to resume it or overwrite it; ``act=False`` only checks."""
    if resume and overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both.")
    started = (run_dir / CONFIG).is_file() and not (run_dir / LAST).is_file()
    if resume:
        if not (run_dir / LAST).is_file():
            fix = (
                "it stopped before its first checkpoint: pass --overwrite instead of --resume to start it again"
                if started
                else "drop --resume to start a new run"
            )
            raise ConfigError(f"nothing to resume in {run_dir} (no {LAST}); {fix}.")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            fix = (
                "it stopped before its first checkpoint, so pass --overwrite to start it again"
                if started
                else "pass --resume to continue it, --overwrite to replace it"
            )
            raise ConfigError(f"run directory {run_dir} already exists; {fix}, or choose another --run-dir.")
        if not ((run_dir / CONFIG).is_file() or (run_dir / LAST).is_file()):
            raise ConfigError(
                f"{run_dir} is not empty and is not a pkd-train run (no {CONFIG} or {LAST}); "
                "--overwrite only replaces run directories. Choose another --run-dir."
            )
        if act:
            shutil.rmtree(run_dir)
    if act:
        run_dir.mkdir(parents=True, exist_ok=True)


def run_lock(run_dir: Path, rank_info: DistInfo) -> AbstractContextManager[Any]:
    """Rank 0 holds the kernel lock ``<run_dir>.lock`` for the whole run: a second run on it is refused."""
    return lock.exclusive(run_dir, "run", ConfigError) if rank_info.main else nullcontext()


def code_version() -> dict[str, str | None]:
    """pkd's version and, when run from a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkd_version: str | None = version("pkd")
    except PackageNotFoundError:
        pkd_version = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"pkd": pkd_version, "git_commit": commit}


def write_config(run_dir: Path, config: Mapping[str, Any], kind: RecordKind = FINETUNE_RUN, **record: Any) -> None:
    """Write ``run_dir/config.json`` as a ``kind`` record: the plain ``config``, the other ``record`` sections and
    the code version."""
    write_record(run_dir / CONFIG, kind, {"config": dict(config), **record, "code": code_version()})


def read_config(run_dir: Path, kind: RecordKind = FINETUNE_RUN) -> dict[str, Any]:
    """The plain config a run recorded in its config.json (upgraded, read strictly as ``kind``); ConfigError
    when there is none."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"nothing to resume in {run_dir} (no {CONFIG}); drop --resume to start a new run.")
    config: dict[str, Any] = read_record(path, kind)["config"]
    return config


def read_checkpoint(path: Path, kind: RecordKind) -> Record:
    """A resumable checkpoint's payload upgraded to ``kind``'s current version; TrainingError if unreadable,
    ConfigError if it is of another kind or version."""
    return kind.upgrade(load_checkpoint(path), path)


def run_fields(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of the run options of the config dataclass ``cls`` (fields declared with ``run=True``),
    nested configs included: the settings a resumed run may change."""
    names: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("run"):
            names.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            names += run_fields(hints[f.name], f"{prefix}{f.name}.")
    return tuple(names)


def resume_values(
    saved: Mapping[str, Any], options: Mapping[str, Any], given: Iterable[str], may_change: Iterable[str]
) -> dict[str, Any]:
    """The one resume rule on option values (by name): an option not ``given`` on the command line takes the
    ``saved`` value, so no flag has to be typed again; run options (``may_change``) keep this launch's value
    (given or default), and so do given options: ``check_resume`` (or the caller) refuses those that differ."""
    keep = set(given) | set(may_change)
    return {k: saved[k] if k not in keep and k in saved else v for k, v in options.items()}


def refused_changes(saved: Mapping[str, Any], given: Mapping[str, Any], may_change: Iterable[str]) -> list[str]:
    """The names of ``given`` options a resume refuses: not run options, and not equal to the ``saved`` value."""
    allowed = set(may_change)
    return [k for k, v in given.items() if k not in allowed and v != saved.get(k)]


def check_resume(
    saved: Mapping[str, Any], current: Mapping[str, Any], may_change: Iterable[str], run_dir: Path
) -> None:
    """The one resume rule: the plain configs of the checkpoint and of this launch must agree on every
    (nested, dotted) key except the run options ``may_change``; else ConfigError naming each difference."""
    allowed = tuple(may_change)
    differ = [line for line in config_diff(saved, current) if line.split(":", 1)[0] not in allowed]
    if differ:
        raise ConfigError(
            f"{run_dir} was trained with different settings ({'; '.join(differ)}); resume with the "
            f"same arguments (only {', '.join(allowed)} may change) or start a new run."
        )


@dataclass(frozen=True)
class Run:
    """One launch of a run folder (``open_run`` makes it): the folder, its two record kinds and this process.

    Every rank calls every method; those that write do so on rank 0 only, except ``save``, whose caller
    decides (pre-training gathers every rank's RNG state first).
    """

    dir: Path
    record: RecordKind  # config.json
    checkpoint: RecordKind  # last.pt
    rank_info: DistInfo
    resume: bool = False
    overwrite: bool = False

    @property
    def main(self) -> bool:
        return self.rank_info.main

    def check(self) -> None:
        """Refuse a folder this launch may not use (every rank alike, so none waits alone); changes nothing."""
        prepare_run_dir(self.dir, self.resume, self.overwrite, act=False)

    def prepare(self) -> None:
        """Rank 0 makes the folder ready (emptied under --overwrite) once every rank has checked it."""
        distributed.barrier()
        if self.main:
            prepare_run_dir(self.dir, self.resume, self.overwrite)

    def last(self) -> Record | None:
        """The checkpoint to resume from (upgraded), None for a new run."""
        return read_checkpoint(self.dir / LAST, self.checkpoint) if self.resume else None

    def write_config(self, config: Mapping[str, Any], **sections: Any) -> None:
        """Rank 0 records the run's plain ``config`` and ``sections`` in config.json."""
        if self.main:
            write_config(self.dir, config, self.record, **sections)

    def restore(
        self,
        ckpt: Record,
        state: type[S],
        current: Mapping[str, Any],
        may_change: Iterable[str],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        seed: int | None = None,
    ) -> S:
        """Load ``ckpt`` into model and optimizer after ``check_resume`` of its config against ``current``,
        restore the RNGs, and return its ``state``.

        A finished run saved without its optimizer state (``--no-keep-optimizer``) restores the model only.
        A rank restores its own RNG state when the checkpoint holds one per rank of this launch; otherwise
        rank 0, and every rank when ``seed`` is None, restores the saved one, and the other ranks reseed from
        (``seed``, rank, step) (``rank_seed``).
        """
        check_resume(ckpt["config"], current, may_change, self.dir)
        model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        restored = state.of(ckpt["position"], f"{self.dir / LAST} position")
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(ranks) == self.rank_info.world_size:
            set_rng_state(ranks[self.rank_info.rank])
        elif self.main or seed is None:
            set_rng_state(ckpt["rng"])
        else:
            torch.manual_seed(rank_seed(seed, self.rank_info.rank, restored.step))
        return restored

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: Mapping[str, Any],
        state: State,
        rng: Any,
        **extra: Any,
    ) -> None:
        """Atomically write ``last.pt``: model, optimizer (left out when None), RNG state, ``state``, the plain
        config, the code version and ``extra``."""
        payload = {
            "model": model.state_dict(),
            "rng": rng,
            "position": state.to_dict(),
            **extra,
            "config": dict(config),
            "code": code_version(),
        }
        if optimizer is not None:
            payload["optimizer"] = optimizer.state_dict()
        atomic_save(self.checkpoint.stamp(payload), self.dir / LAST)

    def metrics(self, state: State, sinks: Sequence[Callable[[dict[str, Any]], None]] = ()) -> MetricsLog:
        """The metrics log, its records past ``state``'s step dropped (rank 0 writes it)."""
        return MetricsLog(self.dir, keep_until_step=state.step, write=self.main, sinks=sinks)


@contextmanager
def open_run(
    run_dir: Path, device: str, kinds: tuple[RecordKind, RecordKind], resume: bool = False, overwrite: bool = False
) -> Iterator[Run]:
    """Join the process group (under torchrun) and hold the run lock while the run goes on; yields its ``Run``."""
    with distributed.session(device) as rank_info, run_lock(run_dir, rank_info):
        yield Run(run_dir, *kinds, rank_info, resume, overwrite)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's global RNGs (initialisation and anything else drawing from them)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def batch_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of data stream ``stream``'s chunk of micro-batch ``index``: its augmentation and
    masks depend on nothing else (stream 0 keeps the seeding of single-stream runs)."""
    entropy = [seed, index] if stream == 0 else [seed, index, stream]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Torch seed of rank ``rank`` > 0 (drop-path masks) when it starts, or resumes at ``step`` without its state."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Point-MAE's split: no weight decay on biases, norms and learned tokens/queries."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.endswith("token") or name.endswith("queries")
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(device: str) -> str:
    """'auto' → cuda when torch sees one, else cpu; ConfigError for cuda without a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; pass --device cpu.")
    return device


def check_finite(loss: torch.Tensor, step: int, run_dir: Path, fix: str, where: str = "") -> None:
    """The NaN guard: TrainingError when ``loss`` (of optimizer step ``step``, 1-based) is NaN or infinite,
    naming the step, what is left to resume from and ``fix``; ``where`` adds context such as the epoch."""
    if not torch.isfinite(loss):
        raise TrainingError(
            f"loss became {float(loss)} at step {step}{where}; training stopped, {last_good(run_dir)}. {fix}"
        )
