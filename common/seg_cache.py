"""The ScanNet segmentation cache (format "pkd-scannet-seg", version 2): each scene's mesh vertices, parsed once.

Parsing two PLYs per scene costs far more than reading them back from Zarr, and fine-tuning reads every
scene hundreds of times, so ``build_cache`` parses each scene once into::

    seg.zarr   attrs (SegCacheAttrs): format, version, class_ids (the NYU40 ids of classes 0..19), classes
               (names), ignore, data_root (the resolved ScanNet tree it caches)
      <scene>/ attrs (SegSceneAttrs): folder, vertices, sources (resolved path, size, mtime_ns of the mesh and
               labels PLYs), done (written last: a scene counts only then)
        xyz    (V, 3) float32  vertex coordinates, metres
        rgb    (V, 3) uint8    vertex colour
        label  (V,)   uint8    benchmark class 0..19, or 255 (ignored)

Arrays are written by ``scene_arrays`` (chunks of 2^20 vertices, a whole scene in one chunk per array for most
scans, Blosc-lz4 + CRC32C: a flipped byte fails on read, a StoreError naming the scene, instead of being
trained on). Building is resumable: scenes already done are kept, a scene whose write was interrupted is
rewritten whole. The cache never serves stale data: a scene whose PLYs changed since it was cached is parsed
again, and a cache of another data root is emptied and rebuilt (one INFO line each). One process writes a
cache at a time (under torchrun, rank 0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr

from pkd.common import durable
from pkd.common.errors import ConfigError, DataError, StoreError
from pkd.common.logs import progress_bar
from pkd.common.scannet_mesh import (
    CLASS_IDS,
    DOWNLOAD_HINT,
    IGNORE,
    NUM_CLASSES,
    SceneMesh,
    class_names,
    find_scan_folder,
    read_scene,
    scene_files,
)
from pkd.common.scene_arrays import ArraySpecs, layout_faults, read_arrays, write_arrays
from pkd.common.source_identity import FileIdentity, fingerprint
from pkd.common.store import _check, _Plain, split_group

log = logging.getLogger(__name__)

FORMAT = "pkd-scannet-seg"
VERSION = 2
ARRAYS: ArraySpecs = {
    "xyz": ("vertices", (3,), "float32"),
    "rgb": ("vertices", (3,), "uint8"),
    "label": ("vertices", (), "uint8"),
}


@dataclass(frozen=True, kw_only=True)
class SegCacheAttrs(_Plain):
    """The cache's root attrs: format and version, the 20 benchmark classes and the data root it caches."""

    format: str = FORMAT
    version: int = VERSION
    class_ids: tuple[int, ...] = CLASS_IDS
    classes: tuple[str, ...]
    ignore: int = IGNORE
    data_root: str | None

    def __post_init__(self) -> None:
        _check(
            self.format == FORMAT and self.version == VERSION,
            f"format {self.format!r} version {self.version} is not {FORMAT!r} version {VERSION}",
        )
        _check(
            self.class_ids == CLASS_IDS and self.ignore == IGNORE,
            f"class_ids {self.class_ids} (ignore {self.ignore}) are not the 20 ScanNet benchmark classes",
        )


@dataclass(frozen=True, kw_only=True)
class SegSceneAttrs(_Plain):
    """A cached scene's attrs: its scan folder, vertex count and the identity of the two PLYs it was read from."""

    folder: str
    vertices: int
    sources: tuple[FileIdentity, ...]
    done: bool = True

    def __post_init__(self) -> None:
        _check(self.vertices >= 0, f"vertices {self.vertices} must be >= 0")
        _check(len(self.sources) == 2, f"{len(self.sources)} sources, expected the mesh and labels PLYs")


def _attrs(data: Path | None) -> SegCacheAttrs:
    return SegCacheAttrs(classes=class_names(), data_root=str(Path(data).resolve()) if data is not None else None)


def is_seg_cache(path: str | Path) -> bool:
    """True when ``path`` is a Zarr group whose format attr is this cache's."""
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False


