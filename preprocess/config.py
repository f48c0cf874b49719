"""What a store holds (``PrepConfig``), which teacher computes its targets (``TeacherConfig``) and how a prep
runs (``RunOptions``).

Each field declared with ``option(default, help)`` is also a ``pkd-prep`` option (``pkd.common.options``
derives the typer options from these fields), and ``__post_init__`` checks the values, so a Python caller
gets the same checks and messages as the command line. Light on purpose (no torch): the CLI imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pkd.common.config import at_least, option
from pkd.common.errors import ConfigError
from pkd.common.store import PRECISIONS
from pkd.preprocess.frame_sample import GeometryConfig
from pkd.preprocess.scenes import SceneEntry, find_scenes

KINDS = ("clipcap", "random")

CLIP_FILE, CLIPCAP_FILE = "ViT-B-32.pt", "conceptual_weights.pt"  # what a --weights-dir folder holds


@dataclass(frozen=True, kw_only=True)
class PrepConfig:
    """What to read and how to turn it into samples: everything that decides the store's contents."""

    root: str
    split: str = option("all", "train | val | test | all (official ScanNet v2 lists).")
    scenes: tuple[str, ...] | None = None
    source: str = option("auto", "auto (prefer .sens) | sens | exported.")
    frame_skip: int = option(25, "Keep frames numbered 0, N, 2N, ...")
    limit: int | None = option(None, "At most this many frames per split (quick runs).")
    shard_size: int = option(512, "Samples per Zarr shard (unit of writing and resuming).")
    seed: int = option(0, "Global seed; every sample's seed derives from (seed, scene, frame).")
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    depth_scale: float | None = option(
        None,
        "Depth units per metre of exported depth PNGs (default 1000: "
        "millimetres, as ScanNet, 7-Scenes, Redwood; TUM RGB-D: 5000). .sens "
        "files record their own.",
    )

    def __post_init__(self) -> None:
        at_least(1, frame_skip=self.frame_skip, shard_size=self.shard_size, limit=self.limit)
        if self.depth_scale is not None and not self.depth_scale > 0:
            raise ConfigError(
                f"--depth-scale must be positive (depth units per metre, 1000 for millimetres), got {self.depth_scale}."
            )

    def scenes_to_read(self) -> list[SceneEntry]:
        """The scenes this config selects under its root."""
        return find_scenes(Path(self.root), self.split, self.scenes, self.source, self.depth_scale)


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """How to build the teacher; recorded with the store through ``Teacher.identity``."""

    kind: str = option(
        "clipcap",
        "clipcap (real weights) | random (seeded, tests/demos); `pkd-prep teacher --name` also takes "
        "open_clip:MODEL | dinov2:SIZE.",
    )
    clip_weights: str | None = option(None, "OpenAI ViT-B-32.pt or open_clip state dict; 'openai' downloads.")
    clipcap_weights: str | None = option(None, "ClipCap conceptual_weights.pt (MLP mapper).")
    device: str = option("cpu", "cpu | cuda (teacher device).")
    precision: str = option("fp32", "fp32 | fp16 | bf16 (half precisions on cuda only).")
    seed: int = 0
    patch_tokens: bool = option(False, "Also cache CLIP's 7x7 patch tokens (local ablation).")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"unknown teacher kind {self.kind!r} (--teacher): choose 'clipcap' (real weights) or "
                "'random' (tests, demos); other kinds add a named target set beside these targets: "
                "`pkd-prep teacher STORE --teacher KIND --name SET`."
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown teacher precision {self.precision!r} (--precision): choose one of {', '.join(PRECISIONS)}."
            )


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run (not what to compute): these may change between a run and its resume."""

    teacher_batch: int = option(32, "Images per teacher forward.", run=True)
    threads: int = option(2, "Decode/geometry threads running beside the teacher (in each process).", run=True)
    dask_workers: int = option(
        0,
        "Start a local dask.distributed cluster of N worker processes, one task per shard (0: run in this process).",
        run=True,
    )
    scheduler: str | None = option(
        None, "Address of an existing dask scheduler (tcp://host:8786); one task per shard.", run=True
    )
    overwrite: bool = option(
        False,
        "Replace an existing store written with other arguments (the new one is built "
        "beside it as OUT.overwrite and swapped in only once complete).",
        run=True,
    )
    progress: bool = option(True, "Show progress bars.", run=True)

    def __post_init__(self) -> None:
        at_least(1, teacher_batch=self.teacher_batch, threads=self.threads)
        at_least(0, dask_workers=self.dask_workers)
