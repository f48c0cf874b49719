"""The arrays of one scene in a per-scene Zarr cache (the segmentation and detection caches): written in chunks of
2^20 rows with Blosc-lz4 + CRC32C, read back with a checksum failure as a StoreError naming the scene.

lz4 decodes several times faster than zstd and reading is what these caches are for (bench/scannet_seg.py); a
flipped byte fails on read instead of being trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pkd.common.errors import StoreError
from pkd.common.store import array_of, split_group

CHUNK = 1 << 20
# name -> (the scene attr holding its length, shape of one row, dtype)
ArraySpecs = Mapping[str, tuple[str, tuple[int, ...], str]]


def write_arrays(group: zarr.Group, arrays: Mapping[str, np.ndarray]) -> None:
    """Write each array of ``arrays`` into ``group`` (a scene's whole arrays, usually one chunk each)."""
    for name, values in arrays.items():
        group.create_array(
            name,
            data=values,
            chunks=(max(1, min(CHUNK, len(values))), *values.shape[1:]),
            compressors=(BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec()),
        )


def read_arrays(root: zarr.Group, scene: str, names: Iterable[str]) -> list[np.ndarray]:
    """The arrays ``names`` of the cached ``scene``; StoreError naming it when a chunk fails its checksum."""
    group = split_group(root, scene)
    try:
        return [np.asarray(array_of(group, name)[...]) for name in names]
    except Exception as exc:  # codecs raise many types (ValueError, RuntimeError, blosc errors)
        raise StoreError(
            f"{root.store}/{scene} is corrupt ({type(exc).__name__}: {exc}); run `pkd-prep verify` on "
            "the cache, delete it and let the next run rebuild it."
        ) from exc


def layout_faults(group: zarr.Group, scene: str, specs: ArraySpecs, lengths: Mapping[str, int]) -> list[str]:
    """One line per array of ``specs`` that is missing or not of its (length, *row) shape and dtype."""
    faults = []
    for name, (length, row, dtype) in specs.items():
        node, shape = group.get(name), (lengths[length], *row)
        if not isinstance(node, zarr.Array) or node.shape != shape or node.dtype != np.dtype(dtype):
            faults.append(f"{scene}/{name}: missing or not {shape} {dtype}")
    return faults
