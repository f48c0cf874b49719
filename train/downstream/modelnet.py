"""ModelNet40 in the ``modelnet40_normal_resampled`` layout, prepared as Point-MAE prepares it.

Layout: ``DATA/<class>/<class>_NNNN.txt`` (10 000 lines ``x,y,z,nx,ny,nz``) and the split lists
``modelnet40_{train,test}.txt`` and ``modelnet40_shape_names.txt`` in DATA or in a separate ``--splits`` folder.

Point-MAE (via Point-BERT's ``ModelNet`` dataset) reduces every shape once to an 8192-point farthest
point sample, normalises it to the unit sphere, and caches the result as a pickle
(``modelnet40_<split>_8192pts_fps.dat``). We do the same with ``pkd.common.geometry.farthest_points``
(fpsample's QuickFPS, ~15 ms a shape on one CPU core, deterministic) and cache to a ``.npz`` that loads
without pickle (``cache_dir``). Point-MAE's own ``.dat`` files are read only with ``trust_pickle=True``:
unpickling runs code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pkd.common import durable
from pkd.common.errors import DataError
from pkd.common.geometry import farthest_points
from pkd.common.logs import progress_bar
from pkd.train.downstream.files import normalize_unit_sphere, read_lines, read_point_file, require_dir, require_file

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShapeSet:
    """Shapes of one split: ``points`` (N, P, 3) float32 on the unit sphere, ``labels`` (N,) int64."""

    points: np.ndarray
    labels: np.ndarray
    names: list[str]
    classes: list[str]
    missing: int = 0


def _shape_table(data: Path, shape: str, num_points: int) -> np.ndarray:
    """The (P, 3) points of one shape file; DataError if it is unreadable or has fewer than ``num_points``."""
    path = data / shape.rsplit("_", 1)[0] / f"{shape}.txt"
    table = read_point_file(path, ",", 3)[:, :3]
    if len(table) < num_points:
        raise DataError(
            f"{path} has {len(table)} points, fewer than the {num_points} to sample; lower "
            "--pool-points or re-extract the file."
        )
    return table


def _pooled_shape(data: Path, shape: str, num_points: int) -> np.ndarray:
    """One shape file reduced to ``num_points`` by FPS and normalised to the unit sphere."""
    table = _shape_table(data, shape, num_points)
    return normalize_unit_sphere(table[farthest_points(table, num_points)])


def _read_dat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        points, labels = pickle.load(f)
    points = np.stack([normalize_unit_sphere(np.asarray(p, dtype=np.float32)[:, :3]) for p in points])
    return points, np.asarray(labels, dtype=np.int64).reshape(-1)


def _cache_path(cache_dir: Path, data: Path, split: str, num_points: int, names: list[str]) -> Path:
    key = hashlib.sha256("\n".join([str(data.resolve()), split, str(num_points), *names]).encode()).hexdigest()[:16]
    return cache_dir / f"modelnet40_{split}_{num_points}pts_fps_{key}.npz"


def load_modelnet40(
    data: str | Path,
    split: str,
    *,
    splits: str | Path | None = None,
    num_points: int = 8192,
    allow_missing: bool = False,
    trust_pickle: bool = False,
    cache_dir: str | Path | None = None,
) -> ShapeSet:
    """One split of ModelNet40, each shape reduced to ``num_points`` by FPS and normalised to the unit sphere.

    ``allow_missing`` keeps only the listed shapes that exist (for partial copies); otherwise the first
    missing file is an error. ``cache_dir`` stores the FPS result as ``.npz`` so later runs skip the FPS.
    """
    data, dat = _data_dir(data, split, num_points)
    if dat.is_file() and trust_pickle:
        points, labels = _read_dat(dat)
        classes = read_lines(
            require_file(
                Path(splits or data) / "modelnet40_shape_names.txt",
                "the 40 class names",
                "Pass --splits pointing at the folder with the ModelNet40 split lists.",
            )
        )
        return ShapeSet(points, labels, [f"{dat.name}:{i}" for i in range(len(labels))], classes)
    listing = _listing(data, dat, split, splits, allow_missing)
    cache = _cache_path(Path(cache_dir), data, split, num_points, listing.present) if cache_dir else None
    points = _pooled_shapes(data, listing.present, num_points, cache, f"ModelNet40 {split}: {num_points}-point FPS")
    return ShapeSet(points, listing.labels, listing.present, listing.classes, listing.missing)


def check_modelnet40(
    data: str | Path,
    *,
    splits: str | Path | None = None,
    num_points: int = 8192,
    allow_missing: bool = False,
    trust_pickle: bool = False,
    sample: int = 4,
) -> dict[str, int]:
    """What ``load_modelnet40`` would refuse, found in seconds: the folder, the split lists, every listed file
    (present, or ``allow_missing``), and ``sample`` files per split spread over its list, parsed and counted
    against ``num_points``. Returns the shapes per split a load would use (a split read from Point-MAE's
    pickle under ``trust_pickle`` is left out: its count is known once it is unpickled); raises its DataError."""
    used = {}
    for split in SPLITS:
        root, dat = _data_dir(data, split, num_points)
        if dat.is_file() and trust_pickle:
            continue
        present = _listing(root, dat, split, splits, allow_missing).present
        for shape in sample_shapes(present, sample):
            _shape_table(root, shape, num_points)
        used[split] = len(present)
    return used


def sample_shapes(shapes: list[str], count: int) -> list[str]:
    """``count`` of ``shapes`` spread evenly over the list, first and last included (the ones checked)."""
    if len(shapes) <= count:
        return list(shapes)
    return [shapes[round(i * (len(shapes) - 1) / max(count - 1, 1))] for i in range(count)]


@dataclass(frozen=True)
class _Listing:
    """The listed shapes of one split that exist, their labels, the class names and how many are missing."""

    classes: list[str]
    present: list[str]
    labels: np.ndarray
    missing: int


def _data_dir(data: str | Path, split: str, num_points: int) -> tuple[Path, Path]:
    """The checked data folder and the path of Point-MAE's pickle for ``split`` in it."""
    if split not in SPLITS:
        raise DataError(f"unknown ModelNet40 split {split!r}; use one of {', '.join(SPLITS)}.")
    root = require_dir(
        Path(data),
        "the modelnet40_normal_resampled folder (one sub-folder per class)",
        "Pass --data pointing at the extracted modelnet40_normal_resampled folder.",
    )
    return root, root / f"modelnet40_{split}_{num_points}pts_fps.dat"


