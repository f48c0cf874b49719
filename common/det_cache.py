"""The ScanNet detection cache (format "pkd-scannet-det", version 1): each scene's annotations, parsed once.

Parsing a mesh and its annotation JSONs costs far more than reading them back from Zarr, so
``build_det_cache`` parses each scene once into ``<cache_dir>/scannet_det-<root_key>.zarr`` (the key names
the resolved data root: two roots never share a cache)::

    attrs (DetCacheAttrs): format, version, data_root (resolved), classes (DET_CLASSES), nyu40_ids
      <scene>/ attrs (DetSceneAttrs): folder, vertices, boxes, sources (resolved path, size, mtime_ns of the
               four annotation files), done (written last: a scene counts only then)
        xyz         (N, 3) float32  axis-aligned vertex coordinates, metres
        rgb         (N, 3) uint8    vertex colour
        instance    (N,)   int32    objectId + 1, 0 = none
        semantic    (N,)   int16    NYU40 id, 0 = unannotated
        boxes       (M, 6) float32  [xmin, ymin, zmin, xmax, ymax, zmax] per detection-class instance
        box_classes (M,)   int64    index into DET_CLASSES

Arrays are written by ``scene_arrays`` (chunks of 2^20 rows, Blosc-lz4 + CRC32C: a corrupt chunk is a
StoreError naming the scene). Building is resumable: finished scenes whose files are unchanged are kept, an
interrupted or changed scene is parsed again. Every ``load_det_scene`` compares the scene's recorded sources
with the files on disk and re-reads a changed scene (one INFO line); in a cache opened read-only (``mode="r"``,
what several reader processes should use) the fresh scene is returned without being written back. One process
writes a cache at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import zarr

from pkd.common import durable
from pkd.common.errors import ConfigError, DataError, StoreError
from pkd.common.logs import progress_bar
from pkd.common.scannet_annotations import (
    DET_CLASSES,
    DET_NYU40_IDS,
    SKIP_HINT,
    DetectionScene,
    annotation_files,
    read_detection_scene,
    require_annotation_files,
)
from pkd.common.scannet_mesh import find_scan_folder
from pkd.common.scene_arrays import ArraySpecs, layout_faults, read_arrays, write_arrays
from pkd.common.source_identity import FileIdentity, changed, fingerprint, root_key
from pkd.common.store import _check, _Plain

log = logging.getLogger(__name__)

FORMAT = "pkd-scannet-det"
VERSION = 1
ARRAYS: ArraySpecs = {
    "xyz": ("vertices", (3,), "float32"),
    "rgb": ("vertices", (3,), "uint8"),
    "instance": ("vertices", (), "int32"),
    "semantic": ("vertices", (), "int16"),
    "boxes": ("boxes", (6,), "float32"),
    "box_classes": ("boxes", (), "int64"),
}


@dataclass(frozen=True, kw_only=True)
class DetCacheAttrs(_Plain):
    """The cache's root attrs: its format and version, the data root it caches and the detection classes."""

    format: str = FORMAT
    version: int = VERSION
    data_root: str
    classes: tuple[str, ...] = DET_CLASSES
    nyu40_ids: tuple[int, ...] = DET_NYU40_IDS

    def __post_init__(self) -> None:
        _check(
            self.format == FORMAT and self.version == VERSION,
            f"format {self.format!r} version {self.version} is not {FORMAT!r} version {VERSION}",
        )
        _check(
            self.classes == DET_CLASSES and self.nyu40_ids == DET_NYU40_IDS,
            f"classes {self.classes} (NYU40 ids {self.nyu40_ids}) are not the 18 ScanNet detection classes",
        )


