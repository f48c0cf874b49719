"""The run scaffold pre-training (``pkd.train.trainer``) and fine-tuning (``pkd.train.downstream.engine``) share.

A run folder is refused unless it is new, resumed or overwritten (``prepare_run_dir``) and is held by one
process at a time (``run_lock``); it records its config with the code version (``write_config``); a resume
compares the recorded plain config with this launch's under one rule (``check_resume``: only run options may
change) before loading model and optimizer (``restore_training``); checkpoints carry model, optimizer, RNG
state, position and config (``save_checkpoint``). Seeding, parameter groups, device resolution and the NaN
guard live here too, so both loops behave alike.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import typing
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkd.common import lock
from pkd.common.config import config_diff
from pkd.common.errors import ConfigError, TrainingError
from pkd.train.checkpoint import LAST, atomic_save, last_good
from pkd.train.distributed import DistInfo

CONFIG = "config.json"


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


def write_config(run_dir: Path, config: Mapping[str, Any], **record: Any) -> None:
    """Write ``run_dir/config.json``: the plain ``config``, the other ``record`` sections and the code version."""
    payload = {"config": dict(config), **record, "code": code_version()}
    (run_dir / CONFIG).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def read_config(run_dir: Path) -> dict[str, Any]:
    """The plain config a run recorded in its config.json; ConfigError when there is none."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"nothing to resume in {run_dir} (no {CONFIG}); drop --resume to start a new run.")
    config: dict[str, Any] = json.loads(path.read_text())["config"]
    return config


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


def restore_training(
    ckpt: Mapping[str, Any],
    current: Mapping[str, Any],
    may_change: Iterable[str],
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Load a checkpoint's model and optimizer after ``check_resume`` of its config against ``current``.

    A finished run saved without its optimizer state (``--no-keep-optimizer``) restores the model only.
    """
    check_resume(ckpt["config"], current, may_change, run_dir)
    model.load_state_dict(ckpt["model"])
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: Mapping[str, Any],
    rng: Any,
    **extra: Any,
) -> None:
    """Atomically write a resumable checkpoint: model, optimizer (left out when None), RNG state, the plain
    config, the code version and ``extra`` (the loop's position)."""
    state = {"model": model.state_dict(), "rng": rng, **extra, "config": dict(config), "code": code_version()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    atomic_save(state, path)


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