def _listing(data: Path, dat: Path, split: str, splits: str | Path | None, allow_missing: bool) -> _Listing:
    """The split list of ``split`` checked against the class names and the files under ``data``."""
    list_dir = Path(splits) if splits else data
    fix = "Pass --splits pointing at the folder that holds modelnet40_{train,test}.txt and modelnet40_shape_names.txt."
    classes = read_lines(require_file(list_dir / "modelnet40_shape_names.txt", "the 40 ModelNet40 class names", fix))
    ids = read_lines(require_file(list_dir / f"modelnet40_{split}.txt", f"the ModelNet40 {split} list", fix))
    if not any((data / c).is_dir() for c in classes):
        hint = (
            f" {dat.name} is there, but it is a pickle, which can run code when loaded: pass --trust-pickle "
            "if you trust where it came from."
            if dat.is_file()
            else ""
        )
        raise DataError(
            f"{data} holds none of the ModelNet40 class folders (e.g. {data / classes[0]});{hint} "
            "Point --data at the extracted modelnet40_normal_resampled folder."
        )
    index = {c: i for i, c in enumerate(classes)}
    present: list[str] = []
    label_ids: list[int] = []
    missing = 0
    for shape in ids:
        cls = shape.rsplit("_", 1)[0]
        if cls not in index:
            raise DataError(
                f"{list_dir / f'modelnet40_{split}.txt'} lists {shape!r} of class {cls!r}, which "
                f"{list_dir / 'modelnet40_shape_names.txt'} does not name; use matching split files."
            )
        path = data / cls / f"{shape}.txt"
        if not path.is_file():
            if not allow_missing:
                raise DataError(
                    f"{path} is listed in modelnet40_{split}.txt but missing. Re-extract the dataset, "
                    "or pass --allow-missing to use only the shapes present."
                )
            missing += 1
            continue
        present.append(shape)
        label_ids.append(index[cls])
    if not present:
        raise DataError(
            f"none of the {len(ids)} shapes in modelnet40_{split}.txt exist under {data}; "
            "point --data at the modelnet40_normal_resampled folder."
        )
    return _Listing(classes, present, np.asarray(label_ids, dtype=np.int64), missing)


def _stamps(data: Path, shapes: list[str]) -> np.ndarray:
    """(size, mtime in ns) of every shape file: what the cache checks to notice a replaced file."""
    stats = [(data / shape.rsplit("_", 1)[0] / f"{shape}.txt").stat() for shape in shapes]
    return np.array([(s.st_size, s.st_mtime_ns) for s in stats], dtype=np.int64).reshape(-1, 2)


def _pooled_shapes(data: Path, shapes: list[str], num_points: int, cache: Path | None, desc: str) -> np.ndarray:
    """Every shape pooled by ``_pooled_shape``; with a cache, only shapes whose file changed are pooled again."""
    stamps = _stamps(data, shapes)
    points, stale = None, np.arange(len(shapes))
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            if "stamps" in stored and stored["stamps"].shape == stamps.shape:
                points = stored["points"]
                stale = np.flatnonzero((stored["stamps"] != stamps).any(axis=1))
    if points is None:
        points = np.empty((len(shapes), num_points, 3), dtype=np.float32)
    for i in progress_bar(stale, desc=desc, unit="shape", disable=len(stale) < 256):
        points[i] = _pooled_shape(data, shapes[i], num_points)
    if cache is not None and len(stale):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npz")  # one per process: DDP ranks race
        try:
            np.savez(tmp, points=points, stamps=stamps)
            tmp.replace(cache)
            durable.committed(cache.name)
        finally:
            tmp.unlink(missing_ok=True)
    return points