@dataclass(frozen=True, kw_only=True)
class DetSceneAttrs(_Plain):
    """A cached scene's attrs: its scan folder, array lengths and the identity of the files it was read from."""

    folder: str
    vertices: int
    boxes: int
    sources: tuple[FileIdentity, ...]
    done: bool = True

    def __post_init__(self) -> None:
        _check(self.vertices >= 0 and self.boxes >= 0, f"vertices {self.vertices} and boxes {self.boxes} must be >= 0")
        _check(len(self.sources) == 4, f"{len(self.sources)} sources, expected the 4 annotation files")


@dataclass(frozen=True)
class DetCacheReport:
    """What ``build_det_cache`` did: the cache's path, scenes parsed for the first time, kept, parsed again
    because their files changed, and the scenes left out for missing files (``allow_missing``)."""

    path: Path
    built: int
    reused: int
    rebuilt: int
    missing: tuple[str, ...]


def det_cache_path(data: Path, cache_dir: Path) -> Path:
    """Where the cache of the ScanNet tree ``data`` lives under ``cache_dir``."""
    return Path(cache_dir) / f"scannet_det-{root_key(data)}.zarr"


def open_det_cache(path: Path, mode: Literal["r", "a"] = "a", data: Path | None = None) -> zarr.Group:
    """Open a detection cache (``mode="a"`` creates it for the data root ``data``); StoreError for a foreign,
    other-version or other-root group."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise StoreError(f"no ScanNet detection cache at {path}; rerun the command that builds it.")
    if path.is_dir() and not (path / "zarr.json").is_file() and any(path.iterdir()):
        raise StoreError(f"{path} is a folder of other files, not a Zarr group; pass another --cache-dir.")
    try:
        root = zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
        raise StoreError(f"{path} is not a Zarr v3 group ({exc}); delete it and rerun to rebuild it.") from exc
    if mode == "a" and not root.attrs and data is not None:
        root.attrs.put(DetCacheAttrs(data_root=str(Path(data).resolve())).to_dict())
    try:
        attrs = cast(DetCacheAttrs, DetCacheAttrs.from_dict(dict(root.attrs), f"{path} attrs"))
    except ConfigError as exc:
        raise StoreError(
            f"{path} is not a {FORMAT} v{VERSION} cache ({exc}); delete it to rebuild, or pass another --cache-dir."
        ) from exc
    if data is not None and attrs.data_root != str(Path(data).resolve()):
        raise StoreError(
            f"{path} caches the ScanNet tree {attrs.data_root}, not {Path(data).resolve()}; delete it to rebuild, "
            "or pass another --cache-dir."
        )
    return root


def _scene_attrs(root: zarr.Group, scene: str) -> DetSceneAttrs | None:
    """The attrs of a finished cached scene; None when it is absent or unfinished."""
    node = root.get(scene)
    if not isinstance(node, zarr.Group) or not node.attrs.get("done"):
        return None
    try:
        return cast(DetSceneAttrs, DetSceneAttrs.from_dict(dict(node.attrs), f"{root.store}/{scene} attrs"))
    except ConfigError as exc:
        raise StoreError(f"{exc}; the cache is damaged: delete it and rerun to rebuild it.") from exc


def _read_scene(folder: Path) -> tuple[DetectionScene, DetSceneAttrs]:
    """Parse a scan folder, fingerprinting its files first (a change during the read shows on the next check)."""
    sources = fingerprint(require_annotation_files(folder))
    scene = read_detection_scene(folder)
    attrs = DetSceneAttrs(folder=str(folder), vertices=len(scene.xyz), boxes=len(scene.boxes), sources=sources)
    return scene, attrs


def _write_scene(root: zarr.Group, name: str, scene: DetectionScene, attrs: DetSceneAttrs) -> None:
    group = root.create_group(name, overwrite=True)
    write_arrays(group, {array: getattr(scene, array) for array in ARRAYS})
    group.attrs.put(attrs.to_dict())
    durable.committed(f"det cache {name}")


def _log_changed(scene: str) -> None:
    log.info("%s: annotation files changed since cached; re-reading", scene)


def build_det_cache(
    data: Path, cache_dir: Path, scenes: list[str], *, allow_missing: bool, progress: bool
) -> DetCacheReport:
    """Parse every scene of ``scenes`` not cached (or changed since) from the ScanNet tree ``data`` into the cache
    of that tree under ``cache_dir``. A scene without its folder or annotation files is a DataError naming the
    file, or with ``allow_missing`` is left out and counted."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data} is not a directory; pass --data/--root pointing at the ScanNet tree (with scans/).")
    path = det_cache_path(data, cache_dir)
    present, missing = [], []
    for scene in dict.fromkeys(scenes):  # every scene checked before the cache is created or changed
        folder = find_scan_folder(data, scene)
        files = annotation_files(folder) if folder else ()
        if folder is None or not all(f.is_file() for f in files):
            if not allow_missing:
                if folder is None:
                    raise DataError(f"{data / 'scans' / scene} (scene {scene}) does not exist; {SKIP_HINT}.")
                require_annotation_files(folder)
            missing.append(scene)
            continue
        present.append((scene, folder, files))
    root = open_det_cache(path, "a", data)
    todo, reused, rebuilt = [], 0, 0
    for scene, folder, files in present:
        attrs = _scene_attrs(root, scene)
        if attrs is not None and attrs.folder == str(folder) and attrs.sources == fingerprint(files):
            reused += 1
            continue
        if attrs is not None:
            _log_changed(scene)
            rebuilt += 1
        todo.append((scene, folder))
    for scene, folder in progress_bar(todo, desc="caching ScanNet annotations", unit="scene", disable=not progress):
        _write_scene(root, scene, *_read_scene(folder))
    return DetCacheReport(path, len(todo) - rebuilt, reused, rebuilt, tuple(missing))


