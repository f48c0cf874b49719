"""Checkpoint files: written atomically (temp file + os.replace), read with ``weights_only=True``; RNG states.

What a resumable checkpoint holds, and the resume rule, are ``pkd.train.runs``'s.

A checkpoint holds only tensors and plain Python values (dicts, lists, numbers, strings), so loading
one never executes code from the file.
"""

from __future__ import annotations

import os
import random
import sys
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from pkd.common import durable, signals
from pkd.common.errors import OutputError, TrainingError

LAST = "last.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` so that a crash leaves either the old file or the new one, never half of one.

    A failed write (full disk, file-size limit, read-only folder) removes its temp file and raises an
    OutputError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with signals.deferred():  # an interrupt waits for the write: torch.save would turn it into a RuntimeError
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        durable.committed(path.name)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, (OSError, RuntimeError)):
            raise
        kept = f"; the previous {path.name} is untouched" if path.is_file() else ""
        raise OutputError(
            f"cannot write {path} ({exc}){kept}. Free disk space, raise the file-size limit or choose "
            "a writable path, then rerun the same command."
        ) from exc


def last_good(run_dir: Path) -> str:
    """What a failed run leaves to resume from, for error messages."""
    last = Path(run_dir) / LAST
    return (
        f"the last good checkpoint {last} is untouched (--resume continues from it)"
        if last.is_file()
        else f"no checkpoint was written yet in {run_dir}"
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's payload; TrainingError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}; train first or pass the right run directory.")
    _check_crc(path)
    try:
        payload: dict[str, Any] = _interned(torch.load(path, map_location="cpu", weights_only=True))
        return payload
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise TrainingError(f"cannot read checkpoint {path} ({exc}); it is damaged or not a pkd checkpoint.") from exc


def _check_crc(path: Path) -> None:
    """TrainingError naming ``path`` when a record of the checkpoint fails its CRC-32: torch.load does not check
    them, so a flipped byte in a tensor would otherwise load as a wrong weight."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise TrainingError(f"cannot read checkpoint {path} ({exc}); it is damaged or not a pkd checkpoint.") from exc
    if bad is not None:
        raise TrainingError(
            f"checkpoint {path} is damaged: its record {bad} fails its CRC-32 check. Restore it from a copy or "
            "train again; it is never used as it is."
        )


def _interned(value: Any, tuples: dict[tuple[Any, ...], tuple[Any, ...]] | None = None) -> Any:
    """``value`` with its strings interned and equal tuples of plain values shared, as in the objects a fresh run
    saves (every optimizer group holds the one ``betas`` tuple): pickle memoises by identity, so a resumed run's
    checkpoint is then byte-identical to an uninterrupted run's, not just equal."""
    tuples = {} if tuples is None else tuples
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_interned(k, tuples): _interned(v, tuples) for k, v in value.items()}
    if type(value) is list:
        return [_interned(v, tuples) for v in value]
    if type(value) is tuple:
        items = tuple(_interned(v, tuples) for v in value)
        return tuples.setdefault(items, items) if all(isinstance(v, (int, float, str)) for v in items) else items
    return value


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python global RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, words, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"]), p["gauss"]))
