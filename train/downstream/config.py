"""What every fine-tuning run computes: ``FinetuneConfig`` holds the fields all benchmarks share, and each
benchmark's module declares a subclass with its own fields and its protocol's defaults (``redefault``).

The encoder's sizes are ``EncoderConfig``'s fields (the config extends it), so ``config.json`` and checkpoints
keep them flat, as they always did. A field's help is its CLI help (the commands are generated from the
registry, ``pkd.train.downstream.registry``). Mixins declare the data fields several benchmarks share
(``ShapeData``: split lists and ``--allow-missing``; ``ModelNetData``: ModelNet40's FPS pools).

How the loop optimizes is the config's too: ``build_optimizer`` (AdamW, unless a benchmark's protocol says
otherwise) and ``unclipped_step`` (Point-MAE's ShapeNetPart loop steps once before clipping). Fields added
after a run was recorded read, in its config.json and last.pt, as the behaviour that run had
(``pkd.train.runs.upgrade_finetune_config_v2``, the v2 → v3 step of both finetune record kinds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pkd.common.config import at_least, option
from pkd.common.errors import ConfigError
from pkd.train.encoder import EncoderConfig
from pkd.train.runs import CONFIG, param_groups, read_config, resume_values, run_fields


def redefault(base: type, name: str, value: Any) -> Any:
    """Field ``name`` of the dataclass ``base`` with the default ``value`` (its help and run flag kept): a
    benchmark's config gives a shared option its protocol's default."""
    field = {f.name: f for f in dataclasses.fields(base)}[name]
    return dataclasses.field(default=value, metadata=field.metadata)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(EncoderConfig):
    """One fine-tuning run: the fields every benchmark has; defaults are Point-MAE's ModelNet40 schedule."""

    task: str
    data: str
    init: str = "scratch"
    epochs: int = option(300, "training epochs")
    warmup_epochs: int = option(10, "epochs of linear learning-rate warm-up")
    decay_epochs: int | None = option(None, "cosine length in epochs (default: --epochs)")
    batch_size: int = option(32, "global batch size")
    lr: float = option(5e-4, "peak learning rate")
    min_lr: float = option(1e-6, "learning rate at the start of warm-up and the end of the cosine")
    weight_decay: float = option(0.05, "weight decay (AdamW: decoupled; Adam: L2)")
    grad_clip: float = option(10.0, "gradient norm clip")
    seed: int = option(0, "training seed (few-shot: also draws generated folds)")
    device: str = option("cpu", "cpu, cuda or auto", run=True)
    max_steps: int | None = option(None, "stop after this many optimizer steps", run=True)
    num_points: int = option(1024, "points per input fed to the model")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(1, epochs=self.epochs, num_points=self.num_points)
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be at least 2 (the heads use BatchNorm), got {self.batch_size}.")
        if self.num_group > self.num_points:
            raise ConfigError(f"num_points {self.num_points} is too small for {self.num_group} groups.")

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW without weight decay on biases, norms and tokens (Point-MAE's ``add_weight_decay``)."""
        return torch.optim.AdamW(param_groups(model, self.weight_decay), lr=self.lr)

    def unclipped_step(self) -> bool:
        """Whether each batch steps the optimizer once before clipping the gradients (and once after)."""
        return False

    @classmethod
    def for_task(cls, task: str, data: str | Path, **overrides: Any) -> FinetuneConfig:
        """Benchmark ``task``'s config with its protocol's defaults and ``overrides`` (None values ignored)."""
        from pkd.train.downstream.registry import benchmark

        given = {k: v for k, v in overrides.items() if v is not None}
        return benchmark(task).config(task=task, data=str(data), **given)


@dataclass(frozen=True, kw_only=True)
class ShapeData:
    """Benchmarks read from a folder of split lists and per-item files."""

    splits: str | None = option(
        None, "folder with the split lists, if not inside --data (ScanNet: default the official lists)"
    )
    allow_missing: bool = option(False, "use only the listed shapes (ScanNet: scenes) that exist")


@dataclass(frozen=True, kw_only=True)
class ModelNetData(ShapeData):
    """ModelNet40's files reduced once to FPS pools (fine-tuning, few-shot folds and the linear probe)."""

    trust_pickle: bool = option(False, "read Point-MAE's modelnet40_*_fps.dat pickles (runs their code)")
    cache_dir: str | None = option(None, "cache of the FPS pools per shape (.npz)", run=True)
    pool_points: int = option(8192, "FPS points kept per shape before per-batch sampling")


@dataclass(frozen=True, kw_only=True)
class ClassificationConfig(FinetuneConfig):
    """Shape classification (Point-MAE's runner_finetune); ``votes`` > 0 adds a voting evaluation."""

    votes: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.votes < 0:
            raise ConfigError(f"votes must be 0 (no voting) or more, got {self.votes}.")


RESUME_MAY_CHANGE = run_fields(FinetuneConfig)


def resume_options(
    run_dir: str | Path, options: dict[str, Any], given: set[str], may_change: tuple[str, ...] = RESUME_MAY_CHANGE
) -> dict[str, Any]:
    """For ``--resume``: options not ``given`` on the command line take the values recorded in ``run_dir``'s
    config.json, so no flag has to be typed again; run options (``may_change``) keep their defaults, and
    options given must still match the recorded ones (the restore refuses any other difference, naming it)."""
    if not (Path(run_dir) / CONFIG).is_file():
        return options
    saved = read_config(Path(run_dir))
    return resume_values(saved, options, given, may_change)