def load_det_scene(root: zarr.Group, scene: str) -> DetectionScene:
    """One cached scene, re-read from its files (and, in a writable cache, cached again) when they changed since
    it was cached; StoreError naming the scene when it is absent, unfinished or fails its checksum."""
    attrs = _scene_attrs(root, scene)
    if attrs is None:
        raise StoreError(f"{root.store}: scene {scene} is not cached (completely); rerun the command to build it.")
    if changed(attrs.sources):
        _log_changed(scene)
        fresh, fresh_attrs = _read_scene(Path(attrs.folder))
        if not root.read_only:
            _write_scene(root, scene, fresh, fresh_attrs)
        return fresh
    return DetectionScene(*read_arrays(root, scene, ARRAYS))


def verify_det_cache(path: Path) -> list[str]:
    """Every fault of a detection cache: unfinished scenes, wrong shapes or dtypes, failed checksums, NaN/inf,
    boxes with min > max, classes outside DET_CLASSES."""
    root = open_det_cache(path, "r")
    faults = []
    for name, group in sorted(root.groups()):
        try:
            attrs = _scene_attrs(root, name)
        except StoreError as exc:
            faults.append(f"{name}: {exc}")
            continue
        if attrs is None:
            faults.append(f"{name}: unfinished (rerun the command that builds the cache)")
            continue
        layout = layout_faults(group, name, ARRAYS, {"vertices": attrs.vertices, "boxes": attrs.boxes})
        if layout:
            faults += layout
            continue
        try:
            scene = DetectionScene(*read_arrays(root, name, ARRAYS))
        except StoreError as exc:
            faults.append(f"{name}: unreadable: {exc.__cause__}")
            continue
        if not (np.isfinite(scene.xyz).all() and np.isfinite(scene.boxes).all()):
            faults.append(f"{name}: xyz or boxes hold NaN or inf")
        if (scene.boxes[:, :3] > scene.boxes[:, 3:]).any():
            faults.append(f"{name}/boxes: a box's min corner exceeds its max corner")
        if ((scene.box_classes < 0) | (scene.box_classes >= len(DET_CLASSES))).any():
            faults.append(f"{name}/box_classes: values outside 0..{len(DET_CLASSES) - 1}")
    return faults
