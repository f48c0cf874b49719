"""``TrainConfig``: one pre-training run, the single source of ``pkd-train distill`` and ``ablate`` options.

Every field carries its CLI help (``pkd.common.config.option``); ``pkd.train.options`` turns the fields of
``TrainConfig``, ``StudentConfig`` and ``AugmentConfig`` into typer options, so each option and its default
is declared here once. Fields marked ``run=True`` do not change what is computed: a resumed run may change them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pkd.common.config import at_least, from_plain, option
from pkd.common.errors import ConfigError
from pkd.train.augment import AugmentConfig
from pkd.train.compiled import COMPILE_CHOICES
from pkd.train.model import StudentConfig
from pkd.train.variants import variant_spec

DEVICES = ("auto", "cpu", "cuda")
SUBSAMPLES = ("fps", "random")


@dataclass(frozen=True)
class TrainConfig:
    """One training run; recorded verbatim in ``runs/NAME/config.json`` and in every checkpoint."""

    store: str
    split: str = option("train", "store split to train on")
    model: StudentConfig = field(default_factory=StudentConfig)
    epochs: int = option(250, "epochs of the schedule (without --max-steps)")
    warmup_epochs: int = option(10, "linear warm-up epochs (with --max-steps: the same fraction of its steps)")
    batch_size: int = option(
        128, "global batch (split over torchrun processes; the paper gives none: Point-MAE's total_bs)"
    )
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases, norms, tokens, queries)")
    seed: int = option(0, "seed of the loader order, augmentation, masks and initialisation")
    device: str = option("auto", "cpu, cuda, cuda:N or auto", run=True)
    amp: bool = option(
        True, "bf16 autocast (CUDA only; recorded as false on CPU; follows --device on resume)", run=True
    )
    loader_workers: int = option(0, "DataLoader worker processes (each reads whole shards)", run=True)
    shuffle_shards: int = option(4, "shuffle samples within windows of this many shards")
    subsample: str = option(
        "fps",
        "how --num-points below the stored count are picked: fps (the prep's farthest-point sampler; the same "
        "subset every epoch) or random (a fresh seeded draw per epoch)",
    )
    normalize_targets: bool = option(False, "standardise targets with the store's stats")
    max_steps: int | None = option(
        None, "make the whole schedule this many optimizer steps (warm-up and cosine scaled to fit)"
    )
    stop_after: int | None = option(
        None, "stop after this many optimizer steps without changing the schedule (resume later)", run=True
    )
    save_every: int | None = option(None, "also checkpoint every N steps", run=True)
    keep_optimizer: bool = option(
        True,
        "keep the optimizer state in last.pt when the run ends (--no-keep-optimizer: "
        "a third of the size, export still works, the run cannot be extended)",
        run=True,
    )
    val_split: str = option("val", "held-out split whose loss is logged every epoch (skipped when absent)")
    val_every: int | None = option(None, "also log the held-out loss every N steps", run=True)
    val_max_samples: int | None = option(None, "held-out samples per evaluation (default: all)")
    monitor_recon: bool = option(
        False, "log the held-out Chamfer loss of a frozen random decoder on masked patches (paper Table 7)"
    )
    compile: str = option(
        "auto",
        "torch.compile the training forward: auto (on for CUDA, off for CPU), on, or off (eager)",
        run=True,
    )
    log_every: int | None = option(
        None,
        "read the loss back from the device every N steps, one host sync for them all (metrics.jsonl still "
        "holds every step); default: 1 on CPU, 50 on CUDA",
        run=True,
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    init: str | None = option(None, "initialise the encoder from a Point-MAE checkpoint")
    streams: int | None = option(
        None, "data streams (a multiple of the torchrun process count); default: one per process of the first launch"
    )

    def __post_init__(self) -> None:
        optional = ("max_steps", "stop_after", "save_every", "val_every", "val_max_samples", "log_every")
        at_least(1, **{name: getattr(self, name) for name in ("epochs", "batch_size", "grad_accum", "shuffle_shards")})
        at_least(1, **{name: getattr(self, name) for name in optional})
        if self.streams is not None and (self.streams < 1 or self.batch_size % self.streams):
            raise ConfigError(
                f"--streams {self.streams} must be at least 1 and divide the batch size "
                f"{self.batch_size} (every stream gives each batch the same number of samples)."
            )
        if self.warmup_epochs < 0 or self.loader_workers < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("warmup_epochs, loader_workers and weight_decay must be ≥ 0 and lr > 0.")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr {self.min_lr} must lie between 0 and lr {self.lr}.")
        if self.subsample not in SUBSAMPLES:
            raise ConfigError(f"--subsample {self.subsample!r}: choose fps or random.")
        if self.compile not in COMPILE_CHOICES:
            raise ConfigError(f"--compile {self.compile!r}: choose auto, on or off.")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; use cpu, cuda, cuda:N or auto.")

    @property
    def variant(self) -> str:
        """The variant trained (the model's objective)."""
        return self.model.variant

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "the recorded config") -> TrainConfig:
        """The config a run recorded (``config.json``'s ``config`` or a checkpoint's, upgraded to the current
        version), read strictly: an unknown or missing field is a ConfigError naming ``where`` and the field."""
        return from_plain(cls, d, where)


