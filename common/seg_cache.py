"""The ScanNet segmentation cache (format "pkd-scannet-seg", version 1): each scene's mesh vertices, parsed once.

Parsing two PLYs per scene costs far more than reading them back from Zarr, and fine-tuning reads every
scene hundreds of times, so ``build_cache`` parses each scene once into::

    seg.zarr   attrs: format, version, class_ids (the NYU40 ids of classes 0..19), classes (names), ignore
      <scene>/ attrs: vertices, mesh, labels (source paths), done (set last: a scene counts only then)
        xyz    (V, 3) float32  vertex coordinates, metres
        rgb    (V, 3) uint8    vertex colour
        label  (V,)   uint8    benchmark class 0..19, or 255 (ignored)

Chunks of 2^20 vertices (a whole scene in one chunk per array, for most scans), Blosc-lz4 + CRC32C: lz4
decodes several times faster than zstd and reading is what the cache is for (bench/scannet_seg.py); a
flipped byte fails on read (a StoreError naming the scene) instead of being trained on. Building is
resumable: scenes already done are kept, a scene whose write was interrupted is rewritten whole. One process
writes a cache at a time (under torchrun, rank 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pkd.common.errors import DataError, StoreError
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
from pkd.common.store import array_of, int_attr, split_group

FORMAT = "pkd-scannet-seg"
VERSION = 1
CHUNK = 1 << 20
ARRAYS = {"xyz": ((3,), "float32"), "rgb": ((3,), "uint8"), "label": ((), "uint8")}


def _attrs() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "class_ids": list(CLASS_IDS),
        "classes": list(class_names()),
        "ignore": IGNORE,
    }


def is_seg_cache(path: str | Path) -> bool:
    """True when ``path`` is a Zarr group whose format attr is this cache's."""
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False


def open_cache(path: str | Path, mode: Literal["r", "a"] = "r") -> zarr.Group:
    """Open a segmentation cache (``mode="a"`` creates it); StoreError for a foreign or other-version group."""
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
        root.attrs.update(_attrs())
    expected = _attrs()
    found = {k: root.attrs.get(k) for k in ("format", "version", "class_ids")}
    if found != {k: expected[k] for k in found}:
        raise StoreError(
            f"{path} is not a {FORMAT} v{VERSION} cache of the 20 ScanNet classes (found {found}); "
            "pass another --out / --cache-dir, or delete it to rebuild."
        )
    return root


def done_scenes(root: zarr.Group) -> set[str]:
    """Scenes whose arrays are completely written."""
    return {name for name, group in root.groups() if group.attrs.get("done")}


def _write_scene(root: zarr.Group, name: str, mesh: SceneMesh, sources: tuple[Path, Path]) -> None:
    group = root.create_group(name, overwrite=True)
    for array, values in (("xyz", mesh.xyz), ("rgb", mesh.rgb), ("label", mesh.label)):
        group.create_array(
            array,
            data=values,
            chunks=(max(1, min(CHUNK, len(values))), *values.shape[1:]),
            compressors=(BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec()),
        )
    group.attrs.update({"vertices": len(mesh.xyz), "mesh": str(sources[0]), "labels": str(sources[1])})
    group.attrs["done"] = True


def build_cache(
    data: str | Path, path: str | Path, scenes: Iterable[str], allow_missing: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Parse every scene of ``scenes`` not yet in the cache at ``path`` from the ScanNet tree ``data``.

    A scene without its folder or PLYs is a DataError, or with ``allow_missing`` is left out and listed
    under "missing" of the returned summary (also "written" and "kept" scene counts)."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data} is not a directory; pass --data/--root pointing at the ScanNet tree (with scans/).")
    root = open_cache(path, mode="a")
    done = done_scenes(root)
    todo, missing = [], []
    for scene in dict.fromkeys(scenes):
        if scene in done:
            continue
        folder = find_scan_folder(data, scene)
        files = scene_files(folder) if folder else None
        if files is None or not all(f.is_file() for f in files):
            if not allow_missing:
                where = files[0] if files else data / "scans" / scene
                raise DataError(
                    f"{where} (scene {scene}) is missing; {DOWNLOAD_HINT}, or pass --allow-missing "
                    "to use only the scenes present."
                )
            missing.append(scene)
            continue
        todo.append((scene, files))
    for scene, files in progress_bar(
        todo, desc="caching ScanNet meshes", unit="scene", disable=not progress or not todo
    ):
        _write_scene(root, scene, read_scene(*files), files)
    return {"written": len(todo), "kept": len(done), "missing": missing}


def load_scene(root: zarr.Group, name: str) -> SceneMesh:
    """One cached scene; StoreError naming the scene when it is absent, unfinished or fails its checksum."""
    if name not in root or not split_group(root, name).attrs.get("done"):
        raise StoreError(f"{root.store}: scene {name} is not cached (completely); rerun the command to build it.")
    group = split_group(root, name)
    try:
        return SceneMesh(*(np.asarray(array_of(group, array)[...]) for array in ARRAYS))
    except Exception as exc:  # codecs raise many types (ValueError, RuntimeError, blosc errors)
        raise StoreError(
            f"{root.store}/{name} is corrupt ({type(exc).__name__}: {exc}); run `pkd-prep verify` on "
            "the cache, delete it and let the next run rebuild it."
        ) from exc


def verify_cache(path: str | Path) -> list[str]:
    """Every fault of a cache: unfinished scenes, wrong shapes or dtypes, failed checksums, NaN/inf, bad labels."""
    root = open_cache(path)
    faults = []
    for name, group in sorted(root.groups()):
        if not group.attrs.get("done"):
            faults.append(f"{name}: unfinished (rerun the command that builds the cache)")
            continue
        count = int_attr(group, "vertices", -1)
        for array, (shape, dtype) in ARRAYS.items():
            node = group.get(array)
            if not isinstance(node, zarr.Array) or node.shape != (count, *shape) or node.dtype != np.dtype(dtype):
                faults.append(f"{name}/{array}: missing or not ({count}, {shape}) {dtype}")
        if any(f.startswith(f"{name}/") for f in faults):
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
