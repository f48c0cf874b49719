"""The downstream benchmarks, each declared once by its own module (as timm's ``@register_model`` and
Pointcept's ``register_module``): ``register(Benchmark(...))`` at the bottom of a module under
``pkd.train.downstream`` makes it a benchmark. ``pkd-train finetune NAME`` and ``pkd-train test NAME``, their
``--help`` (with that benchmark's defaults), the run folder's name, ``results.json``'s records and
``compare`` are all derived from the ``Benchmark``; nothing outside the module names it.

``benchmarks()`` imports every module of the package once (so each registers itself; ``cli``, which builds
its commands from the registry at import, is left out) and returns the registry by name, in registration order.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pkd.common.errors import ConfigError
from pkd.train.downstream.config import FinetuneConfig


class Task(Protocol):
    """What the fine-tuning loop (``engine.finetune``) and ``run_test`` read from a benchmark's task."""

    @property
    def benchmark(self) -> str: ...  # the records' benchmark name (e.g. scanobjectnn/pb_t50_rs)
    @property
    def protocol(self) -> str: ...  # the reference source the protocol follows
    @property
    def headline(self) -> tuple[str, ...]: ...  # test metrics (keys of ``report``) that become records

    @property
    def model(self) -> nn.Module: ...  # read-only here, so a task may declare its own module type

    def data_summary(self) -> dict[str, Any]: ...  # train/test counts and "coverage" (results.coverage)
    def epoch_batches(self, epoch: int) -> list[np.ndarray]: ...
    def loss(self, model: nn.Module, batch: np.ndarray, generator: torch.Generator) -> torch.Tensor: ...
    # ``model`` is ``self.model`` or its DDP wrapper: training forwards go through it
    def evaluate(self, epoch: int) -> dict[str, float]: ...  # "score" (higher is better), optional "vote_score"
    def report(self, run_dir: Path) -> dict[str, Any]: ...  # final test metrics (+ plots) of the current weights


@dataclass(frozen=True)
class Benchmark:
    """One downstream benchmark: its config class (shared fields + its own, with its protocol's defaults), how
    to build its task, and what its commands say.

    ``build(cfg)`` gives the task for fine-tuning; ``build_test(cfg)`` the one ``test NAME`` scores (default
    ``build``; e.g. without reading the train split). ``test_options`` are the config fields ``test NAME`` may
    override (data location, caches); ``test_command`` replaces the generated ``test NAME`` and
    ``finetune_command`` the generated ``finetune NAME`` where a protocol needs other arguments (Point-MAE's
    voting passes, few-shot folds). ``run_name(cfg)`` names the default run folder ``runs/<name>-<init>``.
    ``items`` is what the test split counts (shapes, scenes); ``per_class`` the key of ``report``'s per-class
    numbers that ``compare`` renders side by side (None: none). ``best_of``: evaluation metrics whose best over
    all epochs results.json reports, each on its own (``best.over_epochs``; Point-MAE's ShapeNetPart: instance
    and class mIoU). ``check(cfg)`` finds in seconds what ``build`` would refuse of the data (folder, split
    lists, a sample of files), raising the same pkd error: a caller that does long work before fine-tuning
    (``ablate`` pre-trains first) runs it up front (None: no check).
    """

    name: str
    config: type[FinetuneConfig]
    build: Callable[[Any], Task]
    summary: str
    data_help: str
    build_test: Callable[[Any], Task] | None = None
    test_options: tuple[str, ...] = ()
    test_summary: str = ""
    finetune_command: Callable[..., None] | None = None
    test_command: Callable[..., None] | None = None
    run_name: Callable[[Any], str] | None = None
    items: str = "shapes"
    per_class: str | None = None
    best_of: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        fields = {f.name for f in dataclasses.fields(self.config)}
        unknown = [name for name in self.test_options if name not in fields]
        if unknown:
            raise TypeError(f"benchmark {self.name}: test_options {unknown} are not fields of {self.config.__name__}")

    def folder_name(self, cfg: Any) -> str:
        """The default run folder's stem for ``cfg`` (the benchmark's name unless ``run_name`` says otherwise)."""
        return self.run_name(cfg) if self.run_name else self.name

    def test_task(self, cfg: Any) -> Task:
        """The task ``test NAME`` scores."""
        return (self.build_test or self.build)(cfg)

    def check_data(self, cfg: Any) -> None:
        """Run ``check`` on ``cfg`` (nothing when the benchmark has none)."""
        if self.check is not None:
            self.check(cfg)

    @property
    def has_test(self) -> bool:
        """Whether ``pkd-train test NAME`` exists (a generated one needs ``test_summary``)."""
        return self.test_command is not None or bool(self.test_summary)


_REGISTRY: dict[str, Benchmark] = {}
_LOADED = False
# modules that build from the registry at import (the typer apps): discovery must not import them, or they would
# see a registry still being filled
CONSUMERS = frozenset({"cli"})


def register(bench: Benchmark) -> Benchmark:
    """Add ``bench`` to the registry (a module calls this once, at import)."""
    if bench.name in _REGISTRY and _REGISTRY[bench.name] != bench:
        raise TypeError(f"benchmark {bench.name!r} is registered twice")
    _REGISTRY[bench.name] = bench
    return bench


def benchmarks() -> dict[str, Benchmark]:
    """Every registered benchmark by name (imports the package's modules on first use)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        package = importlib.import_module(__package__ or "pkd.train.downstream")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in CONSUMERS:
                importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(_REGISTRY)


def benchmark(name: str) -> Benchmark:
    """The benchmark ``name``; ConfigError listing the registered ones otherwise."""
    found = benchmarks()
    if name not in found:
        raise ConfigError(f"unknown benchmark {name!r}; use one of {', '.join(found)}.")
    return found[name]


def config_from_record(record: dict[str, Any], **changes: Any) -> FinetuneConfig:
    """A run's recorded (flat) config as its benchmark's config, with ``changes`` (None values ignored) on top.

    Runs recorded before the registry hold every benchmark's fields (the union config of pkd 0.1); the fields
    of other benchmarks are dropped. Any other unknown key is refused, naming it."""
    bench = benchmark(record["task"])
    fields = {f.name for f in dataclasses.fields(bench.config)}
    unknown = sorted(set(record) - fields - UNION_FIELDS)
    if unknown:
        raise ConfigError(
            f"the recorded {bench.name} config has unknown keys {', '.join(unknown)}; it was written by a newer "
            "pkd or edited by hand. Use the pkd that wrote it, or start a new run."
        )
    kept = {k: v for k, v in record.items() if k in fields}
    given = {k: str(v) if isinstance(v, Path) else v for k, v in changes.items() if v is not None}
    return bench.config(**{**kept, **given})


# Fields of pkd 0.1's one FinetuneConfig that a benchmark's own config may not have (old records carry them).
UNION_FIELDS = frozenset(
    {
        "splits",
        "allow_missing",
        "trust_pickle",
        "cache_dir",
        "pool_points",
        "votes",
        "variant",
        "way",
        "shot",
        "fold",
        "folds",
        "crop_size",
        "repeats",
    }
)