def upgrade_config_v1(d: dict[str, Any]) -> dict[str, Any]:
    """The declared upgrade of a version-1 config (run records before versioning) to version 2.

    ``num_workers`` was renamed ``loader_workers``; runs before ``streams`` read one stream; fields added
    since then, up to version 2, take their defaults (the sections' too). Applied to a version-2 config it
    changes nothing.
    """
    d = {"loader_workers" if k == "num_workers" else k: v for k, v in d.items()}
    d.setdefault("streams", 1)
    current = _as_v2(TrainConfig(store=d.get("store", "")).to_dict())
    return {
        **current,
        **d,
        "model": {**current["model"], **d.get("model", {})},
        "augment": {**current["augment"], **d.get("augment", {})},
    }


V3_FIELDS = ("subsample",)
V3_MODEL_FIELDS = ("recon_weight", "local_pairing")
V4_MODEL_FIELDS = ("targets", "target_shape")
# The sample shapes of the ClipCap arrays every run before target sets trained on (ViT-B/32 CLIP, ClipCap's
# 10-token GPT-2 prefix): data of ``upgrade_config_v3``, which gives them to those runs.
CLIPCAP_SHAPES: dict[str, list[int]] = {"prefix": [10, 768], "clip_embed": [512], "patch_tokens": [49, 512]}


def _as_v2(d: dict[str, Any]) -> dict[str, Any]:
    """A current config laid out as version 2 had it (``upgrade_config_v2``'s and ``_v3``'s inverse)."""
    run = {k: v for k, v in d.items() if k not in V3_FIELDS}
    model = {k: v for k, v in d["model"].items() if k not in V3_MODEL_FIELDS + V4_MODEL_FIELDS}
    return {**run, "recon_weight": d["model"]["recon_weight"], "model": model}


def upgrade_config_v2(d: dict[str, Any]) -> dict[str, Any]:
    """Version 2 → 3. The objective is one config (``pkd.train.variants.ObjectiveConfig``, inside ``model``):
    ``recon_weight`` moves from the run into ``model``, and runs before ``local_pairing`` paired each 3D centre
    with the teacher patch its pixel falls in (``centre``). Runs before ``subsample`` drew ``--num-points``
    below the stored count at random (``random``). Applied to a version-3 config it changes nothing.
    """
    run = {k: v for k, v in d.items() if k != "recon_weight"}
    model = {"local_pairing": "centre", "recon_weight": d.get("recon_weight", 1.0), **d["model"]}
    return {"subsample": "random", **run, "model": model}


def upgrade_config_v3(d: dict[str, Any]) -> dict[str, Any]:
    """Version 3 → 4. Runs before target sets regressed their variant's own array of the default ClipCap set
    (``targets`` None) of the shapes in ``CLIPCAP_SHAPES`` (``target_shape``; None for reconstruction). Applied
    to a version-4 config it changes nothing. They ran eager and read the loss back every step (``compile``
    ``off``, ``log_every`` 1: run options, which a resume may change)."""
    model = d["model"]
    if "targets" in model:
        return d
    target = variant_spec(model.get("variant", "distill")).target
    shape = CLIPCAP_SHAPES[target] if target else None
    return {"compile": "off", "log_every": 1, **d, "model": {**model, "targets": None, "target_shape": shape}}


def upgrade_config(d: dict[str, Any]) -> dict[str, Any]:
    """A config of any version (as an ablation table records it, unversioned) upgraded to the current one."""
    return upgrade_config_v3(upgrade_config_v2(upgrade_config_v1(d)))
