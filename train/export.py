"""Point-MAE interchange: export a student's encoder as a Point-MAE pre-training checkpoint, and load one.

Point-MAE's ``PointTransformer.load_model_from_ckpt`` reads ``ckpt['base_model']``, strips ``module.``,
``MAE_encoder.`` and ``base_model.``, and loads the rest non-strictly; ``export_encoder`` writes exactly
``{'base_model': {'MAE_encoder.<key>': tensor}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pkd.common.errors import ConfigError, OutputError, TrainingError, WeightsError
from pkd.train.checkpoint import LAST, atomic_save, load_checkpoint
from pkd.train.encoder import PointEncoder
from pkd.train.model import Student

ENCODER_PREFIX = "MAE_encoder."
PROVENANCE = "pkd"  # export entry: the store (path, teacher identity) the encoder was distilled from
STRIP_PREFIXES = ("module.", "MAE_encoder.", "base_model.")


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``MAE_encoder.*`` entries of a student state dict (names kept)."""
    return {k: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}


def export_encoder(run_or_ckpt: str | Path, out: str | Path) -> Path:
    """Write the encoder of a run (its ``last.pt``) or of a checkpoint file as a Point-MAE checkpoint."""
    path = Path(run_or_ckpt)
    ckpt_path = path / LAST if path.is_dir() else path
    ckpt = load_checkpoint(ckpt_path)
    state = encoder_state(ckpt.get("model", {}))
    if not state:
        raise TrainingError(f"{path} holds no MAE_encoder.* weights; pass a pkd-train run directory or its last.pt.")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a file path such as {out / 'encoder.pth'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {out.parent} ({exc.strerror}); choose another --out.") from exc
    atomic_save({"base_model": {k: v.clone() for k, v in state.items()}, PROVENANCE: run_provenance(ckpt_path)}, out)
    return out


def run_provenance(ckpt_path: Path) -> dict[str, Any] | None:
    """Store path, target set (``SET/ARRAY``; None in runs before target sets) and that set's teacher identity of
    the distill run a checkpoint belongs to (its ``config.json``)."""
    config = ckpt_path.parent / "config.json"
    if not config.is_file():
        return None
    store = json.loads(config.read_text()).get("store")
    if not isinstance(store, dict):
        return None
    return {"store": store.get("path"), "targets": store.get("targets"), "teacher": store.get("teacher")}


def checkpoint_provenance(path: Path) -> dict[str, Any] | None:
    """What ``export_encoder`` recorded about an export's store, or the run's own record for a run checkpoint;
    None for a foreign (e.g. Point-MAE) checkpoint. Point-MAE's loader ignores the extra entry."""
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    recorded = raw.get(PROVENANCE) if isinstance(raw, dict) else None
    return recorded if isinstance(recorded, dict) else run_provenance(path)


@dataclass(frozen=True)
class LoadReport:
    """Which encoder parameters a checkpoint provided (used), lacked (missing) or had beyond ours (unexpected)."""

    used: list[str]
    missing: list[str]
    unexpected: list[str]


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_pointmae_checkpoint(path: str | Path, model: nn.Module) -> LoadReport:
    """Initialise the encoder of ``model`` (a Student or PointEncoder) from a Point-MAE or pkd export."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"no checkpoint at {path}; pass an existing file to --init.") from exc
    except Exception as exc:
        reason = (
            "the file is empty"
            if Path(path).stat().st_size == 0
            else f"not a torch checkpoint file: {type(exc).__name__} {exc}"
        )
        raise WeightsError(
            f"cannot read {path} as a tensor-only checkpoint ({reason}); pass a Point-MAE or "
            "`pkd-train export` .pth file."
        ) from exc
    state = raw.get("base_model", raw.get("model", raw)) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no state dict (expected a 'base_model' or 'model' entry).")
    state = {_strip(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    encoder = model.MAE_encoder if isinstance(model, Student) else model
    if not isinstance(encoder, PointEncoder):
        raise TypeError(f"expected a Student or PointEncoder, got {type(model).__name__}")
    own = encoder.state_dict()
    used = sorted(k for k in state if k in own)
    if not used:
        raise ConfigError(
            f"{path} has no Point-MAE encoder weights (none of its {len(state)} keys, e.g. "
            f"{sorted(state)[:3]}, match encoder.*, pos_embed.*, blocks.*, norm.*); "
            "pass a Point-MAE or pkd-train export checkpoint."
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in used if state[k].shape != own[k].shape]
    if wrong:
        raise WeightsError(
            f"{path} is an encoder of another size: {', '.join(wrong[:3])}; match --dim/--depth to the checkpoint."
        )
    encoder.load_state_dict({k: state[k] for k in used}, strict=False)
    return LoadReport(used=used, missing=sorted(set(own) - set(used)), unexpected=sorted(set(state) - set(own)))
