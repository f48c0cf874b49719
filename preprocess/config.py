"""What teacher computes a store's targets (``TeacherConfig``) and how a prep runs (``RunOptions``).

Each field declared with ``option(default, help)`` is also a ``pkd-prep`` option (``pkd.common.options``
derives the typer options from these fields), and ``__post_init__`` checks the values, so a Python caller
gets the same checks and messages as the command line. Light on purpose (no torch): the CLI imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkd.common.config import option
from pkd.common.errors import ConfigError
from pkd.common.store import PRECISIONS

KINDS = ("clipcap", "random")


def at_least(lowest: int, **values: int) -> None:
    """ConfigError naming the option (``--name``) of the first value below ``lowest``."""
    for name, value in values.items():
        if value < lowest:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {lowest}, got {value}.")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """How to build the teacher; recorded with the store through ``Teacher.identity``."""

    kind: str = option("clipcap", "clipcap (real weights) | random (seeded, tests/demos).")
    clip_weights: str | None = option(None, "OpenAI ViT-B-32.pt or open_clip state dict; 'openai' downloads.")
    clipcap_weights: str | None = option(None, "ClipCap conceptual_weights.pt (MLP mapper).")
    device: str = option("cpu", "cpu | cuda (teacher device).")
    precision: str = option("fp32", "fp32 | fp16 | bf16 (half precisions on cuda only).")
    seed: int = 0
    patch_tokens: bool = option(False, "Also cache CLIP's 7x7 patch tokens (local ablation).")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown teacher kind {self.kind!r} (--teacher): choose 'clipcap' (real weights) or "
                              "'random' (tests, demos).")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown teacher precision {self.precision!r} (--precision): choose one of "
                              f"{', '.join(PRECISIONS)}.")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run (not what to compute): these may change between a run and its resume."""

    teacher_batch: int = option(32, "Images per teacher forward.", run=True)
    threads: int = option(2, "Decode/geometry threads running beside the teacher (in each process).", run=True)
    dask_workers: int = option(0, "Start a local dask.distributed cluster of N worker processes, one task per "
                                  "shard (0: run in this process).", run=True)
    scheduler: str | None = option(None, "Address of an existing dask scheduler (tcp://host:8786); one task per "
                                         "shard.", run=True)
    overwrite: bool = option(False, "Replace an existing store written with other arguments (the new one is built "
                                    "beside it as OUT.overwrite and swapped in only once complete).", run=True)
    progress: bool = option(True, "Show progress bars.", run=True)

    def __post_init__(self) -> None:
        at_least(1, teacher_batch=self.teacher_batch, threads=self.threads)
        at_least(0, dask_workers=self.dask_workers)