def open_cache(path: str | Path, mode: Literal["r", "a"] = "r", data: Path | None = None) -> zarr.Group:
    """Open a segmentation cache (``mode="a"`` creates it, for the data root ``data``); StoreError for a foreign
    or other-version group."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise StoreError(
            f"no ScanNet segmentation cache at {path}; build it with "
            f"`pkd-prep scannet-seg --root SCANNET --out {path}`."
        )
    if path.is_dir() and not (path / "zarr.json").is_file() and any(path.iterdir()):
        raise StoreError(f"{path} is a folder of other files, not a Zarr group; pass another --out / --cache-dir.")
    try:
        root = zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
        raise StoreError(f"{path} is not a Zarr v3 group ({exc}); pass a cache written by pkd.") from exc
    if mode != "r" and not root.attrs.get("format") and not list(root.group_keys()):
        root.attrs.put(_attrs(data).to_dict())
    cache_attrs(root)
    return root


def cache_attrs(root: zarr.Group) -> SegCacheAttrs:
    """The typed root attrs of an open cache; StoreError when they are not this format's and version's."""
    try:
        return cast(SegCacheAttrs, SegCacheAttrs.from_dict(dict(root.attrs), f"{root.store} attrs"))
    except ConfigError as exc:
        raise StoreError(
            f"{root.store} is not a {FORMAT} v{VERSION} cache of the 20 ScanNet classes ({exc}); "
            "pass another --out / --cache-dir, or delete it to rebuild."
        ) from exc


def _scene_attrs(root: zarr.Group, name: str) -> SegSceneAttrs | None:
    """The attrs of a finished cached scene; None when it is absent or unfinished."""
    node = root.get(name)
    if not isinstance(node, zarr.Group) or not node.attrs.get("done"):
        return None
    try:
        return cast(SegSceneAttrs, SegSceneAttrs.from_dict(dict(node.attrs), f"{root.store}/{name} attrs"))
    except ConfigError as exc:
        raise StoreError(f"{exc}; the cache is damaged: delete it and rerun to rebuild it.") from exc


def done_scenes(root: zarr.Group) -> set[str]:
    """Scenes whose arrays are completely written."""
    return {name for name, group in root.groups() if group.attrs.get("done")}


def _write_scene(root: zarr.Group, name: str, folder: Path) -> None:
    sources = fingerprint(scene_files(folder))  # before reading: a change during the read shows next time
    mesh = read_scene(*scene_files(folder))
    group = root.create_group(name, overwrite=True)
    write_arrays(group, {"xyz": mesh.xyz, "rgb": mesh.rgb, "label": mesh.label})
    group.attrs.put(SegSceneAttrs(folder=str(folder), vertices=len(mesh.xyz), sources=sources).to_dict())
    durable.committed(f"seg cache {name}")


def _for_root(path: Path, root: zarr.Group, data: Path) -> zarr.Group:
    """``root``, emptied and re-keyed (one INFO line) when it caches another data root than ``data``."""
    recorded, wanted = cache_attrs(root).data_root, str(data.resolve())
    if recorded == wanted:
        return root
    if recorded is not None:
        log.info("%s: cached the ScanNet tree %s, not %s; rebuilding", path, recorded, wanted)
    root = zarr.open_group(str(path), mode="w")
    root.attrs.put(_attrs(data).to_dict())
    return root


def build_cache(
    data: str | Path, path: str | Path, scenes: Iterable[str], allow_missing: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Parse every scene of ``scenes`` not yet in the cache at ``path`` (or whose PLYs changed since) from the
    ScanNet tree ``data``; a cache of another tree is rebuilt.

    A scene without its folder or PLYs is a DataError, or with ``allow_missing`` is left out and listed
    under "missing" of the returned summary (also "written" and "kept" scene counts)."""
    data, path = Path(data), Path(path)
    if not data.is_dir():
        raise DataError(f"{data} is not a directory; pass --data/--root pointing at the ScanNet tree (with scans/).")
    present, missing = [], []
    for scene in dict.fromkeys(scenes):  # every scene checked before the cache is created or changed
        folder = find_scan_folder(data, scene)
        files = scene_files(folder) if folder else None
        if folder is None or files is None or not all(f.is_file() for f in files):
            if not allow_missing:
                where = files[0] if files else data / "scans" / scene
                raise DataError(
                    f"{where} (scene {scene}) is missing; {DOWNLOAD_HINT}, or pass --allow-missing "
                    "to use only the scenes present."
                )
            missing.append(scene)
            continue
        present.append((scene, folder, files))
    root = _for_root(path, open_cache(path, mode="a", data=data), data)
    todo, kept = [], 0
    for scene, folder, files in present:
        attrs = _scene_attrs(root, scene)
        if attrs is not None and attrs.folder == str(folder) and attrs.sources == fingerprint(files):
            kept += 1
            continue
        if attrs is not None:
            log.info("%s: mesh files changed since cached; re-reading", scene)
        todo.append((scene, folder))
    for scene, folder in progress_bar(
        todo, desc="caching ScanNet meshes", unit="scene", disable=not progress or not todo
    ):
        _write_scene(root, scene, folder)
    return {"written": len(todo), "kept": kept, "missing": missing}


def load_scene(root: zarr.Group, name: str) -> SceneMesh:
    """One cached scene; StoreError naming the scene when it is absent, unfinished or fails its checksum."""
    if name not in root or not split_group(root, name).attrs.get("done"):
        raise StoreError(f"{root.store}: scene {name} is not cached (completely); rerun the command to build it.")
    return SceneMesh(*read_arrays(root, name, ARRAYS))


def verify_cache(path: str | Path) -> list[str]:
    """Every fault of a cache: unfinished scenes, wrong shapes or dtypes, failed checksums, NaN/inf, bad labels."""
    root = open_cache(path)
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
        layout = layout_faults(group, name, ARRAYS, {"vertices": attrs.vertices})
        if layout:
            faults += layout
            continue
        try:
            mesh = load_scene(root, name)
        except StoreError as exc:
            faults.append(f"{name}: unreadable: {exc.__cause__}")
            continue
        if not np.isfinite(mesh.xyz).all():
            faults.append(f"{name}/xyz holds NaN or inf")
        if ((mesh.label >= NUM_CLASSES) & (mesh.label != IGNORE)).any():
            faults.append(f"{name}/label holds values outside 0..{NUM_CLASSES - 1} and {IGNORE}")
    return faults
